//! Client authentication and the client allow-list.
//!
//! Accounts come from a users file of `name:$argon2id$...` lines (PHC strings; `#` comments and
//! blank lines skipped): the file never holds a password. A line with a plaintext password (an
//! older file) is refused, naming the line and how to convert it (`proxygate user convert`).
//! HTTP clients authenticate with `Proxy-Authorization: Basic`, SOCKS5 clients with RFC 1929.
//! Without a users file every client is accepted, and whatever username it sends is still read
//! (it carries routing hints).
//!
//! Verifying argon2id costs tens of milliseconds of CPU on purpose, so:
//! - a verified password is cached, keyed by a keyed SHA-256 of (account, password, stored
//!   hash) under a per-process random key (never the password), for [`VERIFIED_TTL`], at most
//!   [`VERIFIED_MAX`] entries; a reload builds a new cache;
//! - verifications run off the async threads, [`VERIFYING_AT_ONCE`] at a time;
//! - every client address has a failure budget: after [`FAILURE_BUDGET`] failed logins within
//!   [`FAILURE_WINDOW`], its further attempts are refused without verifying, each after
//!   [`THROTTLE_DELAY`], until the window ends; the first refusal is logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ipnet::IpNet;
use proxygate_core::Secret;
use sha2::{Digest, Sha256};

/// How long a verified password is trusted without verifying again.
pub const VERIFIED_TTL: Duration = Duration::from_secs(600);
/// Verified passwords cached at most.
pub const VERIFIED_MAX: usize = 10_000;
/// Failed logins a client address may make within [`FAILURE_WINDOW`].
pub const FAILURE_BUDGET: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a throttled attempt waits before it is refused.
pub const THROTTLE_DELAY: Duration = Duration::from_secs(1);
/// Argon2 verifications in flight at once.
pub const VERIFYING_AT_ONCE: usize = 4;
/// Client addresses whose failures are remembered at most (the oldest windows go first).
const TRACKED_ADDRESSES: usize = 65_536;

/// The accounts allowed to connect (`None`: authentication is off) and the allow-list.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    users: Option<Arc<Accounts>>,
    allow: Vec<IpNet>,
}

/// What a client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub username: String,
    pub password: Secret,
}

/// Why a users file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `name:$argon2id$...` (a hashed password)")]
    Syntax { path: String, line: usize },
    #[error(
        "{path}:{line}: account {name:?} has a plaintext password; the users file holds \
         argon2id hashes only: run `proxygate user convert --users-file {path}` to hash every \
         plaintext line in place, or `proxygate user add {name} --users-file {path}` to set a \
         new password"
    )]
    Plaintext {
        path: String,
        line: usize,
        name: String,
    },
    #[error("{path}:{line}: account {name:?} has an invalid hash: {reason}")]
    BadHash {
        path: String,
        line: usize,
        name: String,
        reason: String,
    },
}

/// Why a client was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No credentials, where they are required.
    Missing,
    /// An unknown account or a wrong password.
    Wrong,
    /// The client's address spent its failure budget.
    Throttled,
}

/// Loaded accounts, their verified-password cache and the failure budgets.
pub struct Accounts {
    /// Account name -> PHC string.
    hashes: HashMap<String, String>,
    /// Per-process key of the cache's keyed hashes.
    key: [u8; 32],
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    verifying: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("accounts", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
    logged: bool,
}

impl Accounts {
    /// Accounts from name -> PHC string.
    pub fn new(hashes: HashMap<String, String>) -> Accounts {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Accounts {
            hashes,
            key,
            verified: Mutex::default(),
            failures: Mutex::default(),
            verifying: Arc::new(tokio::sync::Semaphore::new(VERIFYING_AT_ONCE)),
        }
    }

    /// Other accounts over this one's client state (cache key, cache, failure budgets).
    fn with_hashes(&self, hashes: HashMap<String, String>) -> Accounts {
        fn copy<T: Clone>(m: &Mutex<T>) -> Mutex<T> {
            Mutex::new(m.lock().unwrap_or_else(PoisonError::into_inner).clone())
        }
        Accounts {
            hashes,
            key: self.key,
            verified: copy(&self.verified),
            failures: copy(&self.failures),
            verifying: Arc::clone(&self.verifying),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.hashes.keys().map(String::as_str)
    }

    fn cache_key(&self, name: &str, password: &str, phc: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        for part in [name, password, phc] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }

    fn is_cached(&self, key: &[u8; 32], now: Instant) -> bool {
        let cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < VERIFIED_TTL)
    }

    fn remember(&self, key: [u8; 32], now: Instant) {
        let mut cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= VERIFIED_MAX {
            cache.retain(|_, at| now.duration_since(*at) < VERIFIED_TTL);
            if cache.len() >= VERIFIED_MAX {
                // Still full of fresh entries: start over (they verify again, once each).
                cache.clear();
            }
        }
        cache.insert(key, now);
    }

    /// Whether `ip` has failures left at `now`; logs the first refusal of a window.
    fn within_budget(&self, ip: IpAddr, now: Instant) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = f.get_mut(&ip) else {
            return true;
        };
        if now.duration_since(entry.since) >= FAILURE_WINDOW {
            f.remove(&ip);
            return true;
        }
        if entry.count < FAILURE_BUDGET {
            return true;
        }
        if !entry.logged {
            entry.logged = true;
            let left = FAILURE_WINDOW.saturating_sub(now.duration_since(entry.since));
            tracing::warn!(
                client = %ip,
                failures = entry.count,
                "client spent its login failure budget: further attempts refused for {}s",
                left.as_secs() + 1
            );
        }
        false
    }

    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if f.len() >= TRACKED_ADDRESSES {
            f.retain(|_, e| now.duration_since(e.since) < FAILURE_WINDOW);
        }
        let e = f.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            logged: false,
        });
        e.count += 1;
    }

    /// Checks `creds` for a client at `ip`.
    async fn authenticate(&self, ip: IpAddr, creds: &ClientCredentials) -> Result<(), Refused> {
        let now = Instant::now();
        if !self.within_budget(ip, now) {
            tokio::time::sleep(THROTTLE_DELAY).await;
            return Err(Refused::Throttled);
        }
        let password = creds.password.expose();
        let verdict = match self.hashes.get(&creds.username) {
            Some(phc) => {
                let key = self.cache_key(&creds.username, password, phc);
                if self.is_cached(&key, now) {
                    return Ok(());
                }
                let ok = self.verify(password, phc).await;
                if ok {
                    self.remember(key, now);
                }
                ok
            }
            // An unknown account costs the same as a wrong password: no account oracle.
            None => {
                let _ = self.verify(password, DUMMY_HASH).await;
                false
            }
        };
        if verdict {
            Ok(())
        } else {
            self.failed(ip, now);
            Err(Refused::Wrong)
        }
    }

    /// Argon2id verification, off the async threads, a few at a time.
    async fn verify(&self, password: &str, phc: &str) -> bool {
        let Ok(_permit) = Arc::clone(&self.verifying).acquire_owned().await else {
            return false;
        };
        let (password, phc) = (Secret::new(password), phc.to_owned());
        tokio::task::spawn_blocking(move || verify_password(password.expose(), &phc))
            .await
            .unwrap_or(false)
    }
}

/// A valid hash no password matches (`hash_password("")` with a fixed salt would leak
/// nothing either): what an unknown account is verified against, so it takes as long.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3Mt5Ruh8jG8ltpe0vB0SoQcdMWKH2KGPqnmUNvVG5E8";

/// Whether `password` matches the PHC string `phc`.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// An argon2id PHC string of `password` (default parameters, a random salt).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    match Argon2::default().hash_password(password.as_bytes(), &salt) {
        Ok(h) => h.to_string(),
        // Default parameters and a generated salt cannot be refused.
        Err(e) => unreachable!("argon2 with its defaults: {e}"),
    }
}

impl ClientAuth {
    /// No users (authentication off), no allow-list.
    pub fn open() -> Self {
        Self::default()
    }

    pub fn with_users(mut self, users: HashMap<String, String>) -> Self {
        self.users = Some(Arc::new(Accounts::new(users)));
        self
    }

    pub fn with_allow(mut self, allow: Vec<IpNet>) -> Self {
        self.allow = allow;
        self
    }

    /// New accounts and allow-list (a reload) that keep what this one learned about clients:
    /// the failure budgets (a reload must not reset a brute-forcer's) and the verified-password
    /// cache (keyed by the account's hash as well, so a changed password is verified afresh).
    pub fn reloaded(&self, users: Option<HashMap<String, String>>, allow: Vec<IpNet>) -> Self {
        let users = users.map(|hashes| {
            Arc::new(match &self.users {
                Some(old) => old.with_hashes(hashes),
                None => Accounts::new(hashes),
            })
        });
        Self { users, allow }
    }

    /// How many accounts can log in (`None`: authentication is off).
    pub fn accounts(&self) -> Option<usize> {
        self.users.as_ref().map(|u| u.hashes.len())
    }

    /// Reads a users file: name -> PHC string.
    pub fn load_users(path: &Path) -> Result<HashMap<String, String>, UsersFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        parse_users(&text, &path.display().to_string())
    }

    pub fn is_required(&self) -> bool {
        self.users.is_some()
    }

    /// Whether a client at `ip` may connect at all.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Whether these credentials (or their absence) let a client at `ip` in.
    pub async fn authenticate(
        &self,
        ip: IpAddr,
        creds: Option<&ClientCredentials>,
    ) -> Result<(), Refused> {
        let Some(accounts) = &self.users else {
            return Ok(());
        };
        let Some(c) = creds else {
            return Err(Refused::Missing);
        };
        let ip = canonical(ip);
        let result = accounts.authenticate(ip, c).await;
        if result == Err(Refused::Wrong) {
            tracing::info!(client = %ip, account = %c.username, "login failed");
        }
        result
    }
}

/// Parses users-file text (`source` names it in errors): every line `name:$argon2id$...`.
pub fn parse_users(text: &str, source: &str) -> Result<HashMap<String, String>, UsersFileError> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, hash) = match line.split_once(':') {
            Some((n, h)) if !n.is_empty() => (n, h),
            _ => {
                return Err(UsersFileError::Syntax {
                    path: source.into(),
                    line: i + 1,
                });
            }
        };
        if !hash.starts_with("$argon2") {
            return Err(UsersFileError::Plaintext {
                path: source.into(),
                line: i + 1,
                name: name.into(),
            });
        }
        if let Err(reason) = check_hash(hash) {
            return Err(UsersFileError::BadHash {
                path: source.into(),
                line: i + 1,
                name: name.into(),
                reason,
            });
        }
        users.insert(name.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// Whether `phc` is a whole argon2 PHC string: algorithm, salt and hash.
fn check_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    if !matches!(h.algorithm.as_str(), "argon2id" | "argon2i" | "argon2d") {
        return Err(format!("algorithm {} is not argon2", h.algorithm));
    }
    if h.salt.is_none() || h.hash.is_none() {
        return Err("no salt or no hash".into());
    }
    argon2::Params::try_from(&h).map_err(|e| format!("parameters: {e}"))?;
    Ok(())
}

/// Users-file text for `users` (sorted by name), with a header saying what it is.
pub fn render_users(users: &HashMap<String, String>) -> String {
    let mut names: Vec<&String> = users.keys().collect();
    names.sort();
    let mut out = String::from(
        "# proxygate users: name:argon2id hash. Manage with `proxygate user add|remove|list`.\n",
    );
    for n in names {
        out.push_str(n);
        out.push(':');
        out.push_str(&users[n]);
        out.push('\n');
    }
    out
}

/// Parses a `Proxy-Authorization` value `Basic base64(user:pass)`.
pub fn parse_basic(value: &[u8]) -> Option<ClientCredentials> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(token.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some(ClientCredentials {
        username: user.to_owned(),
        password: Secret::new(pass),
    })
}

/// `Basic base64(user:pass)`, for writing to an upstream.
pub fn basic_value(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{username}:{password}"))
    )
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(u: &str, p: &str) -> ClientCredentials {
        ClientCredentials {
            username: u.into(),
            password: Secret::new(p),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn users_files_hold_hashes_only() {
        let alice = hash_password("s3cr:et");
        let text = format!("# ops\nalice:{alice}\n\n bob:{} \n", hash_password("pw"));
        let users = parse_users(&text, "users").unwrap();
        assert_eq!(users.len(), 2);
        assert!(verify_password("s3cr:et", &users["alice"]));
        assert!(!verify_password("wrong", &users["alice"]));
        let e = parse_users("alice:s3cret\n", "f").unwrap_err();
        assert!(
            e.to_string()
                .contains("f:1: account \"alice\" has a plaintext password")
        );
        assert!(e.to_string().contains("proxygate user convert"));
        assert!(
            !e.to_string().contains("s3cret"),
            "the password is never repeated"
        );
        assert!(matches!(
            parse_users("nocolon\n", "f"),
            Err(UsersFileError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            parse_users("a:$argon2id$broken\n", "f"),
            Err(UsersFileError::BadHash { .. })
        ));
        let back = parse_users(&render_users(&users), "r").unwrap();
        assert_eq!(back, users);
        assert_eq!(check_hash(DUMMY_HASH), Ok(()));
    }

    #[tokio::test]
    async fn authenticates_caches_and_throttles() {
        let mut users = HashMap::new();
        users.insert("alice".to_owned(), hash_password("right"));
        let auth = ClientAuth::open().with_users(users);
        let me = ip("192.0.2.1");
        assert_eq!(auth.authenticate(me, None).await, Err(Refused::Missing));
        assert_eq!(
            auth.authenticate(me, Some(&creds("alice", "right"))).await,
            Ok(())
        );
        let accounts = auth.users.clone().unwrap();
        assert_eq!(accounts.verified.lock().unwrap().len(), 1, "cached");
        assert_eq!(
            auth.authenticate(me, Some(&creds("alice", "right"))).await,
            Ok(())
        );
        // A wrong password is never cached.
        assert_eq!(
            auth.authenticate(me, Some(&creds("alice", "wrong"))).await,
            Err(Refused::Wrong)
        );
        assert_eq!(accounts.verified.lock().unwrap().len(), 1);
        // The budget: the 10th failure is still verified, the 11th attempt is not.
        let other = ip("198.51.100.9");
        for _ in 0..FAILURE_BUDGET {
            assert_eq!(
                auth.authenticate(other, Some(&creds("mallory", "guess")))
                    .await,
                Err(Refused::Wrong)
            );
        }
        let t0 = Instant::now();
        assert_eq!(
            auth.authenticate(other, Some(&creds("alice", "right")))
                .await,
            Err(Refused::Throttled),
            "even the right password waits out the window"
        );
        assert!(t0.elapsed() >= THROTTLE_DELAY);
        // Another address is not affected.
        assert_eq!(
            auth.authenticate(me, Some(&creds("alice", "right"))).await,
            Ok(())
        );
        assert_eq!(ClientAuth::open().authenticate(me, None).await, Ok(()));
    }

    #[test]
    fn basic_round_trip() {
        let v = basic_value("u-session-1", "p:w");
        let c = parse_basic(v.as_bytes()).unwrap();
        assert_eq!(c.username, "u-session-1");
        assert_eq!(c.password.expose(), "p:w");
        assert!(parse_basic(b"Bearer abc").is_none());
        assert!(parse_basic(b"Basic !!!").is_none());
    }

    #[test]
    fn allow_list() {
        let auth = ClientAuth::open().with_allow(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(auth.is_allowed("10.1.2.3".parse().unwrap()));
        assert!(auth.is_allowed("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!auth.is_allowed("127.0.0.1".parse().unwrap()));
        assert!(ClientAuth::open().is_allowed("8.8.8.8".parse().unwrap()));
    }
}
