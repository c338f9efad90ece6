//! Credential envelopes: AES-256-GCM with a key id, and where keys come from.
//!
//! An envelope is `version (1) | key id (4, big endian) | nonce (12) | ciphertext and tag`.
//! The associated data is the record's tree name and key plus the key id, so a ciphertext
//! copied onto another record, or relabelled with another key id, fails to open.
//!
//! A key's id is its key check value: the first four bytes of AES-256 of a zero block under
//! that key. It names the key without revealing it, so a wrong key is told apart from a
//! tampered record before any decryption is tried.
//!
//! Keys come from `ENCRYPTION_KEY` (base64 of 32 bytes) or from `<data-dir>/encryption.key`,
//! which is generated with mode 0600 on first use and refused when group or others can read
//! it. During a rotation the next key waits in `<data-dir>/encryption.key.next`.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, OsRng, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::aes::cipher::{BlockEncrypt, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use crate::StoreError;

/// The environment variable holding the key.
pub const KEY_ENV: &str = "ENCRYPTION_KEY";
/// The key file's name inside the data dir.
pub const KEY_FILE: &str = "encryption.key";
/// The next key's file during a rotation.
pub const NEXT_KEY_FILE: &str = "encryption.key.next";

const ENVELOPE_VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 12;

/// A 256-bit key. Never printed; zeroized on drop.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; 32]>,
    id: KeyId,
}

/// A key's public name (its key check value), shown as 8 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u32);

/// Where the primary key came from; rotation needs to know whether it can replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    Env,
    File(PathBuf),
}

/// The keys a store can open envelopes with; `primary` seals new ones.
#[derive(Clone)]
pub struct Keyring {
    pub(crate) primary: Key,
    pub(crate) others: Vec<Key>,
    pub(crate) origin: KeyOrigin,
}

/// Why an envelope did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed with key {0}, which is not loaded")]
    UnknownKey(KeyId),
    #[error("authentication failed (tampered, or copied from another record)")]
    Tampered,
    #[error("not an envelope (truncated or unknown version)")]
    Malformed,
}

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        let mut block = aes_gcm::aes::Block::default();
        Aes256::new(&bytes.into()).encrypt_block(&mut block);
        let id = KeyId(u32::from_be_bytes([block[0], block[1], block[2], block[3]]));
        Key {
            bytes: Zeroizing::new(bytes),
            id,
        }
    }

    /// A fresh random key.
    pub fn generate() -> Key {
        let key = Aes256Gcm::generate_key(OsRng);
        Key::from_bytes(key.into())
    }

    /// Parses base64 of exactly 32 bytes (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Key, String> {
        let raw = Zeroizing::new(
            BASE64
                .decode(text.trim())
                .map_err(|e| format!("not valid base64 ({e})"))?,
        );
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| format!("expected 32 bytes, got {}", raw.len()))?;
        Ok(Key::from_bytes(bytes))
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(*self.bytes))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.bytes.as_ref().into())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary.id)
            .field(
                "others",
                &self.others.iter().map(Key::id).collect::<Vec<_>>(),
            )
            .field("origin", &self.origin)
            .finish()
    }
}

fn aad(context: &[u8], key_id: KeyId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(context.len() + 4);
    aad.extend_from_slice(context);
    aad.extend_from_slice(&key_id.0.to_be_bytes());
    aad
}

/// Seals `plaintext` under `key`, bound to `context` (tree name and record key).
pub fn seal(key: &Key, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let aad = aad(context, key.id);
    let mut out = Vec::with_capacity(HEADER + plaintext.len() + 16);
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(&key.id.0.to_be_bytes());
    out.extend_from_slice(&nonce);
    // Encryption with a valid key and in-memory buffers cannot fail; an empty result would be
    // caught by `open` as malformed.
    if let Ok(ct) = key.cipher().encrypt(
        &nonce,
        Payload {
            msg: plaintext,
            aad: &aad,
        },
    ) {
        out.extend_from_slice(&ct);
    }
    out
}

/// The key id an envelope names, if it is one.
pub fn envelope_key(envelope: &[u8]) -> Option<KeyId> {
    match envelope {
        [ENVELOPE_VERSION, a, b, c, d, ..] if envelope.len() >= HEADER + 16 => {
            Some(KeyId(u32::from_be_bytes([*a, *b, *c, *d])))
        }
        _ => None,
    }
}

impl Keyring {
    pub fn new(primary: Key, origin: KeyOrigin) -> Keyring {
        Keyring {
            primary,
            others: Vec::new(),
            origin,
        }
    }

    pub fn with(mut self, other: Key) -> Keyring {
        if other.id != self.primary.id && !self.others.iter().any(|k| k.id == other.id) {
            self.others.push(other);
        }
        self
    }

    pub fn primary(&self) -> &Key {
        &self.primary
    }

    pub fn origin(&self) -> &KeyOrigin {
        &self.origin
    }

    pub fn get(&self, id: KeyId) -> Option<&Key> {
        std::iter::once(&self.primary)
            .chain(&self.others)
            .find(|k| k.id == id)
    }

    pub fn open(&self, context: &[u8], envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let id = envelope_key(envelope).ok_or(OpenError::Malformed)?;
        let key = self.get(id).ok_or(OpenError::UnknownKey(id))?;
        let nonce = Nonce::from_slice(&envelope[5..HEADER]);
        key.cipher()
            .decrypt(
                nonce,
                Payload {
                    msg: &envelope[HEADER..],
                    aad: &aad(context, id),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError::Tampered)
    }
}

/// Reads a key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> Result<Key, StoreError> {
    let meta = std::fs::metadata(path).map_err(|e| StoreError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::KeyFile {
            path: path.to_owned(),
            reason: format!(
                "readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| StoreError::io(path, e))?);
    Key::from_base64(&text).map_err(|reason| StoreError::KeyFile {
        path: path.to_owned(),
        reason,
    })
}

/// Writes `key` to a new file with mode 0600, durably (file and directory synced). Fails if
/// the file exists.
pub fn write_key_file(path: &Path, key: &Key) -> Result<(), StoreError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let mut text = key.to_base64();
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::io(path, e))?;
    sync_dir(path)
}

/// Syncs the directory holding `path`, so a create or rename in it survives a crash.
pub fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let key = Key::generate();
        let ring = Keyring::new(key.clone(), KeyOrigin::Env);
        let env = seal(&key, b"upstreams/1", b"hunter2");
        assert_eq!(&*ring.open(b"upstreams/1", &env).unwrap(), b"hunter2");
        // Another record's context: refused.
        assert_eq!(ring.open(b"upstreams/2", &env), Err(OpenError::Tampered));
        // Any flipped byte past the header: refused.
        for i in HEADER..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                ring.open(b"upstreams/1", &bad),
                Err(OpenError::Tampered),
                "byte {i}"
            );
        }
        // Two seals of one plaintext differ (fresh nonce).
        assert_ne!(env, seal(&key, b"upstreams/1", b"hunter2"));
    }

    #[test]
    fn wrong_key_is_named() {
        let (a, b) = (Key::generate(), Key::generate());
        let env = seal(&a, b"c", b"x");
        let ring = Keyring::new(b.clone(), KeyOrigin::Env);
        assert_eq!(ring.open(b"c", &env), Err(OpenError::UnknownKey(a.id())));
        // Relabelled with the loaded key's id: the tag no longer matches.
        let mut relabelled = env.clone();
        relabelled[1..5].copy_from_slice(&b.id().0.to_be_bytes());
        assert_eq!(ring.open(b"c", &relabelled), Err(OpenError::Tampered));
        assert_eq!(ring.open(b"c", &env[..10]), Err(OpenError::Malformed));
        let both = ring.with(a);
        assert_eq!(&*both.open(b"c", &env).unwrap(), b"x");
    }

    #[test]
    fn key_text_and_id() {
        let key = Key::generate();
        let again = Key::from_base64(&format!(" {}\n", *key.to_base64())).unwrap();
        assert_eq!(key.id(), again.id());
        assert!(
            Key::from_base64("c2hvcnQ=")
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(Key::from_base64("!!!").unwrap_err().contains("base64"));
        assert!(!format!("{key:?}").contains(&*key.to_base64()));
    }

    #[test]
    fn key_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let key = Key::generate();
        write_key_file(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key_file(&path).unwrap().id(), key.id());
        assert!(write_key_file(&path, &key).is_err(), "never overwrites");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_key_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("readable by group or others") && err.contains("chmod 600"),
            "{err}"
        );
    }
}
