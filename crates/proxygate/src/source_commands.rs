//! `proxygate sources list|fetch` and `proxygate check`: on a stopped data dir they run here
//! (with a progress bar on a terminal, plain lines otherwise); on a running gateway they go
//! through its control socket, or its admin API with `--admin URL`.
//!
//! Exit codes: 0 when every source answered (every check ran), 1 when some failed (each named,
//! with why) or on a runtime failure, 64 on usage or config errors.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Subcommand};
use proxygate_admin::sources::SourcesRuntime;
use proxygate_admin::{Catalog, Op, OpError, control};
use proxygate_sources::metrics::SourceMetrics;
use proxygate_store::{Store, StoreError};
use serde_json::Value;

use crate::EXIT_CONFIG;
use crate::config::RootConfig;
use crate::remote::{Admin, AdminArgs, Body, render_summary};

/// Where the data dir and config are, and how to reach a running gateway.
#[derive(Debug, Args)]
pub(crate) struct Where {
    /// Config file: the sources, checker and data dir it names.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The data dir; replaces the config's data_dir.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Go through a running gateway's admin API at this URL.
    #[arg(long, global = true, value_name = "URL")]
    admin: Option<String>,
    /// The admin API's bearer token file.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SourcesArgs {
    #[command(flatten)]
    at: Where,
    #[command(subcommand)]
    command: SourcesCommand,
}

#[derive(Debug, Subcommand)]
enum SourcesCommand {
    /// The configured sources and their quality: fetches, yield, alive after 24 h, and why a
    /// source is fetched less often.
    List,
    /// Fetch sources now (all, or the named ones) and print what each gave.
    Fetch {
        /// Source names (default: every configured source).
        names: Vec<String>,
        /// Check the new candidates through themselves.
        #[arg(long)]
        check: bool,
        /// Bring the candidates that pass their check into the pool (implies --check).
        #[arg(long)]
        import: bool,
        /// Keep candidates at private, loopback, link-local... addresses.
        #[arg(long)]
        allow_private_networks: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    at: Where,
    /// Check every pool member.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Upstream ids (16 hex digits, or unique prefixes of at least 4).
    ids: Vec<String>,
}

fn load(at: &Where) -> Result<RootConfig, ExitCode> {
    crate::config::for_command(at.config.as_deref(), at.data_dir.as_deref(), true).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn admin(at: &Where) -> Result<Option<Admin>, ExitCode> {
    let Some(url) = at.admin.clone() else {
        return Ok(None);
    };
    Admin::connect(&AdminArgs {
        admin: Some(url),
        token_file: at.token_file.clone(),
        config: at.config.clone(),
        json: at.json,
    })
    .map(Some)
    .map_err(|f| f.exit())
}

/// How a command reaches the data dir.
enum Reach {
    /// Stopped: opened here.
    Here(Arc<Mutex<Catalog>>),
    /// A gateway runs on it: its control socket.
    Socket,
}

fn reach(cfg: &RootConfig) -> Result<Reach, ExitCode> {
    let env_key = std::env::var(proxygate_store::KEY_ENV).ok();
    match Store::open(&cfg.data_dir, env_key.as_deref()) {
        Ok((store, _)) => match Catalog::load(Arc::new(store), cfg.pool.health())
            .map(|c| c.with_trust(cfg.trust()))
        {
            Ok(c) => Ok(Reach::Here(Arc::new(Mutex::new(c)))),
            Err(e) => {
                eprintln!("proxygate: {e}");
                Err(ExitCode::FAILURE)
            }
        },
        Err(StoreError::Locked { .. }) => Ok(Reach::Socket),
        Err(e) => {
            eprintln!("proxygate: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Sends a source operation to the running gateway; returns its JSON answer.
fn through_socket(cfg: &RootConfig, op: &Op) -> Result<Value, ExitCode> {
    match control::request(&cfg.data_dir, op) {
        Ok(reply) if reply.code == 0 => Ok(serde_json::from_str(&reply.stdout).unwrap_or_default()),
        Ok(reply) => {
            eprint!("{}", reply.stderr);
            Err(ExitCode::from(reply.code))
        }
        Err(e) => {
            eprintln!(
                "proxygate: a gateway holds {}, and its control socket did not answer ({e})",
                cfg.data_dir.display()
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// Runs `work` with a sources runtime over a stopped data dir's catalog, on a runtime of its
/// own; an error is printed and becomes the exit code.
fn here<F>(
    cfg: &RootConfig,
    catalog: Arc<Mutex<Catalog>>,
    work: impl FnOnce(Arc<SourcesRuntime>) -> F,
) -> Result<Value, ExitCode>
where
    F: std::future::Future<Output = Result<Value, OpError>>,
{
    let rt = crate::sources::runtime(cfg, catalog, None, SourceMetrics::unregistered()).map_err(
        |e| {
            eprintln!("proxygate: {e:#}");
            ExitCode::FAILURE
        },
    )?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("proxygate: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })?;
    tokio.block_on(work(rt)).map_err(|e| {
        eprintln!("proxygate: {e}");
        ExitCode::from(e.exit_code())
    })
}

/// A progress display: a bar on a terminal, a line per 10 % otherwise.
fn progress(what: &'static str) -> impl Fn(usize, usize, usize) + Send + Sync {
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let last_tenth = std::sync::atomic::AtomicUsize::new(0);
    move |done: usize, total: usize, passed: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(format!("{what}: {passed} passed"));
            if done == total {
                b.finish_and_clear();
            }
        } else if let Some(tenth) = (done * 10).checked_div(total)
            && tenth > last_tenth.swap(tenth, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("proxygate: {what}: {done}/{total}, {passed} passed");
        }
    }
}

pub(crate) fn sources(args: SourcesArgs) -> ExitCode {
    let mut cfg = match load(&args.at) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (op, allow_private) = match &args.command {
        SourcesCommand::List => (Op::SourcesList, false),
        SourcesCommand::Fetch {
            names,
            check,
            import,
            allow_private_networks,
        } => (
            Op::SourcesFetch {
                names: names.clone(),
                check: *check || *import,
                import: *import,
            },
            *allow_private_networks,
        ),
    };
    if allow_private {
        cfg.allow_private_networks = true;
        cfg.gateway.allow_private_networks = true;
    }
    let answer = match admin(&args.at) {
        Err(code) => return code,
        Ok(Some(a)) => {
            let r = match &op {
                Op::SourcesFetch {
                    names,
                    check,
                    import,
                } => {
                    let body =
                        serde_json::json!({ "sources": names, "check": check, "import": import });
                    a.call(
                        reqwest::Method::POST,
                        "/api/v1/sources/fetch",
                        Some(Body::Json(body)),
                    )
                }
                _ => a.get("/api/v1/sources"),
            };
            match r {
                Ok(ans) => ans.value(),
                Err(f) => return f.exit(),
            }
        }
        Ok(None) => match reach(&cfg) {
            Err(code) => return code,
            Ok(Reach::Socket) => match through_socket(&cfg, &op) {
                Ok(v) => v,
                Err(code) => return code,
            },
            Ok(Reach::Here(catalog)) => {
                let op = op.clone();
                let r = here(&cfg, catalog, |rt| async move {
                    match op {
                        Op::SourcesFetch {
                            names,
                            check,
                            import,
                        } => rt
                            .fetch_now(&names, check, import, &progress("checking"))
                            .await
                            .map(|s| serde_json::json!({ "sources": s })),
                        _ => rt.view(),
                    }
                });
                match r {
                    Ok(v) => v,
                    Err(code) => return code,
                }
            }
        },
    };
    if args.at.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    } else if matches!(op, Op::SourcesList) {
        print!("{}", render_list(&answer));
    } else {
        print!("{}", render_summary(&answer));
    }
    let failed: Vec<String> = answer["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let e = s["error"].as_str()?;
            Some(format!("{}: {e}", s["name"].as_str().unwrap_or("?")))
        })
        .collect();
    if matches!(op, Op::SourcesFetch { .. }) && !failed.is_empty() {
        for f in &failed {
            eprintln!("proxygate: source {f}");
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

pub(crate) fn check(args: CheckArgs) -> ExitCode {
    if !args.all && args.ids.is_empty() {
        eprintln!("proxygate: give upstream ids, or --all");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cfg = match load(&args.at) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let op = Op::Check {
        ids: args.ids.clone(),
    };
    let answer = match admin(&args.at) {
        Err(code) => return code,
        Ok(Some(a)) => {
            let body = serde_json::json!({ "ids": args.ids });
            match a.call(
                reqwest::Method::POST,
                "/api/v1/refresh",
                Some(Body::Json(body)),
            ) {
                Ok(ans) => ans.value(),
                Err(f) => return f.exit(),
            }
        }
        Ok(None) => {
            if !Store::exists(&cfg.data_dir) {
                eprintln!("proxygate: no data dir at {}", cfg.data_dir.display());
                return ExitCode::FAILURE;
            }
            match reach(&cfg) {
                Err(code) => return code,
                Ok(Reach::Socket) => match through_socket(&cfg, &op) {
                    Ok(v) => v,
                    Err(code) => return code,
                },
                Ok(Reach::Here(catalog)) => {
                    let names = args.ids.clone();
                    let r = here(&cfg, catalog, |rt| async move {
                        let s = rt.recheck_named(&names, &progress("checking")).await?;
                        Ok(serde_json::to_value(s).unwrap_or_default())
                    });
                    match r {
                        Ok(v) => v,
                        Err(code) => return code,
                    }
                }
            }
        }
    };
    if args.at.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    } else {
        print!("{}", render_checks(&answer));
    }
    if answer["inconclusive"].as_u64().unwrap_or(0) > 0 {
        eprintln!("proxygate: some checks could not run: no judge answers");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `check` table.
pub(crate) fn render_checks(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<16}  {:<32}  {:<6}  {:>8}  {:<11}  {:<15}  {}\n",
        "ID", "UPSTREAM", "RESULT", "LATENCY", "ANONYMITY", "EXIT IP", "WHY"
    );
    for r in v["results"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16}  {:<32}  {:<6}  {:>8}  {:<11}  {:<15}  {}",
            cell(&r["id"]),
            cell(&r["address"]),
            if r["passed"].as_bool() == Some(true) {
                "ok"
            } else {
                "failed"
            },
            r["latency_ms"]
                .as_u64()
                .map_or("-".into(), |ms| format!("{ms}ms")),
            cell(&r["anonymity"]),
            cell(&r["exit_ip"]),
            match (r["error"].as_str(), r["leak"].as_str()) {
                (Some(e), _) => e.to_owned(),
                (None, Some(l)) => format!("leak (demoted to untrusted): it {l}"),
                (None, None) => String::new(),
            }
        );
    }
    let _ = writeln!(
        out,
        "checked {}: {} passed, {} failed{} in {} ms",
        cell(&v["checked"]),
        cell(&v["passed"]),
        cell(&v["failed"]),
        match v["inconclusive"].as_u64() {
            Some(n) if n > 0 => format!(", {n} inconclusive (no judge)"),
            _ => String::new(),
        },
        cell(&v["elapsed_ms"])
    );
    out
}

/// The `sources list` table.
pub(crate) fn render_list(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<20}  {:<19}  {:>6}  {:>6}  {:>8}  {:>7}  {:>7}  {:>8}  {:>8}  {}\n",
        "SOURCE", "KIND", "OK", "FAILED", "UNIQUE", "PASSED", "YIELD", "ALIVE24H", "SERVED", "NOTE"
    );
    for s in v["sources"].as_array().into_iter().flatten() {
        let unique = s["unique"].as_u64().unwrap_or(0);
        let passed = s["passed"].as_u64().unwrap_or(0);
        let note = match (s["why"].as_str(), s["last_error"].as_str()) {
            (Some(why), _) => why.to_owned(),
            (None, Some(e)) => format!("last fetch failed: {e}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<20}  {:<19}  {:>6}  {:>6}  {:>8}  {:>7}  {:>7}  {:>8}  {:>8}  {}",
            cell(&s["name"]),
            cell(&s["kind"]),
            cell(&s["fetches_ok"]),
            cell(&s["fetches_failed"]),
            unique,
            passed,
            if unique > 0 {
                format!("{:.1}%", passed as f64 * 100.0 / unique as f64)
            } else {
                "-".into()
            },
            cell(&s["alive_24h"]),
            s["served_success_rate"]
                .as_f64()
                .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            note
        );
    }
    out
}
