//! The `proxygate` binary: CLI, configuration, wiring and signals.
//!
//! - `proxygate run`: serve, with the embedded defaults unless `--config` says otherwise.
//! - `proxygate check-config FILE`: validate a config file; exit 64 with every error.
//! - `proxygate pool add|import|list|show|remove|disable|enable|export|strategy`: the pool in
//!   the data dir, offline or through the running gateway's control socket.
//! - `proxygate key generate|rotate`: encryption keys.
//!
//! Modules: [`config`] (the root config and upstream lists), [`app`] (wiring and lifetime),
//! [`commands`] (the `pool` and `key` command lines). The operator operations, the persister
//! and the control socket are the control plane's (`proxygate-admin`).

mod app;
mod commands;
mod config;

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
}

#[derive(Debug, Args)]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run(args) => app::run(args),
        Command::Pool(args) => commands::pool(args),
        Command::Key(args) => commands::key(args),
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
