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
use crate::remote::{Admin, AdminArgs, Body, render_rows};

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
    /// Work on a running gateway through its admin API at this URL (e.g.
    /// http://127.0.0.1:9090) instead of the data dir.
    #[arg(long, global = true, value_name = "URL")]
    admin: Option<String>,
    /// The admin API's bearer token (default: $PROXYGATE_ADMIN_TOKEN, else the config's
    /// admin.token_file).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
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
        /// Rotate a running gateway's key live, through its admin API at this URL.
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// The admin API's bearer token file.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
}

fn load_config(args: &DataDirArgs) -> Result<RootConfig, ExitCode> {
    crate::config::for_command(args.config.as_deref(), args.data_dir.as_deref(), false).map_err(
        |e| {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        },
    )
}

/// The text of an import: a file, or standard input for `-`.
fn read_import(file: &Path) -> Result<String, ExitCode> {
    let mut text = String::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(file).map(|t| text = t)
    };
    read.map(|()| text).map_err(|e| {
        eprintln!("proxygate: {}: {e}", file.display());
        ExitCode::from(EXIT_DATA)
    })
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
    if let Some(url) = args.admin.clone() {
        let admin = AdminArgs {
            admin: Some(url),
            token_file: args.token_file.clone(),
            config: args.dir.config.clone(),
            json: false,
        };
        return match Admin::connect(&admin) {
            Ok(a) => pool_remote(&a, args.command),
            Err(f) => f.exit(),
        };
    }
    let cfg = match load_config(&args.dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let op = match args.command {
        PoolCommand::Add { urls } => Op::Add { urls },
        PoolCommand::Import { file } => match read_import(&file) {
            Ok(text) => Op::Import { text },
            Err(code) => return code,
        },
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
            match Catalog::load(Arc::new(store), cfg.pool.health())
                .map(|c| c.with_trust(cfg.trust()))
            {
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
        KeyCommand::Rotate {
            admin: Some(url),
            token_file,
            dir,
            new_key_file,
        } => {
            let args = AdminArgs {
                admin: Some(url),
                token_file,
                config: dir.config,
                json: false,
            };
            let admin = match Admin::connect(&args) {
                Ok(a) => a,
                Err(f) => return f.exit(),
            };
            let body = serde_json::json!({ "new_key_file": new_key_file });
            match admin.call(
                reqwest::Method::POST,
                "/api/v1/key/rotate",
                Some(Body::Json(body)),
            ) {
                Ok(a) => match serde_json::from_value(a.value()) {
                    Ok(r) => {
                        print_rotated(&r);
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("proxygate: unexpected answer: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(f) => f.exit(),
            }
        }
        KeyCommand::Rotate {
            dir, new_key_file, ..
        } => {
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

/// `proxygate pool ... --admin URL`: the same commands through the admin API.
fn pool_remote(a: &Admin, command: PoolCommand) -> ExitCode {
    use reqwest::Method;
    let json_out = crate::remote::print_as;
    fn added(v: &serde_json::Value) -> String {
        let mut out = format!("added {}, updated {}\n", v["added"], v["updated"]);
        for id in v["ids"].as_array().into_iter().flatten() {
            out.push_str(id.as_str().unwrap_or_default());
            out.push('\n');
        }
        out
    }
    match command {
        PoolCommand::Add { urls } => json_out(
            a.call(
                Method::POST,
                "/api/v1/upstreams",
                Some(Body::Json(serde_json::json!({ "urls": urls }))),
            ),
            added,
            false,
        ),
        PoolCommand::Import { file } => {
            let text = match read_import(&file) {
                Ok(t) => t,
                Err(code) => return code,
            };
            json_out(
                a.call(
                    Method::POST,
                    "/api/v1/upstreams/import",
                    Some(Body::Text(text)),
                ),
                |v| format!("imported: added {}, updated {}\n", v["added"], v["updated"]),
                false,
            )
        }
        PoolCommand::List { json } => match a.get("/api/v1/upstreams") {
            Ok(ans) if json => {
                let v = ans.value();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v["upstreams"]).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(ans) => {
                print!("{}", render_rows(&ans.value()));
                ExitCode::SUCCESS
            }
            Err(f) => f.exit(),
        },
        PoolCommand::Show { id, json } => json_out(
            a.get(&format!("/api/v1/upstreams/{id}")),
            crate::remote::render_explained,
            json,
        ),
        PoolCommand::Remove { id } => json_out(
            a.call(Method::DELETE, &format!("/api/v1/upstreams/{id}"), None),
            |v| format!("removed {}\n", v["removed"].as_str().unwrap_or_default()),
            false,
        ),
        PoolCommand::Disable { id } => json_out(
            a.call(
                Method::POST,
                &format!("/api/v1/upstreams/{id}/disable"),
                None,
            ),
            |v| format!("disabled {}\n", v["id"].as_str().unwrap_or_default()),
            false,
        ),
        PoolCommand::Enable { id } => json_out(
            a.call(
                Method::POST,
                &format!("/api/v1/upstreams/{id}/enable"),
                None,
            ),
            |v| format!("enabled {}\n", v["id"].as_str().unwrap_or_default()),
            false,
        ),
        PoolCommand::Export { decrypt } => {
            match a.get(&format!("/api/v1/upstreams/export?decrypt={decrypt}")) {
                Ok(ans) => {
                    print!("{}", ans.0);
                    ExitCode::SUCCESS
                }
                Err(f) => f.exit(),
            }
        }
        PoolCommand::Strategy { name, reset } => {
            let answer = if name.is_some() || reset {
                a.call(
                    Method::PUT,
                    "/api/v1/strategy",
                    Some(Body::Json(serde_json::json!({ "strategy": name }))),
                )
            } else {
                a.get("/api/v1/strategy")
            };
            json_out(answer, crate::remote::render_strategy, false)
        }
    }
}
