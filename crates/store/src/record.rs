//! The store's domain types ([`Record`], [`Stats`], [`Origin`]) and their on-disk shapes.
//!
//! Records are JSON in sled, keyed by the upstream id (8 bytes, big endian). Credentials sit in
//! the record as one AES-256-GCM envelope (base64) of `{"username":..,"password":..}`; the
//! plaintext `username`/`password` fields exist only in records of schema version 2 and older,
//! which the migrations re-encrypt. Stats rows are binary (`Stats::encode`, schema 5): the
//! persister rewrites every used upstream's each interval, and sled holds them in memory.

use std::str::FromStr;
use std::sync::Arc;

use proxygate_core::{Credentials, Host, ProxyType, Scheme, Secret, Upstream, UpstreamId};
use serde::{Deserialize, Serialize};

/// What the store keeps of one upstream (its live stats are kept apart, in [`Stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Shared with the live pool's entry of it: one copy per upstream, not two.
    pub upstream: Arc<Upstream>,
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
    pub fn new(upstream: impl Into<Arc<Upstream>>, origin: Origin, now_unix_ms: u64) -> Record {
        Record {
            upstream: upstream.into(),
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

/// The first byte of a stats row in the binary shape (schema 5): never `{`, which starts the
/// JSON rows of schema 4 and older (still read, [`Stats::decode`]).
const STATS_BINARY: u8 = 1;

/// Which optional fields a binary stats row carries (its third byte).
const HAS_SUCCESS_RATE: u8 = 1;
const HAS_RESPONSE_TIME: u8 = 2;
const HAS_LAST_USED: u8 = 4;
const HAS_LAST_CHECK: u8 = 8;
const HAS_HISTOGRAM: u8 = 16;

impl Stats {
    /// The row the store keeps: [`STATS_BINARY`], the reputation, a byte of which optional
    /// fields follow, then the fields in declaration order (rates as little-endian doubles,
    /// counts and times as LEB128 varints) and last the histogram's V2 bytes. ~40 bytes plus
    /// the histogram, where the JSON of schema 4 took ~300 plus its base64: the persister
    /// rewrites every used upstream's row each interval, and sled holds them all in memory.
    pub(crate) fn encode(&self) -> Vec<u8> {
        use base64::Engine;
        // A histogram that is not base64 (it always is: `Latency::encode`) is left out
        // rather than stored broken; the distribution then starts afresh.
        let histogram = self.latency_histogram.as_deref().and_then(|h| {
            base64::engine::general_purpose::STANDARD
                .decode(h)
                .ok()
                .filter(|b| !b.is_empty())
        });
        let mut present = 0;
        for (set, flag) in [
            (self.success_rate.is_some(), HAS_SUCCESS_RATE),
            (self.response_time_avg_ms.is_some(), HAS_RESPONSE_TIME),
            (self.last_used_unix_ms.is_some(), HAS_LAST_USED),
            (self.last_health_check_unix_ms.is_some(), HAS_LAST_CHECK),
            (histogram.is_some(), HAS_HISTOGRAM),
        ] {
            if set {
                present |= flag;
            }
        }
        let mut out = Vec::with_capacity(48 + histogram.as_ref().map_or(0, Vec::len));
        out.extend([STATS_BINARY, self.reputation, present]);
        for rate in [self.success_rate, self.response_time_avg_ms]
            .into_iter()
            .flatten()
        {
            out.extend(rate.to_le_bytes());
        }
        put_varint(&mut out, u64::from(self.consecutive_failures));
        put_varint(&mut out, self.total_uses);
        put_varint(&mut out, self.failures);
        for at in [self.last_used_unix_ms, self.last_health_check_unix_ms]
            .into_iter()
            .flatten()
        {
            put_varint(&mut out, at);
        }
        out.extend(histogram.unwrap_or_default());
        out
    }

    /// Reads a stats row: the binary shape of [`Stats::encode`] or the JSON of schema 4 and
    /// older. `None` for anything else (truncated, a field out of range, an unknown first
    /// byte): the caller starts that upstream's stats afresh, as it did for bad JSON.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Stats> {
        match bytes.split_first()? {
            (b'{', _) => serde_json::from_slice(bytes).ok(),
            (&STATS_BINARY, rest) => Stats::decode_binary(rest),
            _ => None,
        }
    }

    fn decode_binary(mut rest: &[u8]) -> Option<Stats> {
        use base64::Engine;
        let [reputation, present, ..] = *rest else {
            return None;
        };
        rest = &rest[2..];
        if present
            & !(HAS_SUCCESS_RATE
                | HAS_RESPONSE_TIME
                | HAS_LAST_USED
                | HAS_LAST_CHECK
                | HAS_HISTOGRAM)
            != 0
        {
            return None;
        }
        let mut rate = |flag: u8| -> Option<Option<f64>> {
            if present & flag == 0 {
                return Some(None);
            }
            let (bytes, tail) = rest.split_first_chunk::<8>()?;
            rest = tail;
            Some(Some(f64::from_le_bytes(*bytes)))
        };
        let success_rate = rate(HAS_SUCCESS_RATE)?;
        let response_time_avg_ms = rate(HAS_RESPONSE_TIME)?;
        let consecutive_failures = u32::try_from(take_varint(&mut rest)?).ok()?;
        let total_uses = take_varint(&mut rest)?;
        let failures = take_varint(&mut rest)?;
        let mut at = |flag: u8| -> Option<Option<u64>> {
            if present & flag == 0 {
                return Some(None);
            }
            take_varint(&mut rest).map(Some)
        };
        let last_used_unix_ms = at(HAS_LAST_USED)?;
        let last_health_check_unix_ms = at(HAS_LAST_CHECK)?;
        let latency_histogram = match present & HAS_HISTOGRAM {
            0 if rest.is_empty() => None,
            0 => return None,
            _ if rest.is_empty() => return None,
            _ => Some(base64::engine::general_purpose::STANDARD.encode(rest)),
        };
        Some(Stats {
            reputation,
            success_rate,
            response_time_avg_ms,
            consecutive_failures,
            total_uses,
            failures,
            last_used_unix_ms,
            last_health_check_unix_ms,
            latency_histogram,
        })
    }
}

/// Appends `v` as an unsigned LEB128 varint (7 bits a byte, low first; 1-10 bytes).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        // The low seven bits, with the continuation bit.
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads one [`put_varint`] off the front of `bytes`; `None` when it runs out or passes 64
/// bits.
fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let low = u64::from(b & 0x7f);
        let shift = 7 * u32::try_from(i).ok()?;
        if i == 9 && low > 1 {
            return None;
        }
        v |= low << shift;
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(v);
        }
    }
    None
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
            upstream: Arc::new(Upstream {
                scheme,
                host,
                port: self.port,
                credentials: credentials.map(|c| Credentials {
                    username: Secret::new(c.username.as_str()),
                    password: Secret::new(c.password.as_str()),
                }),
                country: self.country.clone(),
                proxy_type,
            }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> Stats {
        Stats {
            reputation: 87,
            success_rate: Some(0.962_5),
            response_time_avg_ms: Some(231.75),
            consecutive_failures: 2,
            total_uses: 1_234_567,
            failures: 46_296,
            last_used_unix_ms: Some(1_796_000_000_123),
            last_health_check_unix_ms: Some(1_795_999_000_000),
            // Base64 standing in for a V2 histogram (`Latency::encode`): the store keeps
            // its bytes without reading them.
            latency_histogram: Some(
                "HISTFAAAACJ4nJNpmSzMwMDAzQABzFCaEUzOmQ0RYAIKMTEwMDAAAHZRBSs=".into(),
            ),
        }
    }

    /// Every field survives the binary row, set or not; JSON rows of schema 4 still read;
    /// the row is a fraction of the JSON.
    #[test]
    fn stats_rows_round_trip_and_json_still_reads() {
        let fresh = Stats::default();
        let mut partly = measured();
        partly.success_rate = None;
        partly.last_health_check_unix_ms = None;
        partly.latency_histogram = None;
        partly.consecutive_failures = u32::MAX;
        partly.total_uses = u64::MAX;
        for s in [measured(), fresh, partly] {
            let row = s.encode();
            assert_eq!(row[0], STATS_BINARY);
            assert_eq!(Stats::decode(&row), Some(s.clone()));
            let json = serde_json::to_vec(&s).unwrap();
            assert_eq!(Stats::decode(&json), Some(s));
        }
        // What JSON let through reads back alike (restoring recomputes the reputation).
        let odd: Stats =
            serde_json::from_slice(br#"{"reputation":200,"success_rate":-1.5}"#).unwrap();
        assert_eq!(Stats::decode(&odd.encode()), Some(odd));
        let (row, json) = (
            measured().encode(),
            serde_json::to_vec(&measured()).unwrap(),
        );
        assert!(
            row.len() * 3 < json.len(),
            "{} against {}",
            row.len(),
            json.len()
        );
    }

    /// A row cut short before its histogram, an unknown first byte, flags past the known
    /// ones or bytes left over read as nothing (fresh stats), never as wrong numbers or a
    /// panic. Cut inside the histogram (its bytes are the row's tail), the numbers stand and
    /// the histogram is what is short: its own decoder refuses it (`Latency::decode`).
    #[test]
    fn broken_stats_rows_read_as_nothing() {
        let mut no_histogram = measured();
        no_histogram.latency_histogram = None;
        for s in [measured(), no_histogram] {
            let row = s.encode();
            let histogram = s.latency_histogram.as_deref().map_or(0, |h| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(h)
                    .unwrap()
                    .len()
            });
            for cut in 0..row.len() {
                let got = Stats::decode(&row[..cut]);
                if cut <= row.len() - histogram {
                    assert_eq!(got, None, "cut at {cut}");
                } else {
                    let got = got.unwrap();
                    assert_ne!(got.latency_histogram, s.latency_histogram);
                    assert_eq!(
                        Stats {
                            latency_histogram: None,
                            ..got
                        },
                        no_histogram_of(&s)
                    );
                }
            }
        }
        let row = Stats::default().encode();
        for first in [0u8, 2, b'[', 0xff] {
            let mut bad = row.clone();
            bad[0] = first;
            assert_eq!(Stats::decode(&bad), None, "first byte {first}");
        }
        let mut flags = row.clone();
        flags[2] |= 0x80;
        assert_eq!(Stats::decode(&flags), None);
        let mut trailing = row;
        trailing.push(0);
        assert_eq!(Stats::decode(&trailing), None);
        assert_eq!(Stats::decode(b""), None);
    }

    fn no_histogram_of(s: &Stats) -> Stats {
        Stats {
            latency_histogram: None,
            ..s.clone()
        }
    }

    #[test]
    fn varints_take_every_width_and_refuse_overflow() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut rest = out.as_slice();
            assert_eq!(take_varint(&mut rest), Some(v));
            assert!(rest.is_empty());
        }
        // Eleven bytes, or a tenth byte carrying bits past 64, or no last byte.
        let mut rest: &[u8] = &[0xff; 11];
        assert_eq!(take_varint(&mut rest), None);
        let mut rest: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(take_varint(&mut rest), None);
        let mut rest: &[u8] = &[0x80, 0x80];
        assert_eq!(take_varint(&mut rest), None);
    }
}
