//! Entry points of the fuzz targets (`fuzz/`), not an API: each takes arbitrary bytes and must
//! return without panicking, whatever they hold.

use std::sync::OnceLock;

use proxygate_core::UpstreamId;

use crate::crypto::{Key, KeyOrigin, Keyring, seal};
use crate::record::context;

fn ring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| Keyring::new(Key::from_bytes([7; 32]), KeyOrigin::Env))
}

/// A stored record as read back at load (binary or JSON, then the credentials envelope). The
/// first 8 bytes pick the record id the envelope is bound to. Whatever reads as a record must
/// be written back in a shape that reads as the same record.
pub fn sealed_record(data: &[u8]) {
    let (id, bytes) = split_id(data);
    let _ = crate::store::decode_record(ring(), id, bytes);
    if let Ok(raw) = crate::record::RawRecord::decode(bytes) {
        assert_eq!(
            crate::record::RawRecord::decode(&raw.encode()).as_ref(),
            Ok(&raw)
        );
    }
}

/// A raw envelope: under the fuzz key as is, and re-sealed, which must open to the same bytes.
pub fn envelope(data: &[u8]) {
    let (id, bytes) = split_id(data);
    let _ = ring().open(&context(id), bytes);
    let sealed = seal(ring().primary(), &context(id), bytes);
    let opened = ring().open(&context(id), &sealed);
    assert_eq!(opened.as_deref().map(Vec::as_slice), Ok(bytes));
}

/// A stats row as read back at load (binary, or the JSON of schema 4): whatever reads must
/// write back to a row that reads the same (compared as rows: a rate may be NaN).
pub fn stats_row(data: &[u8]) {
    if let Some(stats) = crate::Stats::decode(data) {
        let row = stats.encode();
        let again = crate::Stats::decode(&row).map(|s| s.encode());
        assert_eq!(again.as_deref(), Some(row.as_slice()));
    }
}

/// A stored check row as read back at load (binary, or the JSON before schema 6): whatever
/// reads must write back to a row that reads the same.
pub fn check_row(data: &[u8]) {
    if let Some(check) = crate::CheckRecord::decode(data) {
        let row = check.encode();
        assert_eq!(crate::CheckRecord::decode(&row).as_ref(), Some(&check));
    }
}

fn split_id(data: &[u8]) -> (UpstreamId, &[u8]) {
    let mut id = [0u8; 8];
    let n = data.len().min(8);
    id[..n].copy_from_slice(&data[..n]);
    (UpstreamId(u64::from_be_bytes(id)), &data[n..])
}

/// A record with sealed credentials under the fuzz key, as [`sealed_record`] takes it (the
/// seed of its corpus).
pub fn sample_record() -> Vec<u8> {
    use crate::record::{Origin, RawRecord, Record};
    let upstream = match proxygate_core::Upstream::parse("socks5h://user:pass@192.0.2.9:1080") {
        Ok(u) => u,
        Err(e) => unreachable!("a fixed upstream: {e}"),
    };
    let id = UpstreamId(42);
    let mut raw = RawRecord::from_record(&Record::new(upstream, Origin::Operator, 1));
    let plain = br#"{"username":"user","password":"pass"}"#;
    raw.credentials = Some(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        seal(ring().primary(), &context(id), plain),
    ));
    let mut out = id.0.to_be_bytes().to_vec();
    out.extend(raw.encode());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed seed of fuzz target `target`.
    fn committed(target: &str, name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../fuzz/seeds/{target}/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The committed seeds of `stats_row` read as the shapes they stand for, so the fuzzer
    /// starts from rows past the first byte.
    #[test]
    fn the_committed_stats_seeds_read() {
        let seed = |name: &str| committed("stats_row", name);
        let measured = crate::Stats::decode(&seed("binary_measured")).unwrap();
        assert_eq!((measured.reputation, measured.total_uses), (87, 1_234_567));
        assert!(measured.latency_histogram.is_some());
        assert_eq!(
            crate::Stats::decode(&seed("binary_fresh")),
            Some(crate::Stats::default())
        );
        assert_eq!(
            crate::Stats::decode(&seed("json_schema4"))
                .unwrap()
                .failures,
            46_296
        );
        for name in ["binary_measured", "binary_fresh", "json_schema4"] {
            stats_row(&seed(name));
        }
    }

    /// The committed seeds of `check_row`, binary and JSON, read as the same check.
    #[test]
    fn the_committed_check_seeds_read() {
        let seed = |name: &str| committed("check_row", name);
        let json = crate::CheckRecord::decode(&seed("json_schema5")).unwrap();
        assert_eq!(json.latency_ms, Some(412));
        assert_eq!(
            crate::CheckRecord::decode(&seed("binary_passed")),
            Some(json)
        );
        for name in ["binary_passed", "json_schema5"] {
            check_row(&seed(name));
        }
    }

    #[test]
    fn the_sample_and_the_committed_seed_decode_with_their_credentials() {
        for bytes in [
            sample_record(),
            include_bytes!("../../fuzz/seeds/sealed_record/with_credentials").to_vec(),
            include_bytes!("../../fuzz/seeds/sealed_record/binary_with_credentials").to_vec(),
        ] {
            let (id, rest) = split_id(&bytes);
            let Ok(record) = crate::store::decode_record(ring(), id, rest) else {
                panic!("does not decode: {}", String::from_utf8_lossy(rest));
            };
            let creds = record.upstream.credentials.as_ref().unwrap();
            assert_eq!(creds.password.expose(), "pass");
        }
    }
}
