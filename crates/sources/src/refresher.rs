//! [`Refresher`]: fetches each source on its interval (the first time at start), with jitter,
//! and sends what it got to the app as a [`Batch`] over a channel. It never touches the store
//! or the pool: the app checks the candidates and merges them.
//!
//! A source's interval is stretched for a low-yield source ([`crate::quality`]); every
//! `refresh.full_reimport` its batch is marked `full`, and every candidate in it is checked
//! again, known or not ("daily rotation").

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxygate_core::Shutdown;
use tokio::sync::mpsc;

use crate::config::SourceConfig;
use crate::fetch::{FetchReport, Fetcher};
use crate::quality::{Quality, next_interval};

/// One source's fetch, for the app to check and merge.
#[derive(Debug)]
pub struct Batch {
    pub report: FetchReport,
    /// Check every candidate, known ones too.
    pub full: bool,
}

/// The background fetcher of every source.
#[derive(Debug)]
pub struct Refresher {
    sources: Vec<SourceConfig>,
    fetcher: Fetcher,
    quality: Arc<Quality>,
    full_every: Duration,
}

impl Refresher {
    pub fn new(
        sources: Vec<SourceConfig>,
        fetcher: Fetcher,
        quality: Arc<Quality>,
        full_every: Duration,
    ) -> Refresher {
        Refresher {
            sources,
            fetcher,
            quality,
            full_every,
        }
    }

    /// Fetches every source until shutdown, each on its own schedule, sending a batch per
    /// fetch (waiting while the app is busy with earlier ones).
    pub async fn run(self, tx: mpsc::Sender<Batch>, shutdown: Shutdown) {
        let mut tasks = tokio::task::JoinSet::new();
        for src in self.sources {
            let (fetcher, quality, tx) =
                (self.fetcher.clone(), Arc::clone(&self.quality), tx.clone());
            let mut shutdown = shutdown.clone();
            let full_every = self.full_every;
            tasks.spawn(async move {
                // Known candidates are checked again only from the first full re-import on:
                // a restart does not re-check a whole pool that already has reputations.
                let mut last_full = Instant::now();
                loop {
                    let report = tokio::select! {
                        r = fetcher.fetch(&src) => r,
                        () = shutdown.wait() => return,
                    };
                    let full = last_full.elapsed() >= full_every;
                    if full {
                        last_full = Instant::now();
                    }
                    if tx.send(Batch { report, full }).await.is_err() {
                        return;
                    }
                    let wait = jittered(next_interval(src.interval, &quality.get(&src.name)));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.wait() => return,
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// `d` plus or minus up to 10 %: sources fetched on the same interval drift apart.
pub fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + 0.2 * fastrand::f64())
}
