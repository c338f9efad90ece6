//! [`Config`]: the `[admin]` section of the root config file: where the admin listener
//! (`/metrics`, `/livez`, `/readyz`, `/api/v1`) binds and who may use it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use proxygate_core::Problem;
use serde::Deserialize;

/// The admin listener's default address: loopback, like the proxy port.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
/// `/readyz` answers 200 once the pool has at least this many healthy upstreams.
pub const DEFAULT_READY_MIN_HEALTHY: usize = 1;
/// Shortest accepted bearer token: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the admin listener (`--admin-listen` replaces it).
    pub listen: SocketAddr,
    /// A file holding the bearer token the API requires (`Authorization: Bearer <token>`).
    /// Required when `listen` is not a loopback address; when set, required of every
    /// request but `/livez` and `/readyz`.
    pub token_file: Option<PathBuf>,
    /// `/readyz` is 200 once the pool has this many healthy upstreams (0: once the store is
    /// open).
    pub ready_min_healthy: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            token_file: None,
            ready_min_healthy: DEFAULT_READY_MIN_HEALTHY,
        }
    }
}

impl Config {
    /// Every problem, each named `admin.<key>`. A non-loopback listener without a token is
    /// refused: the admin API can add upstreams and export credentials.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        match &self.token_file {
            None if !self.listen.ip().is_loopback() => problems.push(Problem::new(
                "admin.listen",
                format!(
                    "{} is not a loopback address: set admin.token_file (a bearer token) so \
                     strangers cannot steer the gateway",
                    self.listen
                ),
            )),
            None => {}
            Some(path) => {
                if let Err(why) = read_token(path) {
                    problems.push(Problem::new("admin.token_file", why));
                }
            }
        }
        problems
    }
}

/// Reads a token file: the first line, trimmed; refused if shorter than [`MIN_TOKEN_LEN`]
/// or readable by others (a group may read it: secret mounts share one with the service).
pub fn read_token(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(format!(
            "{} is readable by others: chmod o-rwx it (600 or 640)",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{}: the token must be at least {MIN_TOKEN_LEN} characters",
            path.display()
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_public_listener_needs_a_token() {
        let mut c = Config {
            listen: "0.0.0.0:9090".parse().unwrap(),
            ..Config::default()
        };
        let p = c.validate();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "admin.listen");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        c.token_file = Some(token.clone());
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(read_token(&token).unwrap(), "0123456789abcdef0123");

        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(
            c.validate().is_empty(),
            "group-readable secret mounts are fine"
        );
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(c.validate()[0].key, "admin.token_file");
        std::fs::write(&token, "short").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(c.validate()[0].reason.contains("at least 16"));
    }
}
