//! The `proxygate` binary: CLI, configuration, wiring and signals.
//!
//! - `proxygate run`: serve, with the embedded defaults unless `--config` says otherwise.
//! - `proxygate check-config FILE`: validate a config file; exit 64 with every error.
//! - `proxygate pool add|import|list|show|remove|disable|enable|export|strategy`: the pool in
//!   the data dir, offline or through the running gateway's control socket.
//! - `proxygate key generate|rotate`: encryption keys.
//! - `proxygate user add|remove|list|convert`: client accounts.
//! - `proxygate sources list|fetch`, `proxygate check`: list sources and checks, offline or
//!   live.
//! - `proxygate strategy|reputation|health|stats|refresh`: the running gateway, through its
//!   admin API (`--admin URL`).
//!
//! Modules: [`config`] (the root config and upstream lists), [`app`] (wiring and lifetime),
//! [`commands`] (the `pool` and `key` command lines), [`remote`] (the admin API's client). The operator operations, the persister
//! and the control socket are the control plane's (`proxygate-admin`).

mod app;
mod commands;
mod memory;
use proxygate::config;
mod reload;
mod remote;
mod source_commands;
mod sources;
mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// sysexits(3) EX_USAGE: the configuration or command line is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "proxygate",
    version,
    about = "A rotating forward-proxy gateway over a pool of HTTP and SOCKS upstreams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run(RunArgs),
    /// Validate a config file; exits 64 listing every problem.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Manage the pool in the data dir (live, when a gateway runs on it).
    Pool(commands::PoolArgs),
    /// Encryption keys: generate one, rotate the data dir's.
    Key(commands::KeyArgs),
    /// Client accounts: add, remove, list (argon2id hashes in the users file).
    User(users::UserArgs),
    /// List sources: their quality, or fetch them now.
    Sources(source_commands::SourcesArgs),
    /// Check pool members now, through themselves, against the judges.
    Check(source_commands::CheckArgs),
    /// Show the running gateway's strategy, or set it (live, kept across restarts).
    Strategy {
        /// The strategy to switch to.
        name: Option<String>,
        /// Return to the config's pool.strategy.
        #[arg(long, conflicts_with = "name")]
        reset: bool,
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
    /// One upstream's reputation explained: each term of the formula, latency percentiles,
    /// and why it stands where it does.
    Reputation {
        /// 16 hex digits, or a unique prefix of at least 4.
        id: String,
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
    /// The pool's health: upstreams by state, and the worst ones and why.
    Health {
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
    /// Attempts, success and latency over a window, the top and bottom upstreams, per-source
    /// yield.
    Stats {
        /// 5m, 1h or 24h.
        #[arg(long, default_value = "5m")]
        window: String,
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
    /// Re-check pool members now, through themselves, against the judges.
    Refresh {
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Config file (TOML). Without it the embedded defaults apply.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable); replaces server.listen.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Directory holding proxygate's state; replaces data_dir.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Upstream proxy URL (repeatable), e.g. socks5h://user:pass@host:1080.
    #[arg(long, value_name = "URL")]
    upstream: Vec<String>,
    /// File of upstream URLs, one per line (repeatable).
    #[arg(long, value_name = "FILE")]
    upstreams_file: Vec<PathBuf>,
    /// Selection strategy; replaces pool.strategy.
    #[arg(long, value_name = "NAME")]
    strategy: Option<String>,
    /// Address of the admin listener (/metrics, /livez, /readyz, /api/v1); replaces
    /// admin.listen.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Client accounts (argon2id hashes); replaces auth.users_file and turns auth on.
    #[arg(long, value_name = "FILE")]
    users_file: Option<PathBuf>,
    /// Turn the list sources off (as `sources = []` in the config).
    #[arg(long)]
    no_sources: bool,
    /// Keep list candidates at private, loopback, link-local... addresses (labs and tests).
    #[arg(long)]
    allow_private_networks: bool,
}

// mimalloc: per-thread free lists suit a thread-per-core data plane, and it gives freed memory
// back to the system (a burst of tunnels does not leave the process at its peak for good, as
// glibc's malloc does). Linked as the process's malloc (its `override` feature) behind Rust's
// default allocator rather than as `MiMalloc`: that one asks `mi_malloc_aligned` for every
// block, whose slow over-allocating path took 5 of a CONNECT tunnel's 15 allocations.
use mimalloc as _;

fn main() -> ExitCode {
    memory::configure();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run(args) => app::run(args),
        Command::Pool(args) => commands::pool(args),
        Command::Key(args) => commands::key(args),
        Command::Sources(args) => source_commands::sources(args),
        Command::User(args) => users::user(args),
        Command::Check(args) => source_commands::check(args),
        Command::Strategy { name, reset, admin } => remote_command(&admin, |a| {
            let answer = if name.is_some() || reset {
                a.call(
                    reqwest::Method::PUT,
                    "/api/v1/strategy",
                    Some(remote::Body::Json(serde_json::json!({ "strategy": name }))),
                )
            } else {
                a.get("/api/v1/strategy")
            };
            remote::print(a, answer, remote::render_strategy)
        }),
        Command::Reputation { id, admin } => remote_command(&admin, |a| {
            let answer = a.get(&format!("/api/v1/upstreams/{id}"));
            remote::print(a, answer, remote::render_explained)
        }),
        Command::Health { admin } => remote_command(&admin, |a| {
            remote::print(a, a.get("/api/v1/health"), remote::render_health)
        }),
        Command::Stats { window, admin } => remote_command(&admin, |a| {
            let answer = a.get(&format!("/api/v1/stats?window={window}"));
            remote::print(a, answer, remote::render_stats)
        }),
        Command::Refresh { admin } => remote_command(&admin, |a| {
            let answer = a.call(
                reqwest::Method::POST,
                "/api/v1/refresh",
                Some(remote::Body::Json(serde_json::json!({}))),
            );
            remote::print(a, answer, remote::render_summary)
        }),
    }
}

fn remote_command(
    args: &remote::AdminArgs,
    run: impl FnOnce(&remote::Admin) -> ExitCode,
) -> ExitCode {
    match remote::Admin::connect(args) {
        Ok(admin) => run(&admin),
        Err(f) => f.exit(),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let source = file.display().to_string();
    let (cfg, mut problems) = config::RootConfig::load(file);
    match cfg.validate() {
        Ok(upstreams) if problems.is_empty() => {
            println!("{source}: ok ({} upstreams)", upstreams.len());
            ExitCode::SUCCESS
        }
        result => {
            problems.extend(result.err().unwrap_or_default());
            eprintln!("{}", proxygate_core::ConfigErrors { source, problems });
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
