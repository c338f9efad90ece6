//! Key rotation, one procedure for a stopped data dir (`proxygate key rotate`) and a running
//! gateway (`POST /api/v1/key/rotate`, or the CLI through the control socket): traffic goes
//! on meanwhile, since every record opens under both keys until the rotation ends.
//!
//! Steps, each durable before the next: the new key is kept in the data dir
//! (`encryption.key.next`, when the key lives in a file), the store marks the rotation and
//! seals with the new key from then on, records are re-encrypted in batches, the key file is
//! replaced by the new key, and the old key is retired. Interrupted anywhere, running it again
//! (or restarting) finishes it.

use std::path::Path;

use proxygate_store::crypto::{read_key_file, sync_dir, write_key_file};
use proxygate_store::{KEY_ENV, Key, KeyOrigin, NEXT_KEY_FILE, Store, StoreError};
use serde::Serialize;

use crate::OpError;

/// Records re-encrypted per batch (each batch is flushed).
const BATCH: usize = 1000;

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rotated {
    pub reencrypted: usize,
    /// The new key's id.
    pub key_id: String,
    /// The retired key's id.
    pub retired: String,
    /// Whether `ENCRYPTION_KEY` still holds the retired key and must be changed before the
    /// next start.
    pub env_key_outdated: bool,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OpError + '_ {
    move |e| OpError::Store(StoreError::io(path, e))
}

/// Re-encrypts every record of `store` under a new key: the one in `new_key_file`, or (when
/// the key lives in the data dir) a generated one. `progress(done, left)` is called after
/// each batch.
pub fn rotate(
    store: &Store,
    new_key_file: Option<&Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Rotated, OpError> {
    // Every record must open before anything is re-encrypted.
    store.records()?;
    let dir = store.dir().to_owned();
    let origin = store.keys().origin().clone();
    let old = store.key_id()?.unwrap_or(store.keys().primary().id());
    let next_path = dir.join(NEXT_KEY_FILE);
    let next = match (new_key_file, &origin) {
        (Some(path), _) => {
            let key = read_key_file(path)?;
            if matches!(origin, KeyOrigin::File(_)) {
                // The key file will be replaced by it: keep it in the data dir first. A next
                // key left by an attempt that never started re-encrypting is replaced; one
                // that did start is finished first (begin_rotation says so).
                if next_path.exists() && store.rotation()?.is_none() {
                    let left = read_key_file(&next_path)?;
                    if left.id() != key.id() {
                        std::fs::remove_file(&next_path).map_err(io(&next_path))?;
                    }
                }
                if !next_path.exists() {
                    write_key_file(&next_path, &key)?;
                }
            }
            key
        }
        (None, KeyOrigin::Env) => {
            return Err(OpError::Usage(format!(
                "the key comes from {KEY_ENV}, which proxygate cannot change: make a new key \
                 with `proxygate key generate`, save it to a file (mode 0600) and pass it with \
                 --new-key-file"
            )));
        }
        (None, KeyOrigin::File(_)) if next_path.exists() => read_key_file(&next_path)?,
        (None, KeyOrigin::File(_)) => {
            let key = Key::generate();
            write_key_file(&next_path, &key)?;
            key
        }
    };
    let next_id = next.id();
    store.begin_rotation(next).map_err(|e| match e {
        StoreError::Rotation(why) => OpError::Conflict(format!("key rotation: {why}")),
        other => OpError::Store(other),
    })?;
    let mut total = 0;
    loop {
        let p = store.rotate_some(BATCH)?;
        total += p.reencrypted;
        if p.left == 0 {
            break;
        }
        progress(total, p.left);
    }
    if let KeyOrigin::File(path) = &origin
        && next_path.exists()
    {
        std::fs::rename(&next_path, path).map_err(io(path))?;
        sync_dir(path)?;
    }
    store.end_rotation()?;
    Ok(Rotated {
        reencrypted: total,
        key_id: next_id.to_string(),
        retired: old.to_string(),
        env_key_outdated: origin == KeyOrigin::Env,
    })
}
