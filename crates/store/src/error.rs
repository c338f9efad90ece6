//! [`StoreError`]: everything the store can refuse, each with the message an operator needs.

use std::path::{Path, PathBuf};

use proxygate_core::UpstreamId;

use crate::KeyId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data dir {} is in use by another proxygate process (sled allows one); \
         stop it, or run this command while it runs so it is sent to it",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error("the database in {}: {message}", dir.display())]
    Db { dir: PathBuf, message: String },
    #[error(
        "the data dir {} has schema version {found}, newer than this proxygate supports \
         ({supported}); upgrade proxygate. Nothing was changed",
        dir.display()
    )]
    NewerSchema {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("encryption key file {}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    #[error("{}: {reason}", crate::KEY_ENV)]
    KeyEnv { reason: String },
    #[error(
        "the data dir {} holds records sealed with key {expected}, but no key was given: set \
         {} or restore {}/{}. Nothing was changed",
        dir.display(), crate::KEY_ENV, dir.display(), crate::KEY_FILE
    )]
    KeyMissing { dir: PathBuf, expected: KeyId },
    #[error(
        "{} of {total} upstream records cannot be decrypted with the loaded key {loaded}{}: {}. \
         Is {} (or the key file) the key this data dir was written with? Nothing was changed",
        failed.len(),
        hint.as_deref().unwrap_or(""),
        failed.iter().take(10).map(|(id, why)| format!("{id} ({why})")).collect::<Vec<_>>().join(", "),
        crate::KEY_ENV
    )]
    Undecryptable {
        total: usize,
        loaded: KeyId,
        failed: Vec<(UpstreamId, String)>,
        hint: Option<String>,
    },
    #[error("record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("key rotation: {0}")]
    Rotation(String),
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}
