//! Schema migrations: an ordered list, each run once, idempotent and safe to interrupt. Part
//! of the store (`Store::open` runs them, and they rewrite its trees in place), hence a child
//! module of it.
//!
//! The schema version lives in the `meta` tree. A migration rewrites records one at a time
//! (each write whole), skips records already in the new shape, and the version is raised only
//! after its last record is flushed: killed halfway, the next open runs it again and it
//! finishes.
//!
//! | version | shape |
//! |---|---|
//! | 1 | `{scheme, host, port, country?, username?, password?}` in plaintext, no stats |
//! | 2 | + `proxy_type`, `origin`, `disabled`, `added_unix_ms`; a `stats` row per upstream |
//! | 3 | credentials sealed in an AES-256-GCM envelope; no plaintext left |
//! | 4 | origin `source` with the source's name; `checks` tree; per-source stats (`sources`) |
//! | 5 | stats rows binary (`Stats::encode`) rather than JSON, a quarter of the bytes |
//! | 6 | records binary (`RawRecord::encode`) where they fit, an eighth of the bytes; check rows binary (`CheckRecord::encode`), a third |

use super::Store;
use crate::record::{PlainCredentials, RawRecord, key_id};
use crate::{CheckRecord, Stats, StoreError};

/// The schema this build reads and writes.
pub const CURRENT_VERSION: u32 = 6;

type Step = fn(&Store) -> Result<(), StoreError>;

/// `(version it produces, name, step)`, in order.
const MIGRATIONS: [(u32, &str, Step); 5] = [
    (2, "add_reputation_fields", add_reputation_fields),
    (3, "encrypt_credentials", encrypt_credentials),
    (4, "list_sources", list_sources),
    (5, "binary_stats", binary_stats),
    (6, "binary_records", binary_records),
];

/// Version 4 only adds: records may carry origin `source`, which older builds cannot read
/// (hence the version), and the `checks` tree (opened, so created, by every open). No record
/// changes shape.
fn list_sources(_store: &Store) -> Result<(), StoreError> {
    Ok(())
}

/// Rewrites each JSON row of `tree` (first byte `{`) as `binary` makes it from its key and
/// bytes, compare-and-swap so that a row written meanwhile stays; a row `binary` leaves
/// (`None`) stays as it is.
fn rewrite_json_rows(
    store: &Store,
    tree: &sled::Tree,
    binary: impl Fn(&[u8], &[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<(), StoreError> {
    for item in tree {
        let (k, v) = item.map_err(store.err())?;
        if v.first() != Some(&b'{') {
            continue;
        }
        let Some(row) = binary(&k, &v)? else {
            continue;
        };
        let _ = tree
            .compare_and_swap(&k, Some(v), Some(row))
            .map_err(store.err())?;
    }
    Ok(())
}

/// Version 5: every JSON stats row rewritten in the binary shape (a row the persister wrote
/// meanwhile stays). Rows that read as neither are left: they read as fresh stats, as before.
/// Older builds would read binary rows as fresh stats without a word, hence the version: they
/// refuse the data dir instead.
fn binary_stats(store: &Store) -> Result<(), StoreError> {
    rewrite_json_rows(store, &store.stats, |_, v| {
        Ok(Stats::decode(v).map(|s| s.encode()))
    })
}

/// Version 6: every JSON record rewritten in the binary shape where it fits (those that do
/// not stay JSON, still read), and every JSON check row in its binary shape (rows that read
/// as neither are left, as never checked). Older builds would refuse binary records as
/// corrupt, one by one, and forget binary checks, hence the version: they refuse the data
/// dir instead.
fn binary_records(store: &Store) -> Result<(), StoreError> {
    rewrite_json_rows(store, &store.checks, |_, v| {
        Ok(CheckRecord::decode(v).map(|c| c.encode()))
    })?;
    rewrite_json_rows(store, &store.upstreams, |k, v| {
        let Some(id) = key_id(k) else {
            return Ok(None);
        };
        let bytes = RawRecord::decode_of(id, v)?.encode();
        Ok((bytes.first() != Some(&b'{')).then_some(bytes))
    })
}

/// Applies every migration past `from`; returns their names.
pub(crate) fn run(store: &mut Store, from: u32) -> Result<Vec<&'static str>, StoreError> {
    let mut applied = Vec::new();
    for (to, name, step) in MIGRATIONS {
        if to <= from {
            continue;
        }
        step(store)?;
        store.flush()?;
        set_version(store, to)?;
        tracing::info!(
            migration = name,
            schema_version = to,
            "migrated the data dir"
        );
        applied.push(name);
    }
    if store
        .meta
        .get("schema_version")
        .map_err(store.err())?
        .is_none()
    {
        set_version(store, CURRENT_VERSION.max(from))?;
    }
    Ok(applied)
}

fn set_version(store: &Store, v: u32) -> Result<(), StoreError> {
    store
        .meta
        .insert("schema_version", &v.to_be_bytes())
        .map_err(store.err())?;
    store.flush()
}

/// Calls `f` on every record; writes back the ones it changed (compare-and-swap, so a
/// concurrent writer's version is never overwritten with a stale one).
fn for_each_record(
    store: &Store,
    mut f: impl FnMut(&Store, proxygate_core::UpstreamId, &mut RawRecord) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for item in &store.upstreams {
        let (k, v) = item.map_err(store.err())?;
        let Some(id) = key_id(&k) else { continue };
        let mut raw = RawRecord::decode_of(id, &v)?;
        if f(store, id, &mut raw)? {
            let _ = store
                .upstreams
                .compare_and_swap(&k, Some(v), Some(raw.encode()))
                .map_err(store.err())?;
        }
    }
    Ok(())
}

/// Version 2: every upstream gets its reputation fields at their defaults (reputation 50,
/// nothing measured, proxy type `datacenter`).
fn add_reputation_fields(store: &Store) -> Result<(), StoreError> {
    let default = serde_json::to_vec(&Stats::default()).unwrap_or_default();
    for_each_record(store, |store, id, raw| {
        let _ = store
            .stats
            .compare_and_swap(
                id.0.to_be_bytes(),
                None as Option<&[u8]>,
                Some(default.clone()),
            )
            .map_err(store.err())?;
        if raw.proxy_type.is_some() {
            return Ok(false);
        }
        raw.proxy_type = Some("datacenter".into());
        raw.origin.get_or_insert_with(|| "operator".into());
        Ok(true)
    })
}

/// Version 3: plaintext credentials are sealed with the primary key.
fn encrypt_credentials(store: &Store) -> Result<(), StoreError> {
    for_each_record(store, |store, id, raw| {
        if raw.username.is_none() && raw.password.is_none() {
            return Ok(false);
        }
        let creds = PlainCredentials {
            username: raw.username.take().unwrap_or_default(),
            password: raw.password.take().unwrap_or_default(),
        };
        store.encode(id, raw, Some(&creds));
        Ok(true)
    })
}
