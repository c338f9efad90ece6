//! The store's domain types ([`Record`], [`Stats`], [`Origin`]) and their on-disk shapes.
//!
//! Records are binary in sled (`RawRecord::encode`, schema 6; JSON before, and still for a
//! record that shape cannot hold exactly), keyed by the upstream id (8 bytes, big endian).
//! Credentials sit in the record as one AES-256-GCM envelope of `{"username":..,"password":..}`;
//! the plaintext `username`/`password` fields exist only in records of schema version 2 and
//! older, which the migrations re-encrypt. Stats rows are binary (`Stats::encode`, schema 5):
//! the persister rewrites every used upstream's each interval, and sled holds them in memory,
//! as it holds every record.

use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
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
        // A histogram that is not base64 (it always is: `Latency::encode`) is left out
        // rather than stored broken; the distribution then starts afresh.
        let histogram = self
            .latency_histogram
            .as_deref()
            .and_then(|h| BASE64.decode(h).ok().filter(|b| !b.is_empty()));
        let present = flags([
            (self.success_rate.is_some(), HAS_SUCCESS_RATE),
            (self.response_time_avg_ms.is_some(), HAS_RESPONSE_TIME),
            (self.last_used_unix_ms.is_some(), HAS_LAST_USED),
            (self.last_health_check_unix_ms.is_some(), HAS_LAST_CHECK),
            (histogram.is_some(), HAS_HISTOGRAM),
        ]);
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
            _ => Some(BASE64.encode(rest)),
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

/// The OR of the flags of the fields set: the byte (or two) of a binary row that says which
/// optional fields follow.
fn flags<T: Copy + Default + std::ops::BitOr<Output = T>>(
    fields: impl IntoIterator<Item = (bool, T)>,
) -> T {
    fields
        .into_iter()
        .filter(|(set, _)| *set)
        .fold(T::default(), |all, (_, flag)| all | flag)
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

/// The first byte of a check row in the binary shape (schema 6): never `{`, which starts the
/// JSON rows before it (still read).
const CHECK_BINARY: u8 = 1;

/// Which fields of a binary check row follow (its second and third bytes, little endian), and
/// whether it passed.
const CHECK_PASSED: u16 = 1;
const CHECK_ANONYMITY: u16 = 2;
const CHECK_EXIT: u16 = 4;
const CHECK_LATENCY: u16 = 8;
const CHECK_JUDGE: u16 = 16;
const CHECK_ERROR: u16 = 32;
const CHECK_FAILING: u16 = 64;
const CHECK_LEAK: u16 = 128;
const CHECK_TAMPERED: u16 = 256;
const CHECK_SINCE: u16 = 512;
const CHECK_ALL: u16 = 1023;

impl CheckRecord {
    /// The row the store keeps: [`CHECK_BINARY`], two bytes of which fields follow (and
    /// whether it passed), the time checked and the integrity streak, then the fields present
    /// in declaration order: times and the latency as varints, texts as their length and
    /// bytes. ~70 bytes where the JSON took ~250: sled holds every row in memory, one per
    /// checked upstream.
    pub fn encode(&self) -> Vec<u8> {
        let present = flags([
            (self.passed, CHECK_PASSED),
            (self.anonymity.is_some(), CHECK_ANONYMITY),
            (self.exit_ip.is_some(), CHECK_EXIT),
            (self.latency_ms.is_some(), CHECK_LATENCY),
            (self.judge.is_some(), CHECK_JUDGE),
            (self.error.is_some(), CHECK_ERROR),
            (self.failing_since_unix_ms.is_some(), CHECK_FAILING),
            (self.leak.is_some(), CHECK_LEAK),
            (self.tampered.is_some(), CHECK_TAMPERED),
            (self.integrity_since_unix_ms.is_some(), CHECK_SINCE),
        ]);
        let mut out = Vec::with_capacity(80);
        out.push(CHECK_BINARY);
        out.extend(present.to_le_bytes());
        put_varint(&mut out, self.checked_unix_ms);
        put_varint(&mut out, u64::from(self.integrity_passes));
        let text = |out: &mut Vec<u8>, t: &Option<String>| {
            if let Some(t) = t {
                put_bytes(out, t.as_bytes());
            }
        };
        let number = |out: &mut Vec<u8>, n: Option<u64>| {
            if let Some(n) = n {
                put_varint(out, n);
            }
        };
        text(&mut out, &self.anonymity);
        text(&mut out, &self.exit_ip);
        number(&mut out, self.latency_ms);
        text(&mut out, &self.judge);
        text(&mut out, &self.error);
        number(&mut out, self.failing_since_unix_ms);
        text(&mut out, &self.leak);
        text(&mut out, &self.tampered);
        number(&mut out, self.integrity_since_unix_ms);
        out
    }

    /// Reads a check row: the binary shape of [`CheckRecord::encode`] or the JSON before it.
    /// `None` for anything else (the upstream then counts as never checked, as before).
    pub fn decode(bytes: &[u8]) -> Option<CheckRecord> {
        match bytes.split_first()? {
            (b'{', _) => serde_json::from_slice(bytes).ok(),
            (&CHECK_BINARY, rest) => CheckRecord::decode_binary(rest),
            _ => None,
        }
    }

    fn decode_binary(rest: &[u8]) -> Option<CheckRecord> {
        let (present, mut rest) = rest.split_first_chunk::<2>()?;
        let present = u16::from_le_bytes(*present);
        if present & !CHECK_ALL != 0 {
            return None;
        }
        let rest = &mut rest;
        let text = |rest: &mut &[u8], flag: u16| -> Option<Option<String>> {
            if present & flag == 0 {
                return Some(None);
            }
            String::from_utf8(take_bytes(rest)?.to_vec()).ok().map(Some)
        };
        let number = |rest: &mut &[u8], flag: u16| -> Option<Option<u64>> {
            if present & flag == 0 {
                return Some(None);
            }
            take_varint(rest).map(Some)
        };
        let check = CheckRecord {
            checked_unix_ms: take_varint(rest)?,
            integrity_passes: u32::try_from(take_varint(rest)?).ok()?,
            passed: present & CHECK_PASSED != 0,
            anonymity: text(rest, CHECK_ANONYMITY)?,
            exit_ip: text(rest, CHECK_EXIT)?,
            latency_ms: number(rest, CHECK_LATENCY)?,
            judge: text(rest, CHECK_JUDGE)?,
            error: text(rest, CHECK_ERROR)?,
            failing_since_unix_ms: number(rest, CHECK_FAILING)?,
            leak: text(rest, CHECK_LEAK)?,
            tampered: text(rest, CHECK_TAMPERED)?,
            integrity_since_unix_ms: number(rest, CHECK_SINCE)?,
        };
        rest.is_empty().then_some(check)
    }
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
/// schema version parse; the migrations bring them to the current shape. Stored binary
/// ([`RawRecord::encode`], schema 6) or, where that shape cannot hold it exactly, JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// The first byte of a record in the binary shape (schema 6): never `{`, which starts the
/// JSON records of schema 5 and older (still read, and still written for a record the binary
/// shape cannot hold exactly).
const RECORD_BINARY: u8 = 1;

/// The second byte: the disabled flag over the scheme's, proxy type's and origin's codes.
const DISABLED: u8 = 0x80;

/// The third byte: which fields follow, and the host's form.
const HAS_COUNTRY: u8 = 1;
const HAS_SOURCE: u8 = 2;
const HAS_REASON: u8 = 4;
const HAS_ANONYMITY: u8 = 8;
const HAS_CREDENTIALS: u8 = 16;
const HOST_V4: u8 = 32;
const HOST_V6: u8 = 64;

/// The codes of a proxy type and an origin (0: absent).
const PROXY_TYPES: [&str; 3] = ["datacenter", "residential", "mobile"];
const ORIGINS: [&str; 3] = ["operator", "config", "source"];

/// `value`'s code among `names` (0 for `None`, else its place plus one), when it is one of
/// them exactly.
fn code_of(value: Option<&str>, names: &[&str]) -> Option<u8> {
    match value {
        None => Some(0),
        Some(v) => names
            .iter()
            .position(|n| *n == v)
            .and_then(|i| u8::try_from(i + 1).ok()),
    }
}

/// The name of `code` among `names`.
fn name_of(code: u8, names: &[&str]) -> Result<Option<String>, String> {
    match code {
        0 => Ok(None),
        c => names
            .get(usize::from(c) - 1)
            .map(|n| Some((*n).to_owned()))
            .ok_or_else(|| format!("unknown code {c}")),
    }
}

/// Appends `bytes`, its length first (a varint).
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads one [`put_bytes`] off the front of `rest`.
fn take_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_varint(rest)?).ok()?;
    let (bytes, tail) = rest.split_at_checked(len)?;
    *rest = tail;
    Some(bytes)
}

impl RawRecord {
    /// Reads a stored record: the binary shape of [`RawRecord::encode`] or JSON.
    pub(crate) fn decode(bytes: &[u8]) -> Result<RawRecord, String> {
        match bytes.split_first() {
            Some((&RECORD_BINARY, rest)) => RawRecord::decode_binary(rest)
                .ok_or_else(|| "a binary record that does not read (truncated?)".to_owned()),
            _ => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }

    fn decode_binary(mut rest: &[u8]) -> Option<RawRecord> {
        let [kinds, present, ..] = *rest else {
            return None;
        };
        rest = &rest[2..];
        if present
            & !(HAS_COUNTRY
                | HAS_SOURCE
                | HAS_REASON
                | HAS_ANONYMITY
                | HAS_CREDENTIALS
                | HOST_V4
                | HOST_V6)
            != 0
            || present & (HOST_V4 | HOST_V6) == HOST_V4 | HOST_V6
        {
            return None;
        }
        let scheme = Scheme::ALL.get(usize::from(kinds & 7))?.as_str().to_owned();
        let proxy_type = name_of((kinds >> 3) & 3, &PROXY_TYPES).ok()?;
        let origin = name_of((kinds >> 5) & 3, &ORIGINS).ok()?;
        let host = if present & HOST_V4 != 0 {
            let (ip, tail) = rest.split_first_chunk::<4>()?;
            rest = tail;
            std::net::Ipv4Addr::from(*ip).to_string()
        } else if present & HOST_V6 != 0 {
            let (ip, tail) = rest.split_first_chunk::<16>()?;
            rest = tail;
            format!("[{}]", std::net::Ipv6Addr::from(*ip))
        } else {
            String::from_utf8(take_bytes(&mut rest)?.to_vec()).ok()?
        };
        let (port, tail) = rest.split_first_chunk::<2>()?;
        rest = tail;
        let port = u16::from_be_bytes(*port);
        let added_unix_ms = take_varint(&mut rest)?;
        let mut text = |flag: u8| -> Option<Option<String>> {
            if present & flag == 0 {
                return Some(None);
            }
            String::from_utf8(take_bytes(&mut rest)?.to_vec())
                .ok()
                .map(Some)
        };
        let country = text(HAS_COUNTRY)?;
        let source = text(HAS_SOURCE)?;
        let disabled_reason = text(HAS_REASON)?;
        let listed_anonymity = text(HAS_ANONYMITY)?;
        let credentials = match present & HAS_CREDENTIALS {
            0 => None,
            _ => Some(BASE64.encode(take_bytes(&mut rest)?)),
        };
        if !rest.is_empty() {
            return None;
        }
        Some(RawRecord {
            scheme,
            host,
            port,
            country,
            proxy_type,
            disabled: kinds & DISABLED != 0,
            origin,
            added_unix_ms,
            source,
            disabled_reason,
            listed_anonymity,
            credentials,
            username: None,
            password: None,
        })
    }

    /// The stored bytes: [`RECORD_BINARY`], a byte of the scheme's, proxy type's and origin's
    /// codes and the disabled flag, a byte of which fields follow and the host's form, the
    /// host (4 or 16 bytes for an IP address, else its text), the port, the time added (a
    /// varint), then the fields present, each its length and bytes, the credentials envelope
    /// as bytes rather than base64. A config upstream at an IPv4 address takes 15 bytes where
    /// its JSON took ~120: sled keeps values of up to 22 bytes inside its node rather than in
    /// an allocation of their own, and keeps every record in memory. A record the binary shape
    /// cannot hold exactly (plaintext credentials of schema 2 and older, a scheme, proxy type
    /// or origin not spelled as this build spells it, an envelope that is not base64) stays
    /// JSON, which every build reads.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_binary().unwrap_or_else(|| self.encode_json())
    }

    /// The JSON shape (schema 5 and older).
    pub(crate) fn encode_json(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn encode_binary(&self) -> Option<Vec<u8>> {
        if self.username.is_some() || self.password.is_some() {
            return None;
        }
        let scheme = Scheme::ALL
            .iter()
            .position(|s| s.as_str() == self.scheme)
            .and_then(|i| u8::try_from(i).ok())?;
        let proxy_type = code_of(self.proxy_type.as_deref(), &PROXY_TYPES)?;
        let origin = code_of(self.origin.as_deref(), &ORIGINS)?;
        let credentials = match &self.credentials {
            None => None,
            Some(b64) => {
                let bytes = BASE64.decode(b64).ok()?;
                // Only an envelope that reads back as the same text.
                if BASE64.encode(&bytes) != *b64 {
                    return None;
                }
                Some(bytes)
            }
        };
        let mut present = flags([
            (self.country.is_some(), HAS_COUNTRY),
            (self.source.is_some(), HAS_SOURCE),
            (self.disabled_reason.is_some(), HAS_REASON),
            (self.listed_anonymity.is_some(), HAS_ANONYMITY),
            (credentials.is_some(), HAS_CREDENTIALS),
        ]);
        let v4 = self
            .host
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .filter(|ip| ip.to_string() == self.host);
        let v6 = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
            .filter(|ip| format!("[{ip}]") == self.host);
        present |= match (v4, v6) {
            (Some(_), _) => HOST_V4,
            (None, Some(_)) => HOST_V6,
            (None, None) => 0,
        };
        let mut kinds = scheme | proxy_type << 3 | origin << 5;
        if self.disabled {
            kinds |= DISABLED;
        }
        let mut out = Vec::with_capacity(24);
        out.extend([RECORD_BINARY, kinds, present]);
        match (v4, v6) {
            (Some(ip), _) => out.extend(ip.octets()),
            (None, Some(ip)) => out.extend(ip.octets()),
            (None, None) => put_bytes(&mut out, self.host.as_bytes()),
        }
        out.extend(self.port.to_be_bytes());
        put_varint(&mut out, self.added_unix_ms);
        for text in [
            &self.country,
            &self.source,
            &self.disabled_reason,
            &self.listed_anonymity,
        ]
        .into_iter()
        .flatten()
        {
            put_bytes(&mut out, text.as_bytes());
        }
        if let Some(c) = credentials {
            put_bytes(&mut out, &c);
        }
        Some(out)
    }

    /// [`RawRecord::decode`] of record `id`, as the store's error.
    pub(crate) fn decode_of(id: UpstreamId, bytes: &[u8]) -> Result<RawRecord, crate::StoreError> {
        RawRecord::decode(bytes).map_err(|reason| crate::StoreError::Corrupt {
            what: id.to_string(),
            reason,
        })
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

    /// A config upstream at an IPv4 address, as `from_record` writes it.
    fn plain_record() -> RawRecord {
        RawRecord {
            scheme: "http".into(),
            host: "127.2.1.1".into(),
            port: 8888,
            proxy_type: Some("datacenter".into()),
            origin: Some("config".into()),
            added_unix_ms: 1_796_000_000_123,
            ..RawRecord::default()
        }
    }

    /// Every field set, a domain host.
    fn full_record() -> RawRecord {
        RawRecord {
            scheme: "socks5h".into(),
            host: "proxy.example.net".into(),
            port: 1080,
            country: Some("DE".into()),
            proxy_type: Some("mobile".into()),
            disabled: true,
            origin: Some("source".into()),
            added_unix_ms: 7,
            source: Some("proxyscrape-socks5".into()),
            disabled_reason: Some("quarantined: rewrote a body".into()),
            listed_anonymity: Some("elite".into()),
            credentials: Some(BASE64.encode([9u8; 61])),
            username: None,
            password: None,
        }
    }

    /// Records in every form the binary shape holds read back as they were, and the common
    /// one fits in the 22 bytes sled keeps inside its node (no allocation per record).
    #[test]
    fn binary_records_read_back_as_written() {
        let plain = plain_record();
        let row = plain.encode();
        assert_eq!(row.first(), Some(&RECORD_BINARY));
        assert!(row.len() <= 22, "{} bytes", row.len());
        assert!(
            row.len() * 7 < plain.encode_json().len(),
            "{} bytes",
            row.len()
        );
        let mut shapes = vec![plain, full_record()];
        for (scheme, host, proxy_type, origin) in [
            ("https", "[2001:db8::1]", None, None),
            ("socks4", "10.0.0.1", Some("residential"), Some("operator")),
            (
                "socks4a",
                "[::ffff:10.0.0.1]",
                Some("datacenter"),
                Some("source"),
            ),
            (
                "socks5",
                "xn--bcher-kva.example",
                Some("mobile"),
                Some("config"),
            ),
            // Not an address as this build writes it: kept as text, exactly.
            ("http", "127.000.000.001", None, None),
            ("http", "[2001:DB8::1]", None, None),
            ("http", "", None, None),
        ] {
            shapes.push(RawRecord {
                scheme: scheme.into(),
                host: host.into(),
                proxy_type: proxy_type.map(str::to_owned),
                origin: origin.map(str::to_owned),
                port: 65535,
                added_unix_ms: u64::MAX,
                ..RawRecord::default()
            });
        }
        for raw in shapes {
            let row = raw.encode();
            assert_eq!(row.first(), Some(&RECORD_BINARY), "{raw:?}");
            assert_eq!(RawRecord::decode(&row), Ok(raw));
        }
    }

    /// What the binary shape cannot hold exactly stays JSON, and reads back as it was.
    #[test]
    fn records_the_binary_shape_cannot_hold_stay_json() {
        let odd = |f: fn(&mut RawRecord)| {
            let mut r = full_record();
            f(&mut r);
            r
        };
        for raw in [
            odd(|r| r.username = Some("alice".into())),
            odd(|r| r.password = Some("s@cret".into())),
            odd(|r| r.scheme = "HTTP".into()),
            odd(|r| r.scheme = "gopher".into()),
            odd(|r| r.proxy_type = Some("Residential".into())),
            odd(|r| r.origin = Some("janitor".into())),
            odd(|r| r.credentials = Some("not base64!".into())),
            // Base64 that decodes, but not to the same text again.
            odd(|r| r.credentials = Some("AB==".into())),
        ] {
            let row = raw.encode();
            assert_eq!(row.first(), Some(&b'{'), "{raw:?}");
            assert_eq!(RawRecord::decode(&row), Ok(raw));
        }
    }

    /// A binary record cut short, with a byte too many, or with a value no build writes is
    /// an error (the record is reported corrupt), never a panic or a wrong record.
    #[test]
    fn broken_binary_records_are_refused() {
        let row = full_record().encode();
        for len in 0..row.len() {
            assert!(RawRecord::decode(&row[..len]).is_err(), "cut at {len}");
        }
        let mut longer = row.clone();
        longer.push(0);
        assert!(RawRecord::decode(&longer).is_err());
        let plain = plain_record().encode();
        let with = |i: usize, b: u8| {
            let mut r = plain.clone();
            r[i] = b;
            r
        };
        for broken in [
            with(1, plain[1] & !7 | 6), // scheme code 6
            with(2, plain[2] | 0x80),   // an unknown field
            with(2, HOST_V4 | HOST_V6), // two host forms
            with(2, HAS_SOURCE),        // the address read as a text host of 127 bytes
        ] {
            assert!(RawRecord::decode(&broken).is_err(), "{broken:?}");
        }
        let mut domain = RawRecord {
            host: "ab".into(),
            ..plain_record()
        }
        .encode();
        domain[4] = 0xff; // not UTF-8
        assert!(RawRecord::decode(&domain).is_err());
    }

    /// A check as the checker writes one for a list upstream that passed.
    fn passed_check() -> CheckRecord {
        CheckRecord {
            checked_unix_ms: 1_796_000_000_123,
            passed: true,
            anonymity: Some("elite".into()),
            exit_ip: Some("203.0.113.77".into()),
            latency_ms: Some(412),
            judge: Some("http://judge.example.net/azenv.php".into()),
            error: None,
            failing_since_unix_ms: None,
            leak: None,
            tampered: None,
            integrity_passes: 4,
            integrity_since_unix_ms: Some(1_795_990_000_000),
        }
    }

    /// Check rows of every shape read back as written, in a third of their JSON's bytes; the
    /// JSON rows of earlier builds still read.
    #[test]
    fn binary_check_rows_read_back_as_written() {
        let passed = passed_check();
        let row = passed.encode();
        assert_eq!(row.first(), Some(&CHECK_BINARY));
        let json = serde_json::to_vec(&passed).unwrap();
        assert!(
            row.len() * 3 < json.len(),
            "{} against {}",
            row.len(),
            json.len()
        );
        let failed = CheckRecord {
            passed: false,
            anonymity: None,
            exit_ip: None,
            latency_ms: None,
            error: Some("connect: refused \u{e9}".into()),
            failing_since_unix_ms: Some(0),
            leak: Some("the gateway's address".into()),
            tampered: Some("rewrote a body".into()),
            integrity_passes: u32::MAX,
            integrity_since_unix_ms: None,
            ..passed_check()
        };
        for c in [passed, failed, CheckRecord::default()] {
            assert_eq!(CheckRecord::decode(&c.encode()), Some(c.clone()));
            assert_eq!(
                CheckRecord::decode(&serde_json::to_vec(&c).unwrap()),
                Some(c)
            );
        }
    }

    /// A broken check row reads as none (never checked), never as a wrong check or a panic.
    #[test]
    fn broken_check_rows_read_as_nothing() {
        let row = passed_check().encode();
        for len in 0..row.len() {
            assert_eq!(CheckRecord::decode(&row[..len]), None, "cut at {len}");
        }
        let mut longer = row.clone();
        longer.push(0);
        assert_eq!(CheckRecord::decode(&longer), None);
        let mut unknown = row.clone();
        unknown[2] |= 0x80; // a flag past the last field
        assert_eq!(CheckRecord::decode(&unknown), None);
        assert_eq!(CheckRecord::decode(&[2, 0, 0, 1, 0]), None);
    }
}
