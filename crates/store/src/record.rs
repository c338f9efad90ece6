//! The store's domain types ([`Record`], [`Stats`], [`Origin`]) and their on-disk shapes.
//!
//! Records are JSON in sled, keyed by the upstream id (8 bytes, big endian). Credentials sit in
//! the record as one AES-256-GCM envelope (base64) of `{"username":..,"password":..}`; the
//! plaintext `username`/`password` fields exist only in records of schema version 2 and older,
//! which the migrations re-encrypt.

use std::str::FromStr;

use proxygate_core::{Credentials, Host, ProxyType, Scheme, Secret, Upstream, UpstreamId};
use serde::{Deserialize, Serialize};

/// What the store keeps of one upstream (its live stats are kept apart, in [`Stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub upstream: Upstream,
    /// Disabled upstreams stay in the store but never serve.
    pub disabled: bool,
    pub origin: Origin,
    pub added_unix_ms: u64,
    /// The list source that brought it (origin [`Origin::Source`]).
    pub source: Option<String>,
    /// Why it is disabled, when the janitor (not an operator) disabled it: a later check that
    /// passes enables it again.
    pub disabled_reason: Option<String>,
    /// The anonymity its list claimed (`transparent`, `anonymous`, `elite`); the checker's
    /// own verdict is in its [`CheckRecord`].
    pub listed_anonymity: Option<String>,
}

impl Record {
    /// A new record of `origin`, enabled, added now (`now_unix_ms`).
    pub fn new(upstream: Upstream, origin: Origin, now_unix_ms: u64) -> Record {
        Record {
            upstream,
            disabled: false,
            origin,
            added_unix_ms: now_unix_ms,
            source: None,
            disabled_reason: None,
            listed_anonymity: None,
        }
    }
}

/// Who put an upstream in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// An operator (`proxygate pool add`/`import`): stays until removed.
    #[default]
    Operator,
    /// The config file or `--upstream`/`--upstreams-file`: follows the config at each start.
    Config,
    /// A list source (`[[sources]]`), after its check passed: the janitor may disable it when
    /// dead for long and deletes it when unused for long.
    Source,
}

/// An upstream's persisted reputation stats, written behind from the live pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub reputation: u8,
    pub success_rate: Option<f64>,
    pub response_time_avg_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub total_uses: u64,
    /// Of `total_uses`, how many failed.
    pub failures: u64,
    pub last_used_unix_ms: Option<u64>,
    pub last_health_check_unix_ms: Option<u64>,
    /// The response-time histogram (hdrhistogram V2, base64) since first measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_histogram: Option<String>,
}

impl Default for Stats {
    /// A new upstream's: reputation 50, nothing measured.
    fn default() -> Self {
        Stats {
            reputation: 50,
            success_rate: None,
            response_time_avg_ms: None,
            consecutive_failures: 0,
            total_uses: 0,
            failures: 0,
            last_used_unix_ms: None,
            last_health_check_unix_ms: None,
            latency_histogram: None,
        }
    }
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Operator => "operator",
            Origin::Config => "config",
            Origin::Source => "source",
        }
    }
}

/// The last check of an upstream through itself (the checker's verdict).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckRecord {
    pub checked_unix_ms: u64,
    pub passed: bool,
    /// `transparent`, `anonymous` or `elite`.
    pub anonymity: Option<String>,
    /// The address the judge saw the request come from.
    pub exit_ip: Option<String>,
    /// Connect to judge answer.
    pub latency_ms: Option<u64>,
    pub judge: Option<String>,
    /// Why it failed (never a password).
    pub error: Option<String>,
    /// Since when every check failed (`None` while the last one passed).
    pub failing_since_unix_ms: Option<u64>,
    /// What the exit leaked (the gateway's address, the client's proxy headers) when this
    /// check saw it: the upstream is demoted to `untrusted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak: Option<String>,
    /// How it tampered with traffic when this check caught it: the upstream was quarantined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tampered: Option<String>,
    /// Integrity checks passed in a row (every configured step ran and passed, no leak)...
    pub integrity_passes: u32,
    /// ...since the first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity_since_unix_ms: Option<u64>,
}

/// What the store keeps of one list source's quality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceStats {
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    pub last_fetch_unix_ms: Option<u64>,
    pub last_ok_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    /// The last fetch.
    pub last: FetchSummary,
    /// Over every fetch.
    pub total: FetchSummary,
    /// `(unique, passed)` of the last fetches (at most 10), oldest first: the yield policy's
    /// input.
    pub recent: Vec<(u64, u64)>,
}

/// What one fetch (or every fetch) of a source gave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FetchSummary {
    /// Entries listed.
    pub fetched: u64,
    /// Distinct candidates after filtering.
    pub unique: u64,
    /// Not in the store before.
    pub new: u64,
    /// Passed their check.
    pub passed: u64,
    /// Joined the pool.
    pub imported: u64,
}

/// A record as stored. Every field past the address is optional so that records of every
/// schema version parse; the migrations bring them to the current shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RawRecord {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Absent before schema version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_type: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default)]
    pub added_unix_ms: u64,
    /// The list source of an upstream of origin `source` (schema version 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listed_anonymity: Option<String>,
    /// Base64 of the credentials envelope (schema version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// Plaintext credentials of schema versions 1 and 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// The plaintext inside a credentials envelope.
#[derive(Serialize, Deserialize)]
pub(crate) struct PlainCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlainCredentials(***)")
    }
}

impl Drop for PlainCredentials {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.username.zeroize();
        self.password.zeroize();
    }
}

impl RawRecord {
    pub(crate) fn decode(bytes: &[u8]) -> Result<RawRecord, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// [`RawRecord::decode`] of record `id`, as the store's error.
    pub(crate) fn decode_of(id: UpstreamId, bytes: &[u8]) -> Result<RawRecord, crate::StoreError> {
        RawRecord::decode(bytes).map_err(|reason| crate::StoreError::Corrupt {
            what: id.to_string(),
            reason,
        })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The address part of a record (everything but credentials).
    pub(crate) fn from_record(r: &Record) -> RawRecord {
        RawRecord {
            scheme: r.upstream.scheme.as_str().to_owned(),
            host: r.upstream.host.to_string(),
            port: r.upstream.port,
            country: r.upstream.country.clone(),
            proxy_type: Some(r.upstream.proxy_type.as_str().to_owned()),
            disabled: r.disabled,
            origin: Some(r.origin.as_str().to_owned()),
            added_unix_ms: r.added_unix_ms,
            source: r.source.clone(),
            disabled_reason: r.disabled_reason.clone(),
            listed_anonymity: r.listed_anonymity.clone(),
            credentials: None,
            username: None,
            password: None,
        }
    }

    /// Builds the domain record, given the decrypted credentials.
    pub(crate) fn to_record(
        &self,
        credentials: Option<PlainCredentials>,
    ) -> Result<Record, String> {
        let scheme = Scheme::from_str(&self.scheme)
            .map_err(|()| format!("unknown scheme {:?}", self.scheme))?;
        let host = Host::parse(self.host.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| format!("invalid host {:?}", self.host))?;
        let proxy_type = match &self.proxy_type {
            Some(t) => ProxyType::from_str(t).map_err(|()| format!("unknown proxy_type {t:?}"))?,
            None => ProxyType::default(),
        };
        let origin = match self.origin.as_deref() {
            Some("config") => Origin::Config,
            Some("source") => Origin::Source,
            _ => Origin::Operator,
        };
        Ok(Record {
            upstream: Upstream {
                scheme,
                host,
                port: self.port,
                credentials: credentials.map(|c| Credentials {
                    username: Secret::new(c.username.as_str()),
                    password: Secret::new(c.password.as_str()),
                }),
                country: self.country.clone(),
                proxy_type,
            },
            disabled: self.disabled,
            origin,
            added_unix_ms: self.added_unix_ms,
            source: self.source.clone(),
            disabled_reason: self.disabled_reason.clone(),
            listed_anonymity: self.listed_anonymity.clone(),
        })
    }
}

/// The sled key of an upstream's record and stats.
pub(crate) fn id_key(id: UpstreamId) -> [u8; 8] {
    id.0.to_be_bytes()
}

pub(crate) fn key_id(key: &[u8]) -> Option<UpstreamId> {
    <[u8; 8]>::try_from(key)
        .ok()
        .map(|b| UpstreamId(u64::from_be_bytes(b)))
}

/// The associated data binding a credentials envelope to its record.
pub(crate) fn context(id: UpstreamId) -> Vec<u8> {
    let mut c = b"upstreams/".to_vec();
    c.extend_from_slice(&id_key(id));
    c
}
