//! SIGHUP: read the config, the users file and the upstream files again and apply what can
//! change live; SIGTERM/SIGINT: drain; a second one: exit at once.
//!
//! A reload is all or nothing: every problem of the new configuration (each `file: key:
//! reason`, an unreadable users file, a TLS CA file that does not load) is logged and the
//! running configuration keeps serving unchanged. A valid one applies without dropping a
//! connection: open connections finish under the settings they were accepted with, new ones get
//! the new settings, and accounts and the allow-list apply from every client's next check.
//!
//! Live: `[server]` (but `listen`, `max_connections` and `workers`), `[auth]`, `[dial]`,
//! `allow_private_networks` for client destinations, `[upstreams]` and the files it names,
//! `pool.strategy` (unless an operator set one) and `pool.session_ttl`. The rest (the data
//! dir, listeners, the admin API, the store, list sources, the checker, the janitor, logging,
//! the pool's health and reputation keys) is read at start: a change there is logged as waiting
//! for a restart.

use std::sync::{Arc, Mutex};

use proxygate_admin::Catalog;
use proxygate_gateway::Live;
use proxygate_gateway::auth::ClientAuth;
use proxygate_pool::PoolWriter;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::RunArgs;
use crate::config::RootConfig;

/// What a reload needs: the command line (its flags still override the file) and the
/// running parts it changes.
pub(crate) struct Reloader {
    pub(crate) args: RunArgs,
    /// The configuration the process started with (what restart-only keys are compared to).
    pub(crate) started: RootConfig,
    pub(crate) live: Live,
    pub(crate) catalog: Arc<Mutex<Catalog>>,
    pub(crate) writer: PoolWriter,
}

/// What a reload did, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) upstreams_changed: usize,
    pub(crate) upstreams_removed: usize,
    /// Accounts that can log in (`None`: authentication off).
    pub(crate) accounts: Option<usize>,
    /// Changed keys that wait for a restart.
    pub(crate) needs_restart: Vec<&'static str>,
}

impl Reloader {
    /// Reads everything again and applies it, or changes nothing and returns every problem.
    pub(crate) async fn reload(&self) -> Result<Applied, Vec<String>> {
        let (cfg, upstreams) = crate::app::resolve(&self.args).map_err(|e| {
            e.problems
                .iter()
                .map(|p| format!("{}: {}: {}", e.source, p.key, p.reason))
                .collect::<Vec<_>>()
        })?;
        let users = match &cfg.gateway.auth.users_file {
            Some(path) => Some(
                ClientAuth::load_users(path).map_err(|e| vec![format!("auth.users_file: {e}")])?,
            ),
            None => None,
        };
        let current = self.live.gateway().auth();
        let auth = current.reloaded(users, cfg.gateway.server.allow.clone());
        let staged = self
            .live
            .prepare(cfg.gateway.clone())
            .map_err(|e| vec![format!("dial.tls_ca_file: {e}")])?;
        // Everything is valid: apply. The store is the one step that can still fail (a disk
        // error); it goes first so that a failure leaves the rest as it was.
        let catalog = Arc::clone(&self.catalog);
        let strategy = cfg.pool.strategy;
        let synced = tokio::task::spawn_blocking(move || {
            let mut c = catalog
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let synced = c
                .sync_config(&upstreams)
                .map_err(|e| format!("upstreams: {e}"))?;
            c.set_configured_strategy(strategy)
                .map_err(|e| format!("pool.strategy: {e}"))?;
            Ok::<_, String>(synced)
        })
        .await
        .map_err(|e| vec![format!("upstreams: {e}")])?
        .map_err(|e| vec![e])?;
        let accounts = auth.accounts();
        self.live.apply(staged, auth);
        self.writer.set_session_ttl(cfg.pool.session_ttl);
        self.writer.set_new_session_exit(cfg.pool.new_session_exit);
        Ok(Applied {
            upstreams_changed: synced.0,
            upstreams_removed: synced.1,
            accounts,
            needs_restart: needs_restart(&self.started, &cfg),
        })
    }
}

/// The keys that differ between `started` and `new` and are only read at start.
pub(crate) fn needs_restart(started: &RootConfig, new: &RootConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differs = |changed: bool, key: &'static str| {
        if changed {
            out.push(key);
        }
    };
    differs(started.data_dir != new.data_dir, "data_dir");
    let (a, b) = (&started.gateway.server, &new.gateway.server);
    differs(a.listen != b.listen, "server.listen");
    differs(
        a.max_connections != b.max_connections,
        "server.max_connections",
    );
    differs(a.workers != b.workers, "server.workers");
    let mut pool = new.pool.clone();
    pool.strategy = started.pool.strategy;
    pool.session_ttl = started.pool.session_ttl;
    pool.new_session_exit = started.pool.new_session_exit;
    differs(
        pool != started.pool,
        "[pool] (other than strategy and session_ttl)",
    );
    differs(started.store != new.store, "[store]");
    differs(started.admin != new.admin, "[admin]");
    differs(started.janitor != new.janitor, "[janitor]");
    differs(started.sources != new.sources, "[[sources]]");
    differs(started.checker != new.checker, "[checker]");
    differs(started.refresh != new.refresh, "[refresh]");
    differs(started.log != new.log, "[log]");
    differs(
        started.allow_private_networks != new.allow_private_networks,
        "allow_private_networks (for list candidates; client destinations follow now)",
    );
    out
}

/// The process's signals, registered at once (a signal right after "listening" must be
/// handled, not kill the process).
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub(crate) fn register() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Reloads on every SIGHUP; fires `trigger` on the first SIGTERM or SIGINT and exits the
    /// process at once on a second (status 128 + the signal's number, as shells report).
    pub(crate) async fn run(
        mut self,
        reloader: Reloader,
        trigger: proxygate_core::ShutdownTrigger,
    ) {
        loop {
            tokio::select! {
                _ = self.hup.recv() => reload(&reloader).await,
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
            }
        }
        tracing::info!("shutting down (a second SIGTERM or SIGINT exits at once)");
        trigger.fire();
        let signo = tokio::select! {
            _ = self.term.recv() => 15,
            _ = self.int.recv() => 2,
        };
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(128 + signo);
    }
}

async fn reload(reloader: &Reloader) {
    tracing::info!("SIGHUP: reloading the configuration");
    match reloader.reload().await {
        Ok(a) => {
            tracing::info!(
                upstreams_changed = a.upstreams_changed,
                upstreams_removed = a.upstreams_removed,
                accounts = a
                    .accounts
                    .map_or_else(|| "auth off".to_owned(), |n| n.to_string()),
                "configuration reloaded"
            );
            if !a.needs_restart.is_empty() {
                tracing::warn!(
                    "changed, applied at the next restart: {}",
                    a.needs_restart.join(", ")
                );
            }
        }
        Err(problems) => {
            for p in &problems {
                tracing::error!("reload rejected: {p}");
            }
            tracing::error!(
                problems = problems.len(),
                "reload rejected: the running configuration is kept"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_start_time_keys_wait_for_a_restart() {
        let started = RootConfig::default();
        let mut live = started.clone();
        live.pool.strategy = proxygate_pool::Strategy::RoundRobin;
        live.pool.session_ttl = std::time::Duration::from_secs(5);
        live.gateway.server.max_target_bytes = 1000;
        live.gateway.dial.max_attempts = 9;
        live.upstreams.urls.push("http://10.0.0.1:8080".into());
        assert!(needs_restart(&started, &live).is_empty());
        let mut later = live.clone();
        later.pool.healthy_reputation = 10;
        later
            .gateway
            .server
            .listen
            .push("127.0.0.1:9".parse().unwrap());
        later.log.level = "debug".into();
        assert_eq!(
            needs_restart(&started, &later),
            [
                "server.listen",
                "[pool] (other than strategy and session_ttl)",
                "[log]"
            ]
        );
    }
}
