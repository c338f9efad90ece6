//! Wiring of the list sources: the checker dials through the gateway's own connectors
//! ([`GatewayConnect`]), and [`runtime`] builds the control plane's sources runtime for `run`,
//! `sources fetch` and `check`.

use std::sync::{Arc, Mutex};

use proxygate_admin::Catalog;
use proxygate_admin::sources::SourcesRuntime;
use proxygate_core::{Target, Upstream};
use proxygate_gateway::GatewayError;
use proxygate_gateway::dial::Connector;
use proxygate_pool::PoolReader;
use proxygate_sources::checker::{BoxFuture, Checker, Connect, Failure, Stream};
use proxygate_sources::fetch::Fetcher;
use proxygate_sources::metrics::SourceMetrics;
use proxygate_sources::quality::Quality;

use crate::config::RootConfig;

/// The gateway's connectors, as the checker's [`Connect`].
#[derive(Debug)]
pub(crate) struct GatewayConnect(pub(crate) Connector);

fn failure(e: GatewayError) -> Failure {
    Failure::new(e.kind, e.detail.into_owned())
}

impl Connect for GatewayConnect {
    fn open<'a>(&'a self, up: &'a Upstream) -> BoxFuture<'a, Result<Stream, Failure>> {
        Box::pin(async move {
            self.0
                .open(up)
                .await
                .map(|io| Box::new(io) as Stream)
                .map_err(failure)
        })
    }

    fn handshake<'a>(
        &'a self,
        up: &'a Upstream,
        io: Stream,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<Stream, Failure>> {
        Box::pin(async move {
            self.0
                .handshake(up, Box::new(io), target)
                .await
                .map(|io| Box::new(io) as Stream)
                .map_err(failure)
        })
    }
}

/// The sources runtime over `catalog` (and, in a running gateway, its `pool`).
pub(crate) fn runtime(
    cfg: &RootConfig,
    catalog: Arc<Mutex<Catalog>>,
    pool: Option<PoolReader>,
    metrics: SourceMetrics,
) -> anyhow::Result<Arc<SourcesRuntime>> {
    let tls = proxygate_gateway::tls::client_config(cfg.gateway.dial.tls_ca_file.as_deref())
        .map_err(|e| anyhow::anyhow!("dial.tls_ca_file: {e}"))?;
    let connector = Connector::new(
        cfg.gateway.dial.clone(),
        Arc::clone(&tls),
        cfg.gateway.policy(),
    );
    let checker = Arc::new(Checker::new(
        Arc::new(GatewayConnect(connector)),
        cfg.checker.clone(),
        tls,
    ));
    let fetcher = Fetcher::new(cfg.refresh.clone(), cfg.allow_private_networks)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(SourcesRuntime::new(
        cfg.sources.clone(),
        fetcher,
        checker,
        catalog,
        pool,
        Arc::new(Quality::default()),
        metrics,
    )))
}
