//! Wiring: config + command line -> pool, gateway, server; signals -> one shutdown.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use proxygate_core::Shutdown;
use proxygate_gateway::auth::ClientAuth;
use proxygate_gateway::{Gateway, Server};
use proxygate_pool::{Pool, PoolReader, PoolWriter, Strategy};
use proxygate_store::Store;
use tracing_subscriber::EnvFilter;

use proxygate_admin::api::{self, Actions, Api};
use proxygate_admin::metrics::{AdminMetrics, PoolCollector, RuntimeCollector};
use proxygate_admin::persister::{self, persist};
use proxygate_admin::sources::{SourceActions, SourcesRuntime};
use proxygate_admin::stats::{self, StatsBook};
use proxygate_admin::{Catalog, control, every};
use proxygate_core::ConfigErrors;
use proxygate_sources::metrics::SourceMetrics;

use crate::config::{LogFormat, RootConfig};
use crate::reload::{Reloader, Signals};
use crate::{EXIT_CONFIG, RunArgs};

/// Builds the final config from file and flags; every problem is reported at once.
pub(crate) fn resolve(
    args: &RunArgs,
) -> Result<(RootConfig, Vec<proxygate_core::Upstream>), ConfigErrors> {
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
    if let Some(addr) = args.admin_listen {
        cfg.admin.listen = addr;
    }
    if args.no_sources {
        cfg.sources.clear();
    }
    if let Some(path) = &args.users_file {
        cfg.gateway.auth.users_file = Some(path.clone());
    }
    if args.allow_private_networks {
        cfg.allow_private_networks = true;
    }
    cfg.gateway.allow_private_networks = cfg.allow_private_networks;
    if let Some(name) = &args.strategy {
        match name.parse::<Strategy>() {
            Ok(s) => cfg.pool.strategy = s,
            Err(e) => problems.push(proxygate_core::Problem::new("--strategy", e.to_string())),
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
    let mut catalog = match open_catalog(&cfg, &upstreams) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("proxygate: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The catalog holds the config's upstreams now. Kept, the list would hold ~110 bytes per
    // upstream for the process's whole life (1.1 MB with 10,000).
    drop(upstreams);
    // What the start freed (the config's list, the files it was read from, the store's
    // records as read) goes back now: this thread next allocates little, so mimalloc would
    // keep those pages (results-2026-11-30.md, "A pool's memory in long use").
    crate::memory::give_back_all();
    let mut cfg = cfg;
    // What `pool strategy --reset` returns to: the config's choice (or --strategy's).
    let configured = cfg.pool.strategy;
    if args.strategy.is_none() {
        match catalog.store().setting("strategy") {
            Ok(Some(name)) => match name.parse::<Strategy>() {
                Ok(s) => {
                    if s != cfg.pool.strategy {
                        tracing::info!(
                            "strategy {s}: set by an operator (`proxygate pool strategy --reset` \
                             returns to the config's {})",
                            cfg.pool.strategy
                        );
                    }
                    cfg.pool.strategy = s;
                }
                Err(e) => tracing::warn!("stored strategy ignored: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!("stored strategy unreadable: {e}"),
        }
    }
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
    let pool = Pool::create(cfg.pool.strategy, cfg.pool.health());
    catalog.attach(pool.1.clone(), configured);
    match runtime.block_on(serve(cfg, catalog, pool, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("proxygate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the data dir, reads the pool and brings the config's upstreams into it.
fn open_catalog(
    cfg: &RootConfig,
    upstreams: &[proxygate_core::Upstream],
) -> Result<Catalog, proxygate_store::StoreError> {
    let env_key = std::env::var(proxygate_store::KEY_ENV).ok();
    let (store, report) = Store::open(&cfg.data_dir, env_key.as_deref())?;
    if let Some(path) = &report.generated_key {
        tracing::warn!(
            "generated a new encryption key in {}: back it up with the data dir (without it the \
             stored credentials cannot be read)",
            path.display()
        );
    }
    for m in &report.migrated {
        tracing::info!(migration = m, "data dir migrated");
    }
    if let Some(to) = report.rotation_pending {
        tracing::warn!("a key rotation to key {to} is unfinished: run `proxygate key rotate`");
    }
    let mut catalog =
        Catalog::load(Arc::new(store), cfg.pool.health()).map(|c| c.with_trust(cfg.trust()))?;
    let (changed, removed) = catalog.sync_config(upstreams)?;
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        upstreams = catalog.enabled(),
        from_config_changed = changed,
        from_config_removed = removed,
        "pool loaded"
    );
    Ok(catalog)
}

/// Runs the gateway until shutdown: the background loops, the control socket, the admin API
/// and the listeners, then the drain and a last flush of the stats.
async fn serve(
    cfg: RootConfig,
    catalog: Catalog,
    (reader, writer): (PoolReader, PoolWriter),
    args: RunArgs,
) -> anyhow::Result<()> {
    let auth = client_auth(&cfg)?;
    writer.set_session_ttl(cfg.pool.session_ttl);
    writer.set_new_session_exit(cfg.pool.new_session_exit);
    let pool_size = reader.snapshot().len();
    announce_empty_pool(&cfg, pool_size);

    let registry = prometheus::Registry::new();
    let metrics = proxygate_gateway::Metrics::register(&registry).context("metrics")?;
    let admin_metrics = AdminMetrics::register(&registry).context("metrics")?;
    registry
        .register(Box::new(
            PoolCollector::new(reader.clone(), catalog.disabled_counter()).context("metrics")?,
        ))
        .context("metrics")?;
    let source_names: Vec<String> = cfg.sources.iter().map(|s| s.name.clone()).collect();
    let source_metrics = SourceMetrics::register(&registry, &source_names).context("metrics")?;

    let store = Arc::clone(catalog.store());
    let catalog = Arc::new(Mutex::new(catalog));
    let (trigger, shutdown) = Shutdown::new();
    let sources = crate::sources::runtime(
        &cfg,
        Arc::clone(&catalog),
        Some(reader.clone()),
        source_metrics,
    )?;
    spawn_sources(&cfg, &sources, &source_names, &shutdown);
    spawn_janitor(&cfg, &catalog, &shutdown);
    let stats = Arc::new(Mutex::new(StatsBook::default()));
    spawn_pool_upkeep(&cfg, &reader, &writer, &stats, &shutdown);
    let flushes = admin_metrics.store_flush.clone();
    let persister = tokio::spawn(persister::run(
        cfg.store.stats_flush_interval,
        Arc::clone(&store),
        reader.clone(),
        shutdown.clone(),
        move |took| flushes.observe(took.as_secs_f64()),
    ));
    let actions: Arc<dyn Actions> = Arc::new(SourceActions(Arc::clone(&sources)));
    spawn_control(&cfg, &catalog, &actions, &shutdown);
    let api = Api {
        catalog: Arc::clone(&catalog),
        store: Arc::clone(&store),
        pool: reader.clone(),
        registry: registry.clone(),
        stats,
        actions,
        token: admin_token(&cfg)?,
        ready_min_healthy: cfg.admin.ready_min_healthy,
        rotating: tokio::sync::Mutex::new(()),
    };
    start_admin(&cfg, api, &shutdown).await?;

    let gateway = Gateway::new(cfg.gateway.clone(), auth, reader.clone(), shutdown, metrics)
        .context("dial.tls_ca_file")?;
    let server = Server::bind(gateway)
        .await?
        .on_worker_tick(crate::memory::give_back);
    registry
        .register(Box::new(
            RuntimeCollector::new(server.runtimes()).context("metrics")?,
        ))
        .context("metrics")?;
    // Handlers first: a SIGTERM right after "listening" must drain, not kill.
    let reloader = Reloader {
        args,
        started: cfg.clone(),
        live: server.live(),
        catalog: Arc::clone(&catalog),
        writer: writer.clone(),
    };
    let signals = Signals::register().context("signal handlers")?;
    let signals = tokio::spawn(signals.run(reloader, trigger));
    for addr in server.local_addrs() {
        tracing::info!(strategy = %cfg.pool.strategy, upstreams = pool_size, "listening on {addr}");
    }
    let left = server.run().await;
    if left > 0 {
        tracing::info!(
            closed = left,
            "closed the connections left after the grace period"
        );
    }
    signals.abort();
    let _ = persister.await;
    flush_at_exit(store, reader).await;
    tracing::info!("stopped");
    Ok(())
}

/// Client authentication as configured: the allow-list, and the accounts of
/// `auth.users_file`.
fn client_auth(cfg: &RootConfig) -> anyhow::Result<ClientAuth> {
    let auth = ClientAuth::open().with_allow(cfg.gateway.server.allow.clone());
    match &cfg.gateway.auth.users_file {
        Some(path) => Ok(auth.with_users(ClientAuth::load_users(path).context("auth.users_file")?)),
        None => Ok(auth),
    }
}

/// Says at startup what an empty pool means for the first requests.
fn announce_empty_pool(cfg: &RootConfig, pool_size: usize) {
    if pool_size == 0 && cfg.sources.is_empty() {
        tracing::warn!(
            "the pool is empty and no list source is configured: every request will be \
             answered 503 until upstreams are added"
        );
    } else if pool_size == 0 {
        tracing::info!(
            sources = cfg.sources.len(),
            "the pool is empty: it fills as the list sources are fetched and checked"
        );
    }
}

/// The list sources' loops: fetches and their import batches (when any source is
/// configured; `names` are theirs), the rechecks of the pool and the audits.
fn spawn_sources(
    cfg: &RootConfig,
    sources: &Arc<SourcesRuntime>,
    names: &[String],
    shutdown: &Shutdown,
) {
    if !cfg.sources.is_empty() {
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.sources.len());
        tokio::spawn(
            sources
                .refresher(cfg.refresh.full_reimport)
                .run(tx, shutdown.clone()),
        );
        tokio::spawn(Arc::clone(sources).run_batches(rx, shutdown.clone()));
        tracing::info!(
            sources = %names.join(", "),
            "list sources on: fetched now, then on their intervals"
        );
    }
    tokio::spawn(Arc::clone(sources).run_rechecks(shutdown.clone()));
    tokio::spawn(Arc::clone(sources).run_audits(shutdown.clone()));
}

/// The janitor's pass every `janitor.interval`: list upstreams dead for long disabled, those
/// unused for long deleted, each logged with why.
fn spawn_janitor(cfg: &RootConfig, catalog: &Arc<Mutex<Catalog>>, shutdown: &Shutdown) {
    let (swept, janitor) = (Arc::clone(catalog), cfg.janitor.clone());
    tokio::spawn(every(janitor.interval, shutdown.clone(), move || {
        let (swept, janitor) = (Arc::clone(&swept), janitor.clone());
        async move {
            let pass = tokio::task::spawn_blocking(move || {
                swept
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .janitor(proxygate_admin::catalog::unix_ms(), &janitor)
            })
            .await;
            match pass {
                Ok(Ok(s)) => {
                    for (id, why) in &s.disabled {
                        tracing::info!(upstream = id, "janitor disabled: {why}");
                    }
                    for (id, why) in &s.deleted {
                        tracing::info!(upstream = id, "janitor deleted: {why}");
                    }
                }
                Ok(Err(e)) => tracing::error!("janitor: {e}"),
                Err(e) => tracing::error!("janitor: {e}"),
            }
        }
    }));
}

/// The pool's upkeep: its orders re-indexed every `pool.reindex_interval`, per-site outcomes
/// that no longer block anything forgotten a minute at a time, and the admin API's stats
/// sampled.
fn spawn_pool_upkeep(
    cfg: &RootConfig,
    reader: &PoolReader,
    writer: &PoolWriter,
    stats: &Arc<Mutex<StatsBook>>,
    shutdown: &Shutdown,
) {
    let reindexer = writer.clone();
    tokio::spawn(every(
        cfg.pool.reindex_interval,
        shutdown.clone(),
        move || {
            reindexer.reindex();
            async {}
        },
    ));
    let sites = reader.clone();
    tokio::spawn(every(
        std::time::Duration::from_secs(60),
        shutdown.clone(),
        move || {
            sites.sweep_sites(std::time::Instant::now());
            async {}
        },
    ));
    let (sampled, sampled_pool) = (Arc::clone(stats), reader.clone());
    tokio::spawn(every(stats::SAMPLE_EVERY, shutdown.clone(), move || {
        sampled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sample(&sampled_pool);
        async {}
    }));
}

/// The control socket in the data dir, which `proxygate pool` commands reach. Without it the
/// gateway still serves; the operator is told why.
fn spawn_control(
    cfg: &RootConfig,
    catalog: &Arc<Mutex<Catalog>>,
    actions: &Arc<dyn Actions>,
    shutdown: &Shutdown,
) {
    match control::bind(&cfg.data_dir) {
        Ok(listener) => {
            tokio::spawn(control::serve(
                listener,
                control::socket_path(&cfg.data_dir),
                Arc::clone(catalog),
                Arc::clone(actions),
                shutdown.clone(),
            ));
        }
        Err(e) => tracing::warn!(
            "control socket {}: {e}; `proxygate pool` commands cannot reach this gateway",
            control::socket_path(&cfg.data_dir).display()
        ),
    }
}

/// The admin API's bearer token, from `admin.token_file` when set.
fn admin_token(cfg: &RootConfig) -> anyhow::Result<Option<proxygate_core::Secret>> {
    let Some(path) = &cfg.admin.token_file else {
        return Ok(None);
    };
    let token = proxygate_admin::config::read_token(path)
        .map_err(|why| anyhow::anyhow!("admin.token_file: {why}"))?;
    Ok(Some(proxygate_core::Secret::new(token.as_str())))
}

/// The admin API (`/metrics`, `/livez`, `/readyz`, `/api/v1`) on `admin.listen`.
async fn start_admin(cfg: &RootConfig, api: Api, shutdown: &Shutdown) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", cfg.admin.listen))?;
    let addr = listener.local_addr()?;
    tokio::spawn(api::serve(listener, Arc::new(api), shutdown.clone()));
    tracing::info!(
        "admin API on http://{addr} (/metrics, /livez, /readyz, /api/v1){}",
        if cfg.admin.token_file.is_some() {
            ", bearer token required"
        } else {
            ""
        }
    );
    Ok(())
}

/// The stats once more after the drain: the last tunnels' outcomes are in.
async fn flush_at_exit(store: Arc<Store>, reader: PoolReader) {
    let last = tokio::task::spawn_blocking(move || persist(&store, &reader)).await;
    match last {
        Ok(Ok(n)) => tracing::info!(upstreams = n, "stats flushed"),
        Ok(Err(e)) => tracing::error!("flushing stats at shutdown: {e}"),
        Err(e) => tracing::error!("flushing stats at shutdown: {e}"),
    }
}
