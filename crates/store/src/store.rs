//! [`Store`]: the data dir. Opening it takes the lock, refuses a newer schema, resolves the
//! key and runs the pending migrations; then it reads and writes our own types.
//!
//! Trees: `upstreams` (id -> record), `stats` (id -> [`Stats`]), `checks` (id ->
//! [`CheckRecord`]), `settings` (name -> value), `sources` (name -> [`SourceStats`]), `meta`
//! (`schema_version`, `key_id`, `rotation`).
//! Every operator-facing write is followed by [`Store::flush`] before it is acknowledged;
//! live stats are written behind, once per interval, by the caller's persister.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use proxygate_core::{Credentials, Secret, UpstreamId};

use crate::crypto::{self, Key, KeyId, KeyOrigin, Keyring, OpenError};
use crate::record::{PlainCredentials, RawRecord, context, id_key, key_id};
use crate::{CheckRecord, Record, SourceStats, Stats, StoreError};

pub mod migrate;

use migrate::CURRENT_VERSION;

/// The sled database's directory inside the data dir.
const DB_DIR: &str = "db";

pub mod segments;

/// The open data dir.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    upstreams: sled::Tree,
    stats: sled::Tree,
    settings: sled::Tree,
    checks: sled::Tree,
    sources: sled::Tree,
    meta: sled::Tree,
    /// Swapped whole by a rotation, which runs beside readers and writers (live rotation).
    keys: RwLock<Keyring>,
}

/// What opening did beyond reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Migrations applied, by name, in order.
    pub migrated: Vec<&'static str>,
    /// The key file was created.
    pub generated_key: Option<PathBuf>,
    /// A rotation was started and not finished (`proxygate key rotate` finishes it).
    pub rotation_pending: Option<KeyId>,
}

/// Progress of a key rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationProgress {
    pub reencrypted: usize,
    pub left: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("keys", &*self.ring())
            .finish_non_exhaustive()
    }
}

/// Whether sled failed because another handle (another process, or one of ours being
/// dropped) holds the database's file lock.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

pub(crate) fn db_err(dir: &Path) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |e| match e {
        e if is_lock_error(&e) => StoreError::Locked {
            dir: dir.to_owned(),
        },
        other => StoreError::Db {
            dir: dir.to_owned(),
            message: other.to_string(),
        },
    }
}

fn read_u32(tree: &sled::Tree, name: &str, dir: &Path) -> Result<Option<u32>, StoreError> {
    Ok(tree
        .get(name)
        .map_err(db_err(dir))?
        .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
        .map(u32::from_be_bytes))
}

/// The schema version `db` holds: its `meta` record, else 1 for data from before versions were
/// written, else (a new database) the current one. Creates nothing.
fn stored_version(db: &sled::Db, dir: &Path) -> Result<u32, StoreError> {
    let names = db.tree_names();
    let exists = |name: &str| names.iter().any(|n| n.as_ref() == name.as_bytes());
    let tree = |name: &str| db.open_tree(name).map_err(db_err(dir));
    let stored = match exists("meta") {
        true => read_u32(&tree("meta")?, "schema_version", dir)?,
        false => None,
    };
    Ok(match stored {
        Some(v) => v,
        None if exists("upstreams") && !tree("upstreams")?.is_empty() => 1,
        None => CURRENT_VERSION,
    })
}

impl Store {
    /// Whether `dir` holds a data dir (a database, at least; also one caught between the
    /// two renames of a segment resize, which the next open finishes).
    pub fn exists(dir: &Path) -> bool {
        let path = dir.join(DB_DIR);
        path.exists() || segments::set_aside(&path).exists()
    }

    /// Opens (creating when missing) the data dir. `env_key` is `ENCRYPTION_KEY`'s value.
    pub fn open(dir: &Path, env_key: Option<&str>) -> Result<(Store, OpenReport), StoreError> {
        if !dir.exists() {
            // The data dir holds the key file and the credentials: owner only.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError::io(dir, e))?;
        }
        let path = dir.join(DB_DIR);
        segments::finish_resize(&path).map_err(|e| StoreError::io(&path, e))?;
        let stored_segments = segments::stored_size(&path);
        let db = segments::sized(&path, stored_segments.unwrap_or(segments::SIZE))
            .open()
            .map_err(db_err(dir))?;
        // Look before creating anything: a newer data dir must be left exactly as it is.
        let version = stored_version(&db, dir)?;
        if version > CURRENT_VERSION {
            return Err(StoreError::NewerSchema {
                dir: dir.to_owned(),
                found: version,
                supported: CURRENT_VERSION,
            });
        }
        let db = match stored_segments {
            Some(old) if old != segments::SIZE => {
                drop(db);
                match segments::resize(&path, old, dir) {
                    Ok(db) => db,
                    // Out of disk, say: the database works as it is, only with more writes.
                    Err(e) => {
                        tracing::warn!(
                            "could not copy the database to larger log segments ({e}); it keeps \
                             segments of {old} bytes until a later start manages"
                        );
                        segments::finish_resize(&path).map_err(|e| StoreError::io(&path, e))?;
                        // Read again: finishing may have swapped the larger copy in.
                        segments::open_waiting(segments::config(&path), dir)?
                    }
                }
            }
            _ => db,
        };
        let tree = |name: &str| db.open_tree(name).map_err(db_err(dir));
        let meta = tree("meta")?;
        let upstreams = tree("upstreams")?;
        let mut report = OpenReport::default();
        let keys = Self::resolve_keys(dir, env_key, &meta, &mut report)?;
        let stats = tree("stats")?;
        let settings = tree("settings")?;
        let checks = tree("checks")?;
        let sources = tree("sources")?;
        let mut store = Store {
            dir: dir.to_owned(),
            upstreams,
            stats,
            settings,
            checks,
            sources,
            meta,
            keys: RwLock::new(keys),
            db,
        };
        report.migrated = migrate::run(&mut store, version)?;
        if store.meta.get("key_id").map_err(db_err(dir))?.is_none() {
            store
                .meta
                .insert("key_id", &store.ring().primary().id().0.to_be_bytes())
                .map_err(db_err(dir))?;
        }
        report.rotation_pending = store.finish_rotation_if_done()?;
        store.flush()?;
        Ok((store, report))
    }

    /// `ENCRYPTION_KEY`, else the key file, else a new key file (unless records need a key).
    fn resolve_keys(
        dir: &Path,
        env_key: Option<&str>,
        meta: &sled::Tree,
        report: &mut OpenReport,
    ) -> Result<Keyring, StoreError> {
        let file = dir.join(crypto::KEY_FILE);
        let mut ring = if let Some(text) = env_key {
            let key = Key::from_base64(text).map_err(|reason| StoreError::KeyEnv { reason })?;
            Keyring::new(key, KeyOrigin::Env)
        } else if file.exists() {
            Keyring::new(crypto::read_key_file(&file)?, KeyOrigin::File(file.clone()))
        } else {
            if let Some(expected) = read_u32(meta, "key_id", dir)? {
                return Err(StoreError::KeyMissing {
                    dir: dir.to_owned(),
                    expected: KeyId(expected),
                });
            }
            let key = Key::generate();
            crypto::write_key_file(&file, &key)?;
            report.generated_key = Some(file.clone());
            Keyring::new(key, KeyOrigin::File(file))
        };
        let next = dir.join(crypto::NEXT_KEY_FILE);
        if next.exists() {
            ring = ring.with(crypto::read_key_file(&next)?);
        }
        Ok(ring)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keys loaded now (a copy: a rotation may change them).
    pub fn keys(&self) -> Keyring {
        self.ring().clone()
    }

    /// The keyring; a panic elsewhere cannot leave it half-changed (it is replaced whole).
    fn ring(&self) -> RwLockReadGuard<'_, Keyring> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn ring_mut(&self) -> RwLockWriteGuard<'_, Keyring> {
        self.keys.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(read_u32(&self.meta, "schema_version", &self.dir)?.unwrap_or(CURRENT_VERSION))
    }

    fn err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        db_err(&self.dir)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(self.err())
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    pub fn contains(&self, id: UpstreamId) -> Result<bool, StoreError> {
        self.upstreams.contains_key(id_key(id)).map_err(self.err())
    }

    /// Every record, decrypted. Records that do not decrypt are all named in one error and
    /// left as they are.
    pub fn records(&self) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::with_capacity(self.upstreams.len());
        let mut failed = Vec::new();
        for item in &self.upstreams {
            let (k, v) = item.map_err(self.err())?;
            let id = key_id(&k).ok_or_else(|| StoreError::Corrupt {
                what: format!("key {k:?}"),
                reason: "not an upstream id".into(),
            })?;
            match self.decode(id, &v) {
                Ok(r) => out.push(r),
                Err(Decode::Crypto(e)) => failed.push((id, e.to_string())),
                Err(Decode::Corrupt(reason)) => {
                    return Err(StoreError::Corrupt {
                        what: id.to_string(),
                        reason,
                    });
                }
            }
        }
        if failed.is_empty() {
            return Ok(out);
        }
        let hint = self.rotation()?.map(|to| {
            format!(
                " (a rotation to key {to} is unfinished: run `proxygate key rotate` again, \
                 with --new-key-file when the key comes from {})",
                crypto::KEY_ENV
            )
        });
        Err(StoreError::Undecryptable {
            total: out.len() + failed.len(),
            loaded: self.ring().primary().id(),
            failed,
            hint,
        })
    }

    /// One record, decrypted.
    pub fn get(&self, id: UpstreamId) -> Result<Option<Record>, StoreError> {
        let Some(v) = self.upstreams.get(id_key(id)).map_err(self.err())? else {
            return Ok(None);
        };
        self.decode(id, &v).map(Some).map_err(|e| match e {
            Decode::Crypto(e) => StoreError::Undecryptable {
                total: 1,
                loaded: self.ring().primary().id(),
                failed: vec![(id, e.to_string())],
                hint: None,
            },
            Decode::Corrupt(reason) => StoreError::Corrupt {
                what: id.to_string(),
                reason,
            },
        })
    }

    fn decode(&self, id: UpstreamId, bytes: &[u8]) -> Result<Record, Decode> {
        decode_record(&self.ring(), id, bytes)
    }

    /// A record's credentials envelope as stored (base64), for an export that keeps them
    /// sealed.
    pub fn sealed(&self, id: UpstreamId) -> Result<Option<String>, StoreError> {
        let Some(v) = self.upstreams.get(id_key(id)).map_err(self.err())? else {
            return Ok(None);
        };
        RawRecord::decode_of(id, &v).map(|raw| raw.credentials)
    }

    /// Opens an envelope exported from record `id` (of this or another data dir with a key
    /// this keyring holds).
    pub fn unseal(&self, id: UpstreamId, sealed: &str) -> Result<Credentials, String> {
        let envelope = BASE64
            .decode(sealed)
            .map_err(|_| OpenError::Malformed.to_string())?;
        let plain = self
            .ring()
            .open(&context(id), &envelope)
            .map_err(|e| e.to_string())?;
        let c: PlainCredentials =
            serde_json::from_slice(&plain).map_err(|_| OpenError::Malformed.to_string())?;
        Ok(Credentials {
            username: Secret::new(c.username.as_str()),
            password: Secret::new(c.password.as_str()),
        })
    }

    /// The stored bytes of a record, sealed with the primary key.
    fn encode(&self, id: UpstreamId, raw: &mut RawRecord, creds: Option<&PlainCredentials>) {
        raw.username = None;
        raw.password = None;
        raw.credentials = creds.map(|c| {
            let plain = zeroize::Zeroizing::new(serde_json::to_vec(c).unwrap_or_default());
            BASE64.encode(crypto::seal(self.ring().primary(), &context(id), &plain))
        });
    }

    /// Adds or replaces a record (its stats are kept, or start at their defaults). Returns
    /// whether it is new. Not durable until [`Store::flush`].
    pub fn put(&self, record: &Record) -> Result<bool, StoreError> {
        let id = record.upstream.id();
        let mut raw = RawRecord::from_record(record);
        let creds = record
            .upstream
            .credentials
            .as_ref()
            .map(|c| PlainCredentials {
                username: c.username.expose().to_owned(),
                password: c.password.expose().to_owned(),
            });
        self.encode(id, &mut raw, creds.as_ref());
        // Stats first: a crash between the two leaves an orphan stats row (ignored), never a
        // record without stats.
        let default = Stats::default().encode();
        let _ = self
            .stats
            .compare_and_swap(id_key(id), None as Option<&[u8]>, Some(default))
            .map_err(self.err())?;
        let old = self
            .upstreams
            .insert(id_key(id), raw.encode())
            .map_err(self.err())?;
        Ok(old.is_none())
    }

    /// Removes a record, its stats and its check. Returns whether it existed.
    pub fn remove(&self, id: UpstreamId) -> Result<bool, StoreError> {
        let old = self.upstreams.remove(id_key(id)).map_err(self.err())?;
        self.stats.remove(id_key(id)).map_err(self.err())?;
        self.checks.remove(id_key(id)).map_err(self.err())?;
        Ok(old.is_some())
    }

    /// Sets a record's `disabled` flag and the janitor's reason for it (`None`: an
    /// operator's decision). Returns whether the record exists.
    pub fn set_disabled_because(
        &self,
        id: UpstreamId,
        disabled: bool,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let Some(v) = self.upstreams.get(id_key(id)).map_err(self.err())? else {
            return Ok(false);
        };
        let mut raw = RawRecord::decode_of(id, &v)?;
        raw.disabled = disabled;
        raw.disabled_reason = reason.map(str::to_owned);
        self.upstreams
            .insert(id_key(id), raw.encode())
            .map_err(self.err())?;
        Ok(true)
    }

    /// Writes check rows ([`CheckRecord::encode`]; upstreams removed meanwhile are skipped),
    /// each on its own: see [`Store::write_stats`] for why not a sled batch. Not durable until
    /// [`Store::flush`].
    pub fn put_checks<'a>(
        &self,
        rows: impl IntoIterator<Item = (UpstreamId, &'a [u8])>,
    ) -> Result<(), StoreError> {
        self.insert_present(&self.checks, rows, <[u8]>::to_vec)
            .map(|_| ())
    }

    /// Inserts each row of an upstream that still has a record into `tree`, one by one (not a
    /// sled batch: see [`Store::write_stats`]), encoding only those; returns how many. Not
    /// flushed.
    fn insert_present<'a, T: ?Sized + 'a>(
        &self,
        tree: &sled::Tree,
        rows: impl IntoIterator<Item = (UpstreamId, &'a T)>,
        encode: impl Fn(&T) -> Vec<u8>,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for (id, row) in rows {
            if self.contains(id)? {
                tree.insert(id_key(id), encode(row)).map_err(self.err())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every upstream's last check, as its stored row ([`CheckRecord::decode`] reads it); rows
    /// that do not read are left out.
    pub fn check_rows(&self) -> Result<HashMap<UpstreamId, Box<[u8]>>, StoreError> {
        let mut out = HashMap::with_capacity(self.checks.len());
        for item in &self.checks {
            let (k, v) = item.map_err(self.err())?;
            if let Some(id) = key_id(&k)
                && CheckRecord::decode(&v).is_some()
            {
                out.insert(id, Box::from(&*v));
            }
        }
        Ok(out)
    }

    /// One source's stats (defaults for a source never fetched).
    pub fn source_stats(&self, name: &str) -> Result<SourceStats, StoreError> {
        Ok(self
            .sources
            .get(name)
            .map_err(self.err())?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// Replaces one source's stats. Not durable until [`Store::flush`].
    pub fn put_source_stats(&self, name: &str, s: &SourceStats) -> Result<(), StoreError> {
        self.sources
            .insert(name, serde_json::to_vec(s).unwrap_or_default())
            .map(|_| ())
            .map_err(self.err())
    }

    /// Sets a record's `disabled` flag. Returns whether the record exists.
    pub fn set_disabled(&self, id: UpstreamId, disabled: bool) -> Result<bool, StoreError> {
        let Some(v) = self.upstreams.get(id_key(id)).map_err(self.err())? else {
            return Ok(false);
        };
        let mut raw = RawRecord::decode_of(id, &v)?;
        raw.disabled = disabled;
        self.upstreams
            .insert(id_key(id), raw.encode())
            .map_err(self.err())?;
        Ok(true)
    }

    pub fn stats(&self, id: UpstreamId) -> Result<Stats, StoreError> {
        Ok(self
            .stats
            .get(id_key(id))
            .map_err(self.err())?
            .and_then(|v| Stats::decode(&v))
            .unwrap_or_default())
    }

    /// Stats of every upstream that has a record.
    pub fn all_stats(&self) -> Result<HashMap<UpstreamId, Stats>, StoreError> {
        let mut out = HashMap::with_capacity(self.stats.len());
        for item in &self.stats {
            let (k, v) = item.map_err(self.err())?;
            if let (Some(id), Some(s)) = (key_id(&k), Stats::decode(&v)) {
                out.insert(id, s);
            }
        }
        Ok(out)
    }

    /// Writes stats (upstreams removed meanwhile are skipped), then flushes once. This is the
    /// persister's one write per interval. Each upstream's record stands alone, so a crash
    /// midway keeps those written, and the persister writes every one of them again after an
    /// error.
    ///
    /// Row by row, not in sled batches. Once the database outgrew a 16 MiB log segment, each
    /// batch cost ~4 MiB of storage writes, likely because sled rolls its log's IO buffer twice
    /// per batch (`pin_log`; each roll a write and a `sync_file_range`). The `store_writes`
    /// bench, 20,000 changed rows of 200,000: 276 MiB in batches of 256, 4.1 MiB row by row.
    /// One batch of the whole flush writes a little more than row by row but holds it all in
    /// memory at once (`tests/bench/results-2026-11-30.md`, "Stats row by row").
    pub fn write_stats<'a>(
        &self,
        stats: impl IntoIterator<Item = (UpstreamId, &'a Stats)>,
    ) -> Result<usize, StoreError> {
        let n = self.insert_present(&self.stats, stats, Stats::encode)?;
        self.flush()?;
        Ok(n)
    }

    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .settings
            .get(name)
            .map_err(self.err())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Sets (`Some`) or clears (`None`) a setting. Not durable until [`Store::flush`].
    pub fn set_setting(&self, name: &str, value: Option<&str>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.settings.insert(name, v.as_bytes()).map(|_| ()),
            None => self.settings.remove(name).map(|_| ()),
        }
        .map_err(self.err())
    }

    /// The key the data dir's records are sealed with (the old one during a rotation).
    pub fn key_id(&self) -> Result<Option<KeyId>, StoreError> {
        read_u32(&self.meta, "key_id", &self.dir).map(|v| v.map(KeyId))
    }

    /// The key id a started rotation moves records to.
    pub fn rotation(&self) -> Result<Option<KeyId>, StoreError> {
        read_u32(&self.meta, "rotation", &self.dir).map(|v| v.map(KeyId))
    }

    /// Starts (or resumes) re-encrypting every record under `next`; durable before it
    /// returns. `next` joins the keyring and seals everything from now on.
    pub fn begin_rotation(&self, next: Key) -> Result<(), StoreError> {
        if let Some(to) = self.rotation()?
            && to != next.id()
        {
            return Err(StoreError::Rotation(format!(
                "a rotation to key {to} is unfinished; finish it with that key first (given \
                 key {})",
                next.id()
            )));
        }
        let mut ring = self.ring_mut();
        let old = ring.primary.clone();
        if self.rotation()? == Some(next.id()) && old.id() == next.id() {
            // Resuming: opening already made the next key primary.
            return Ok(());
        }
        if old.id() == next.id() {
            return Err(StoreError::Rotation(format!(
                "the new key is the current key ({})",
                old.id()
            )));
        }
        // The marker first: a crash before the new key seals anything leaves a rotation that
        // the next start resumes, never a record under a key the data dir does not expect.
        self.meta
            .insert("rotation", &next.id().0.to_be_bytes())
            .map_err(self.err())?;
        self.flush()?;
        ring.others.retain(|k| k.id() != next.id());
        ring.primary = next;
        ring.others.push(old);
        Ok(())
    }

    /// Re-encrypts up to `limit` records not yet under the primary key; flushes. Safe to
    /// interrupt at any point: each record is rewritten whole, and both keys open it.
    pub fn rotate_some(&self, limit: usize) -> Result<RotationProgress, StoreError> {
        let primary = self.ring().primary.id();
        let mut progress = RotationProgress {
            reencrypted: 0,
            left: 0,
        };
        for item in &self.upstreams {
            let (k, v) = item.map_err(self.err())?;
            let Some(id) = key_id(&k) else { continue };
            let mut raw = RawRecord::decode_of(id, &v)?;
            let Some(b64) = &raw.credentials else {
                continue;
            };
            let envelope = BASE64.decode(b64).unwrap_or_default();
            if crypto::envelope_key(&envelope) == Some(primary) {
                continue;
            }
            if progress.reencrypted == limit {
                progress.left += 1;
                continue;
            }
            let plain = self.ring().open(&context(id), &envelope).map_err(|e| {
                StoreError::Rotation(format!(
                    "record {id} does not decrypt: {e}; nothing changed"
                ))
            })?;
            let creds: PlainCredentials = serde_json::from_slice(&plain).map_err(|e| {
                StoreError::Rotation(format!("record {id} holds no credentials: {e}"))
            })?;
            self.encode(id, &mut raw, Some(&creds));
            // Only if nobody changed the record meanwhile; otherwise the next pass sees it.
            let _ = self
                .upstreams
                .compare_and_swap(&k, Some(v), Some(raw.encode()))
                .map_err(self.err())?;
            progress.reencrypted += 1;
        }
        self.flush()?;
        Ok(progress)
    }

    /// Ends a rotation whose records are all under the primary key: records the primary as
    /// the data dir's key and drops the marker. The caller has already made the new key the
    /// one the next start loads (renamed the key file, or told the operator).
    pub fn end_rotation(&self) -> Result<(), StoreError> {
        let primary = self.ring().primary.id();
        self.meta
            .insert("key_id", &primary.0.to_be_bytes())
            .map_err(self.err())?;
        self.meta.remove("rotation").map_err(self.err())?;
        self.flush()?;
        self.ring_mut().others.clear();
        Ok(())
    }

    /// At open: a rotation whose key file was already swapped in is finished here.
    fn finish_rotation_if_done(&self) -> Result<Option<KeyId>, StoreError> {
        let Some(to) = self.rotation()? else {
            return Ok(None);
        };
        let next_file = self.dir.join(crypto::NEXT_KEY_FILE);
        if self.ring().primary.id() == to && !next_file.exists() && self.rotate_some(0)?.left == 0 {
            self.end_rotation()?;
            return Ok(None);
        }
        // Seal new records with the next key already, so the rotation has less to do.
        let mut ring = self.ring_mut();
        if let Some(next) = ring.get(to).cloned()
            && next.id() != ring.primary.id()
        {
            let old = std::mem::replace(&mut ring.primary, next);
            ring.others.retain(|k| k.id() != to);
            ring.others.push(old);
        }
        Ok(Some(to))
    }
}

pub(crate) enum Decode {
    Crypto(OpenError),
    Corrupt(String),
}

/// Record `id` as stored (JSON, credentials in a sealed envelope) back to the domain record:
/// what a load runs on every stored record, and so what the fuzz target feeds.
pub(crate) fn decode_record(
    ring: &Keyring,
    id: UpstreamId,
    bytes: &[u8],
) -> Result<Record, Decode> {
    let raw = RawRecord::decode(bytes).map_err(Decode::Corrupt)?;
    let creds = match &raw.credentials {
        Some(b64) => {
            let envelope = BASE64
                .decode(b64)
                .map_err(|_| Decode::Crypto(OpenError::Malformed))?;
            let plain = ring.open(&context(id), &envelope).map_err(Decode::Crypto)?;
            Some(
                serde_json::from_slice::<PlainCredentials>(&plain)
                    .map_err(|_| Decode::Crypto(OpenError::Malformed))?,
            )
        }
        None => None,
    };
    raw.to_record(creds).map_err(Decode::Corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Origin;
    use proxygate_core::Upstream;

    fn record(url: &str) -> Record {
        Record::new(Upstream::parse(url).unwrap(), Origin::Operator, 1)
    }

    fn open(dir: &Path) -> Store {
        reopen(dir, None).unwrap().0
    }

    /// sled lets go of its file lock when its background threads drop the database, which
    /// can be a moment after the last handle is dropped: an open in the same process retries
    /// while `locked` says the lock is the error (one held by anything else still fails
    /// after the deadline).
    fn waiting<T, E>(
        mut open: impl FnMut() -> Result<T, E>,
        locked: impl Fn(&E) -> bool,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open() {
                Err(e) if locked(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => return other,
            }
        }
    }

    fn reopen(dir: &Path, key: Option<&str>) -> Result<(Store, OpenReport), StoreError> {
        waiting(
            || Store::open(dir, key),
            |e| matches!(e, StoreError::Locked { .. }),
        )
    }

    /// The raw database, as test code that builds or inspects old shapes opens it.
    fn sled_open(path: PathBuf) -> sled::Result<sled::Db> {
        waiting(|| segments::config(&path).open(), is_lock_error)
    }

    const URLS: [&str; 3] = [
        "socks5://alice:s%40cret%3A1@10.0.0.1:1080?country=us",
        "http://bob:hunter2@proxy.example:3128",
        "https://10.0.0.3:443?proxy_type=residential",
    ];

    #[test]
    fn round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert!(report.generated_key.is_some());
        for url in URLS {
            assert!(store.put(&record(url)).unwrap());
        }
        assert!(!store.put(&record(URLS[0])).unwrap(), "same id: replaced");
        store.set_setting("strategy", Some("random")).unwrap();
        store.flush().unwrap();
        drop(store);
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(report, OpenReport::default());
        let mut got = store.records().unwrap();
        got.sort_by_key(|r| r.upstream.port);
        let mut want: Vec<_> = URLS.iter().map(|u| record(u)).collect();
        want.sort_by_key(|r| r.upstream.port);
        assert_eq!(got, want);
        assert_eq!(
            store.setting("strategy").unwrap().as_deref(),
            Some("random")
        );
        assert_eq!(
            store.stats(want[0].upstream.id()).unwrap(),
            Stats::default()
        );
        // Nothing in the database file shows a password or a username.
        drop(store);
        let db = sled_open(dir.path().join(DB_DIR)).unwrap();
        let tree = db.open_tree("upstreams").unwrap();
        for item in &tree {
            let (_, v) = item.unwrap();
            let text = String::from_utf8_lossy(&v);
            assert!(
                !text.contains("hunter2") && !text.contains("alice"),
                "{text}"
            );
        }
    }

    #[test]
    fn wrong_key_names_records_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for url in URLS {
            store.put(&record(url)).unwrap();
        }
        store.flush().unwrap();
        drop(store);
        let other = Key::generate();
        let (store, _) = reopen(dir.path(), Some(&other.to_base64())).unwrap();
        let err = store.records().unwrap_err().to_string();
        let a = Upstream::parse(URLS[0]).unwrap().id().to_string();
        let b = Upstream::parse(URLS[1]).unwrap().id().to_string();
        assert!(
            err.contains("2 of 3") && err.contains(&a) && err.contains(&b),
            "{err}"
        );
        assert!(err.contains("not loaded"), "{err}");
        drop(store);
        // The right key still reads everything.
        assert_eq!(open(dir.path()).records().unwrap().len(), 3);
    }

    #[test]
    fn missing_key_with_sealed_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.put(&record(URLS[0])).unwrap();
        store.flush().unwrap();
        drop(store);
        std::fs::rename(
            dir.path().join(crate::KEY_FILE),
            dir.path().join("saved.key"),
        )
        .unwrap();
        let err = reopen(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("no key was given"), "{err}");
        assert!(
            !dir.path().join(crate::KEY_FILE).exists(),
            "no key generated over it"
        );
    }

    /// Rewrites record `id`'s stored bytes with `f` (as an attacker with disk access would).
    fn tamper(dir: &Path, id: UpstreamId, f: impl FnOnce(&mut RawRecord)) {
        let db = sled_open(dir.join(DB_DIR)).unwrap();
        let tree = db.open_tree("upstreams").unwrap();
        let mut raw = RawRecord::decode(&tree.get(id_key(id)).unwrap().unwrap()).unwrap();
        f(&mut raw);
        tree.insert(id_key(id), raw.encode()).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn tampered_and_swapped_envelopes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b) = (record(URLS[0]), record(URLS[1]));
        store.put(&a).unwrap();
        store.put(&b).unwrap();
        store.flush().unwrap();
        let a_env = RawRecord::decode(
            &store
                .upstreams
                .get(id_key(a.upstream.id()))
                .unwrap()
                .unwrap(),
        )
        .unwrap()
        .credentials
        .unwrap();
        drop(store);
        // One flipped bit in a's ciphertext.
        tamper(dir.path(), a.upstream.id(), |raw| {
            let mut env = BASE64.decode(raw.credentials.as_ref().unwrap()).unwrap();
            let last = env.len() - 1;
            env[last] ^= 0x80;
            raw.credentials = Some(BASE64.encode(env));
        });
        // a's (valid) envelope copied onto b.
        tamper(dir.path(), b.upstream.id(), |raw| {
            raw.credentials = Some(a_env.clone())
        });
        let store = open(dir.path());
        let err = store.records().unwrap_err().to_string();
        assert!(err.contains("2 of 2"), "{err}");
        assert!(err.contains("authentication failed"), "{err}");
        assert!(store.get(b.upstream.id()).is_err());
    }

    #[test]
    fn legacy_plaintext_records_are_migrated_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let a = record(URLS[0]);
        let c = record(URLS[2]);
        {
            // Version 1: no meta, plaintext credentials, no stats, no proxy_type.
            let db = sled_open(dir.path().join(DB_DIR)).unwrap();
            let tree = db.open_tree("upstreams").unwrap();
            let v1 = |r: &Record, user: Option<&str>, pass: Option<&str>| RawRecord {
                scheme: r.upstream.scheme.to_string(),
                host: r.upstream.host.to_string(),
                port: r.upstream.port,
                country: r.upstream.country.clone(),
                username: user.map(str::to_owned),
                password: pass.map(str::to_owned),
                ..RawRecord::default()
            };
            tree.insert(
                id_key(a.upstream.id()),
                v1(&a, Some("alice"), Some("s@cret:1")).encode_json(),
            )
            .unwrap();
            tree.insert(id_key(c.upstream.id()), v1(&c, None, None).encode_json())
                .unwrap();
            db.flush().unwrap();
        }
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(
            report.migrated,
            [
                "add_reputation_fields",
                "encrypt_credentials",
                "list_sources",
                "binary_stats",
                "binary_records"
            ]
        );
        assert_eq!(store.schema_version().unwrap(), CURRENT_VERSION);
        let got = store.get(a.upstream.id()).unwrap().unwrap();
        assert_eq!(got.upstream, a.upstream);
        // `proxy_type=residential` was not in the v1 shape: the default applies.
        assert_eq!(
            store
                .get(c.upstream.id())
                .unwrap()
                .unwrap()
                .upstream
                .proxy_type
                .as_str(),
            "datacenter"
        );
        assert_eq!(store.stats(a.upstream.id()).unwrap(), Stats::default());
        let raw = RawRecord::decode(
            &store
                .upstreams
                .get(id_key(a.upstream.id()))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert!(raw.password.is_none() && raw.username.is_none() && raw.credentials.is_some());
        for id in [a.upstream.id(), c.upstream.id()] {
            let row = store.upstreams.get(id_key(id)).unwrap().unwrap();
            assert_eq!(row.first(), Some(&1), "binary");
        }
        drop(store);
        // Idempotent: a second open migrates nothing and reads the same.
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert!(report.migrated.is_empty());
        assert_eq!(store.records().unwrap().len(), 2);
    }

    #[test]
    fn interrupted_migration_finishes_on_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = record(URLS[0]);
        store.put(&a).unwrap();
        // As if killed after migration 2 wrote this record back in plaintext, before the
        // version was raised: version 2 on disk, a mixed tree.
        store
            .meta
            .insert("schema_version", &2u32.to_be_bytes())
            .unwrap();
        let b = record(URLS[1]);
        let mut raw = RawRecord::from_record(&b);
        raw.username = Some("bob".into());
        raw.password = Some("hunter2".into());
        store
            .upstreams
            .insert(id_key(b.upstream.id()), raw.encode_json())
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(
            report.migrated,
            [
                "encrypt_credentials",
                "list_sources",
                "binary_stats",
                "binary_records"
            ]
        );
        let mut got = store.records().unwrap();
        got.sort_by_key(|r| r.upstream.port);
        assert_eq!(got, vec![a, b]);
    }

    /// Schema 4's JSON stats rows are rewritten in the binary shape at the next open and
    /// read back the same; a row the persister already wrote binary is left as it is.
    #[test]
    fn json_stats_rows_become_binary_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b) = (record(URLS[0]), record(URLS[1]));
        store.put(&a).unwrap();
        store.put(&b).unwrap();
        let old = Stats {
            reputation: 91,
            success_rate: Some(0.75),
            total_uses: 8,
            failures: 2,
            last_used_unix_ms: Some(1_796_000_000_000),
            latency_histogram: Some("AAEC".into()),
            ..Stats::default()
        };
        let json = serde_json::to_vec(&old).unwrap();
        store.stats.insert(id_key(a.upstream.id()), json).unwrap();
        // A check row as builds before schema 6 wrote it.
        let check = CheckRecord {
            checked_unix_ms: 5,
            passed: true,
            judge: Some("http://127.0.0.1:9/judge".into()),
            integrity_passes: 2,
            ..CheckRecord::default()
        };
        store
            .checks
            .insert(id_key(a.upstream.id()), serde_json::to_vec(&check).unwrap())
            .unwrap();
        let newer = Stats {
            reputation: 12,
            ..Stats::default()
        };
        store.write_stats([(b.upstream.id(), &newer)]).unwrap();
        store
            .meta
            .insert("schema_version", &4u32.to_be_bytes())
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(report.migrated, ["binary_stats", "binary_records"]);
        assert_eq!(store.schema_version().unwrap(), CURRENT_VERSION);
        for (id, want) in [(a.upstream.id(), &old), (b.upstream.id(), &newer)] {
            let row = store.stats.get(id_key(id)).unwrap().unwrap();
            assert_eq!(row.first(), Some(&1), "binary");
            assert_eq!(&store.stats(id).unwrap(), want);
        }
        assert_eq!(store.all_stats().unwrap().len(), 2);
        let row = store.checks.get(id_key(a.upstream.id())).unwrap().unwrap();
        assert_eq!(row.first(), Some(&1), "binary");
        let rows = store.check_rows().unwrap();
        assert_eq!(CheckRecord::decode(&rows[&a.upstream.id()]), Some(check));
    }

    /// A data dir as builds before ac37704 made it: sled's default 512 KiB segments, with a
    /// record of plaintext credentials and a JSON stats row, written by hand (the store itself
    /// now makes 16 MiB segments, and sled cannot change a database's size in place).
    fn legacy_sized(dir: &Path) -> (Record, Stats) {
        let path = dir.join(DB_DIR);
        std::fs::create_dir_all(dir).unwrap();
        let db = waiting(|| segments::sized(&path, 512 * 1024).open(), is_lock_error).unwrap();
        let a = record(URLS[0]);
        let mut raw = RawRecord::from_record(&a);
        raw.username = Some("alice".into());
        raw.password = Some("s@cret:1".into());
        let tree = db.open_tree("upstreams").unwrap();
        tree.insert(id_key(a.upstream.id()), raw.encode_json())
            .unwrap();
        let stats = Stats {
            reputation: 77,
            total_uses: 5,
            ..Stats::default()
        };
        db.open_tree("stats")
            .unwrap()
            .insert(id_key(a.upstream.id()), serde_json::to_vec(&stats).unwrap())
            .unwrap();
        db.flush().unwrap();
        (a, stats)
    }

    /// Opened, a data dir of 512 KiB segments is copied to [`segments::SIZE`] and swapped in:
    /// every record and stat reads back (and migrates on as before), nothing is left beside
    /// it, and the next open finds the new size.
    #[test]
    fn a_data_dir_of_small_segments_is_copied_to_large_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (a, stats) = legacy_sized(dir.path());
        let path = dir.path().join(DB_DIR);
        assert_eq!(segments::stored_size(&path), Some(512 * 1024));
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(segments::stored_size(&path), Some(segments::SIZE));
        assert!(report.migrated.contains(&"encrypt_credentials"));
        assert_eq!(store.records().unwrap(), vec![a.clone()]);
        assert_eq!(store.stats(a.upstream.id()).unwrap(), stats);
        drop(store);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(DB_DIR))
            .collect();
        assert_eq!(names, [DB_DIR]);
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert!(report.migrated.is_empty());
        assert_eq!(store.records().unwrap(), vec![a]);
    }

    /// Killed before the swap (an unfinished copy beside the database) or between its two
    /// renames (the database set aside, the finished copy not yet in its place), the next
    /// open finishes the resize, with every record.
    #[test]
    fn an_interrupted_resize_is_finished_at_the_next_open() {
        for between_renames in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (a, _) = legacy_sized(dir.path());
            let path = dir.path().join(DB_DIR);
            // A copy as `resize` makes it (here whole, or cut short: an empty database).
            let fresh = segments::in_progress(&path);
            {
                let copy = segments::sized(&fresh, segments::SIZE).open().unwrap();
                if between_renames {
                    let from = sled_open(path.clone()).unwrap();
                    assert_eq!(segments::copy_all(&from, &copy).unwrap(), 2);
                }
                copy.flush().unwrap();
            }
            if between_renames {
                std::fs::rename(&path, segments::set_aside(&path)).unwrap();
                assert!(Store::exists(dir.path()), "a data dir, mid-swap");
            }
            let (store, _) = reopen(dir.path(), None).unwrap();
            assert_eq!(
                store.records().unwrap(),
                vec![a],
                "between renames: {between_renames}"
            );
            assert_eq!(segments::stored_size(&path), Some(segments::SIZE));
            assert!(!fresh.exists() && !segments::set_aside(&path).exists());
        }
    }

    /// A copy that cannot be made (here its path is a dangling link, where out of disk would
    /// be likelier) leaves the database at its old size, opened and whole: the store serves.
    #[test]
    fn a_failed_resize_keeps_the_database_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (a, stats) = legacy_sized(dir.path());
        let path = dir.path().join(DB_DIR);
        std::os::unix::fs::symlink(
            dir.path().join("nowhere/at/all"),
            path.with_extension("resizing"),
        )
        .unwrap();
        let (store, _) = reopen(dir.path(), None).unwrap();
        assert_eq!(segments::stored_size(&path), Some(512 * 1024));
        assert_eq!(store.records().unwrap(), vec![a]);
        assert_eq!(
            store
                .stats(store.records().unwrap()[0].upstream.id())
                .unwrap(),
            stats
        );
        store.put(&record(URLS[1])).unwrap();
        assert_eq!(store.records().unwrap().len(), 2);
    }

    #[test]
    fn newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.put(&record(URLS[0])).unwrap();
        store
            .meta
            .insert("schema_version", &99u32.to_be_bytes())
            .unwrap();
        store.flush().unwrap();
        drop(store);
        std::fs::remove_file(dir.path().join(crate::KEY_FILE)).unwrap();
        let dump = |dir: &Path| {
            let db = sled_open(dir.join(DB_DIR)).unwrap();
            let mut all = Vec::new();
            for name in db.tree_names() {
                for item in &db.open_tree(&name).unwrap() {
                    all.push((name.to_vec(), item.unwrap()));
                }
            }
            all
        };
        let before = dump(dir.path());
        let err = reopen(dir.path(), None).unwrap_err().to_string();
        assert!(
            err.contains("schema version 99") && err.contains("upgrade"),
            "{err}"
        );
        assert_eq!(dump(dir.path()), before);
        assert!(
            !dir.path().join(crate::KEY_FILE).exists(),
            "no key file written"
        );
    }

    #[test]
    fn a_second_opener_is_told_the_dir_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(dir.path());
        // sled's lock is per process (flock); a child process is the real second opener,
        // but within one process sled reports the same error through the same path.
        let err = db_err(dir.path())(sled::Error::Io(std::io::Error::other(
            "could not acquire lock on \"x\": WouldBlock",
        )));
        assert!(
            err.to_string().contains("in use by another proxygate"),
            "{err}"
        );
    }

    #[test]
    fn rotation_interrupted_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let records: Vec<Record> = (0..10)
            .map(|i| record(&format!("socks5://u{i}:p{i}@10.0.1.{i}:1080")))
            .collect();
        for r in &records {
            store.put(r).unwrap();
        }
        let old = store.keys().primary().id();
        let next = Key::generate();
        crate::crypto::write_key_file(&dir.path().join(crate::NEXT_KEY_FILE), &next).unwrap();
        store.begin_rotation(next.clone()).unwrap();
        let p = store.rotate_some(4).unwrap();
        assert_eq!((p.reencrypted, p.left), (4, 6));
        drop(store); // killed here

        // Reopened mid-rotation: both keys load, every record reads.
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(report.rotation_pending, Some(next.id()));
        assert_eq!(store.records().unwrap().len(), 10);
        assert_eq!(
            store.keys().primary().id(),
            next.id(),
            "new records use the new key"
        );
        // Resuming with another key is refused.
        assert!(store.begin_rotation(Key::generate()).is_err());
        store.begin_rotation(next.clone()).unwrap();
        let p = store.rotate_some(usize::MAX).unwrap();
        assert_eq!((p.reencrypted, p.left), (6, 0));
        std::fs::rename(
            dir.path().join(crate::NEXT_KEY_FILE),
            dir.path().join(crate::KEY_FILE),
        )
        .unwrap();
        store.end_rotation().unwrap();
        drop(store);

        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(report.rotation_pending, None);
        assert_eq!(store.keys().primary().id(), next.id());
        assert!(store.keys().get(old).is_none(), "old key retired");
        let mut got = store.records().unwrap();
        got.sort_by_key(|r| r.upstream.host.to_string());
        assert_eq!(got, records);
    }

    #[test]
    fn rotation_killed_after_key_swap_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.put(&record(URLS[0])).unwrap();
        let next = Key::generate();
        crate::crypto::write_key_file(&dir.path().join(crate::NEXT_KEY_FILE), &next).unwrap();
        store.begin_rotation(next.clone()).unwrap();
        store.rotate_some(usize::MAX).unwrap();
        std::fs::rename(
            dir.path().join(crate::NEXT_KEY_FILE),
            dir.path().join(crate::KEY_FILE),
        )
        .unwrap();
        drop(store); // killed before end_rotation
        let (store, report) = reopen(dir.path(), None).unwrap();
        assert_eq!(report.rotation_pending, None);
        assert_eq!(store.rotation().unwrap(), None);
        assert_eq!(store.records().unwrap().len(), 1);
    }

    #[test]
    fn stats_writes_skip_removed_upstreams() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b) = (record(URLS[0]), record(URLS[1]));
        store.put(&a).unwrap();
        store.put(&b).unwrap();
        assert!(store.remove(b.upstream.id()).unwrap());
        let s = Stats {
            reputation: 77,
            total_uses: 9,
            ..Stats::default()
        };
        let n = store
            .write_stats([(a.upstream.id(), &s), (b.upstream.id(), &s)])
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(store.stats(a.upstream.id()).unwrap(), s);
        assert!(!store.all_stats().unwrap().contains_key(&b.upstream.id()));
        assert!(store.set_disabled(a.upstream.id(), true).unwrap());
        assert!(store.get(a.upstream.id()).unwrap().unwrap().disabled);
        assert!(!store.set_disabled(b.upstream.id(), true).unwrap());
    }

    #[test]
    fn checks_are_written_for_present_upstreams_and_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (record(URLS[0]), record(URLS[1]));
        let check = CheckRecord {
            checked_unix_ms: 7,
            passed: true,
            exit_ip: Some("192.0.2.9".into()),
            latency_ms: Some(120),
            ..CheckRecord::default()
        };
        {
            let store = open(dir.path());
            store.put(&a).unwrap();
            store.put(&b).unwrap();
            assert!(store.remove(b.upstream.id()).unwrap());
            let row = check.encode();
            store
                .put_checks([(a.upstream.id(), &row[..]), (b.upstream.id(), &row[..])])
                .unwrap();
            store.flush().unwrap();
        }
        let store = open(dir.path());
        let checks = store.check_rows().unwrap();
        assert_eq!(checks.len(), 1, "{checks:?}");
        assert_eq!(CheckRecord::decode(&checks[&a.upstream.id()]), Some(check));
    }

    #[test]
    fn stats_of_many_upstreams_are_all_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let n = 515;
        let records: Vec<Record> = (0..n)
            .map(|i| record(&format!("http://10.1.{}.{}:8080", i / 250, i % 250 + 1)))
            .collect();
        for r in &records {
            store.put(r).unwrap();
        }
        let stats: Vec<Stats> = (0..n)
            .map(|i| Stats {
                total_uses: i as u64,
                ..Stats::default()
            })
            .collect();
        let written = store
            .write_stats(
                records
                    .iter()
                    .zip(&stats)
                    .map(|(r, s)| (r.upstream.id(), s)),
            )
            .unwrap();
        assert_eq!(written, n);
        let all = store.all_stats().unwrap();
        assert_eq!(all.len(), n);
        for (r, s) in records.iter().zip(&stats) {
            assert_eq!(&all[&r.upstream.id()], s);
        }
    }
}
