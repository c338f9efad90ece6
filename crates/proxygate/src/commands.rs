//! `proxygate pool ...` and `proxygate key ...`: operator commands on the data dir.
//!
//! Pool commands open the data dir themselves when no gateway runs on it; when one does (sled
//! lets one process in), they are sent to it over the control socket and take effect live.
//! Key rotation runs on a stopped data dir.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use proxygate_store::{KEY_ENV, KEY_FILE, Key, Store, StoreError};

use proxygate_admin::catalog::EXIT_DATA;
use proxygate_admin::{Catalog, Op, Reply, control, ops};

use crate::EXIT_CONFIG;
use crate::config::RootConfig;

/// Where the data dir is: `--data-dir`, else the config's `data_dir`, else `./data`.
#[derive(Debug, Args)]
pub(crate) struct DataDirArgs {
    /// The data dir; replaces the config's data_dir.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Config file (for data_dir and the health thresholds `pool list` judges by).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    #[command(flatten)]
    dir: DataDirArgs,
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Add upstreams (or update them: same scheme, host, port and username).
    Add {
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
    },
    /// Add upstreams from a file: one URL per line, or `pool export` lines ("-": stdin).
    Import { file: PathBuf },
    /// A table of every upstream.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Every stat of one upstream (never its password). ID: 16 hex digits, or a unique
    /// prefix of at least 4.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an upstream and its stats.
    Remove { id: String },
    /// Keep an upstream but never serve through it.
    Disable { id: String },
    /// Serve through a disabled upstream again.
    Enable { id: String },
    /// Every upstream as JSON lines, credentials sealed (or in the clear with --decrypt).
    Export {
        #[arg(long)]
        decrypt: bool,
    },
    /// Show the strategy, or set it (kept across restarts; `--strategy` on `run` wins).
    Strategy {
        name: Option<String>,
        /// Forget the operator's choice: the config's pool.strategy applies.
        #[arg(long, conflicts_with = "name")]
        reset: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Print a fresh key (base64 of 32 random bytes) on its own last line.
    Generate,
    /// Re-encrypt every record with a new key, then retire the old one. Resumable.
    Rotate {
        #[command(flatten)]
        dir: DataDirArgs,
        /// The new key (a file holding base64, mode 0600). Required when the current key
        /// comes from ENCRYPTION_KEY; otherwise one is generated into the data dir.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
    },
}

fn load_config(args: &DataDirArgs) -> Result<RootConfig, ExitCode> {
    let mut cfg = match &args.config {
        Some(path) => {
            let (cfg, problems) = RootConfig::load(path);
            if !problems.is_empty() {
                eprintln!(
                    "{}",
                    proxygate_core::ConfigErrors {
                        source: path.display().to_string(),
                        problems
                    }
                );
                return Err(ExitCode::from(EXIT_CONFIG));
            }
            cfg
        }
        None => RootConfig::default(),
    };
    if let Some(dir) = &args.data_dir {
        cfg.data_dir = dir.clone();
    }
    Ok(cfg)
}

fn print(reply: &Reply) -> ExitCode {
    print!("{}", reply.stdout);
    eprint!("{}", reply.stderr);
    ExitCode::from(reply.code)
}

fn env_key() -> Option<String> {
    std::env::var(KEY_ENV).ok()
}

pub(crate) fn pool(args: PoolArgs) -> ExitCode {
    let cfg = match load_config(&args.dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let op = match args.command {
        PoolCommand::Add { urls } => Op::Add { urls },
        PoolCommand::Import { file } => {
            let mut text = String::new();
            let read = if file.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text).map(|_| ())
            } else {
                std::fs::read_to_string(&file).map(|t| text = t)
            };
            if let Err(e) = read {
                eprintln!("proxygate: {}: {e}", file.display());
                return ExitCode::from(EXIT_DATA);
            }
            Op::Import { text }
        }
        PoolCommand::List { json } => Op::List { json },
        PoolCommand::Show { id, json } => Op::Show { id, json },
        PoolCommand::Remove { id } => Op::Remove { id },
        PoolCommand::Disable { id } => Op::Disable { id },
        PoolCommand::Enable { id } => Op::Enable { id },
        PoolCommand::Export { decrypt } => Op::Export { decrypt },
        PoolCommand::Strategy { name, reset } => Op::Strategy { name, reset },
    };
    let writes = matches!(op, Op::Add { .. } | Op::Import { .. });
    if !writes && !Store::exists(&cfg.data_dir) {
        eprintln!(
            "proxygate: no data dir at {} (give --data-dir, or add upstreams first)",
            cfg.data_dir.display()
        );
        return ExitCode::FAILURE;
    }
    match Store::open(&cfg.data_dir, env_key().as_deref()) {
        Ok((store, report)) => {
            for m in &report.migrated {
                eprintln!("proxygate: data dir migrated: {m}");
            }
            if let Some(path) = &report.generated_key {
                eprintln!(
                    "proxygate: generated a new encryption key in {} (back it up)",
                    path.display()
                );
            }
            match Catalog::load(Arc::new(store), cfg.pool.health()) {
                Ok(mut catalog) => print(&ops::execute(&mut catalog, &op)),
                Err(e) => {
                    eprintln!("proxygate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(locked @ StoreError::Locked { .. }) => match control::request(&cfg.data_dir, &op) {
            Ok(reply) => print(&reply),
            Err(e) => {
                eprintln!(
                    "proxygate: {locked}; its control socket {} did not answer ({e})",
                    control::socket_path(&cfg.data_dir).display()
                );
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("proxygate: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn key(args: KeyArgs) -> ExitCode {
    match args.command {
        KeyCommand::Generate => {
            eprintln!(
                "# a new key: put it in {KEY_ENV}, or in <data-dir>/{KEY_FILE} with mode 0600"
            );
            println!("{}", *Key::generate().to_base64());
            ExitCode::SUCCESS
        }
        KeyCommand::Rotate { dir, new_key_file } => {
            let cfg = match load_config(&dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match rotate(&cfg.data_dir, new_key_file.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("proxygate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn rotate(dir: &Path, new_key_file: Option<&Path>) -> anyhow::Result<()> {
    if !Store::exists(dir) {
        anyhow::bail!("no data dir at {}", dir.display());
    }
    let (store, _) = Store::open(dir, env_key().as_deref()).map_err(|e| match e {
        StoreError::Locked { .. } => anyhow::anyhow!(
            "{e}. Rotate a running gateway's key through its admin API: \
             `proxygate key rotate --admin URL`"
        ),
        other => other.into(),
    })?;
    let r = proxygate_admin::keys::rotate(&store, new_key_file, |done, left| {
        eprintln!("proxygate: re-encrypted {done}, {left} left");
    })?;
    print_rotated(&r);
    Ok(())
}

fn print_rotated(r: &proxygate_admin::keys::Rotated) {
    println!(
        "re-encrypted {} records with key {}; key {} is retired",
        r.reencrypted, r.key_id, r.retired
    );
    if r.env_key_outdated {
        println!(
            "{KEY_ENV} still holds the retired key: set it to the new key (the contents of \
             the --new-key-file) before the next start"
        );
    }
}
