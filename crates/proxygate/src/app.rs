//! Wiring: config + command line -> pool, gateway, server; signals -> one shutdown.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use proxygate_core::Shutdown;
use proxygate_gateway::auth::ClientAuth;
use proxygate_gateway::{Gateway, Server};
use proxygate_pool::{Pool, PoolWriter, Strategy};
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigErrors, LogFormat, RootConfig};
use crate::{EXIT_CONFIG, RunArgs};

/// Builds the final config from file and flags; every problem is reported at once.
fn resolve(args: &RunArgs) -> Result<(RootConfig, Vec<proxygate_core::Upstream>), ConfigErrors> {
    let source = args
        .config
        .as_ref()
        .map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
    let (mut cfg, mut problems) = match &args.config {
        Some(path) => RootConfig::load(path),
        None => (RootConfig::default(), Vec::new()),
    };
    if !args.listen.is_empty() {
        cfg.gateway.server.listen = args.listen.clone();
    }
    if let Some(dir) = &args.data_dir {
        cfg.data_dir = dir.clone();
    }
    if let Some(name) = &args.strategy {
        match name.parse::<Strategy>() {
            Ok(s) => cfg.pool.strategy = s,
            Err(e) => problems.push(proxygate_gateway::config::Problem::new(
                "--strategy",
                e.to_string(),
            )),
        }
    }
    cfg.upstreams.urls.extend(args.upstream.iter().cloned());
    cfg.upstreams
        .files
        .extend(args.upstreams_file.iter().cloned());
    match cfg.validate() {
        Ok(upstreams) if problems.is_empty() => Ok((cfg, upstreams)),
        Ok(_) => Err(ConfigErrors { source, problems }),
        Err(more) => {
            problems.extend(more);
            Err(ConfigErrors { source, problems })
        }
    }
}

fn init_logging(cfg: &RootConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub(crate) fn run(args: RunArgs) -> ExitCode {
    let (cfg, upstreams) = match resolve(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxygate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cfg, upstreams)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("proxygate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: RootConfig, upstreams: Vec<proxygate_core::Upstream>) -> anyhow::Result<()> {
    let mut auth = ClientAuth::open().with_allow(cfg.gateway.server.allow.clone());
    if let Some(path) = &cfg.gateway.auth.users_file {
        auth = auth.with_users(ClientAuth::load_users(path).context("auth.users_file")?);
    }
    let (reader, writer) = Pool::create(cfg.pool.strategy, cfg.pool.health());
    writer.replace(upstreams);
    writer.set_session_ttl(cfg.pool.session_ttl);
    let pool_size = reader.snapshot().len();
    if pool_size == 0 {
        tracing::warn!(
            "the pool is empty: every request will be answered 503 until upstreams are added"
        );
    }

    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(reindexer(
        writer.clone(),
        cfg.pool.reindex_interval,
        shutdown.clone(),
    ));
    let gateway =
        Gateway::new(cfg.gateway.clone(), auth, reader, shutdown).context("dial.tls_ca_file")?;
    let server = Server::bind(gateway).await?;
    for addr in server.local_addrs() {
        tracing::info!(strategy = %cfg.pool.strategy, upstreams = pool_size, "listening on {addr}");
    }
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        trigger.fire();
    });
    server.run().await;
    signals.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Refreshes the pool's orders (by reputation, by response time) from live stats.
async fn reindexer(writer: PoolWriter, every: std::time::Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => writer.reindex(),
            () = shutdown.wait() => return,
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
