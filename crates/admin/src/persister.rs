//! The persister: writes live reputation stats behind, once every
//! `store.stats_flush_interval`, and once more after the shutdown drain ([`persist`]). A crash
//! loses at most one interval of stats, never an acknowledged operator change (those are
//! flushed before they are acknowledged, by the [`crate::catalog`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxygate_core::Shutdown;
use proxygate_pool::{Entry, PoolReader};
use proxygate_store::{Store, StoreError};

use crate::catalog::{fill_from_stored, lacks_stored, live_only, unix_ms};

/// Writes the live stats of every upstream used since the last call ([`Store::write_stats`]),
/// flushed once. Returns how many were written.
pub fn persist(store: &Store, pool: &PoolReader) -> Result<usize, StoreError> {
    let snap = pool.snapshot();
    let now = Instant::now();
    let now_unix = unix_ms();
    let dirty: Vec<&Entry> = snap
        .entries()
        .iter()
        .filter(|e| e.health.take_dirty())
        .map(|e| &**e)
        .collect();
    if dirty.is_empty() {
        return Ok(0);
    }
    let written = dirty
        .iter()
        .map(|e| {
            // The stored stats only where the live ones lack something: a read and a parse
            // fewer per upstream, for nearly every upstream this process added.
            let mut stats = live_only(e, now, now_unix);
            if lacks_stored(&stats) {
                fill_from_stored(&mut stats, &store.stats(e.id)?);
            }
            Ok((e.id, stats))
        })
        .collect::<Result<Vec<_>, StoreError>>()
        .and_then(|batch| store.write_stats(batch.iter().map(|(id, s)| (*id, s))));
    if written.is_err() {
        // Not written: the next interval (or the shutdown flush) tries them again.
        for e in &dirty {
            e.health.mark_dirty();
        }
    }
    written
}

/// One write-behind batch, off the async threads; how long it took is `flushed`'s to record.
pub async fn persist_now(
    store: Arc<Store>,
    pool: PoolReader,
    flushed: impl FnOnce(Duration) + Send + 'static,
) -> Result<usize, StoreError> {
    let dir = store.dir().to_owned();
    let joined = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let n = persist(&store, &pool);
        if matches!(n, Ok(n) if n > 0) {
            flushed(t0.elapsed());
        }
        n
    })
    .await;
    joined.unwrap_or_else(|e| {
        Err(StoreError::Db {
            dir,
            message: format!("the stats writer stopped: {e}"),
        })
    })
}

/// Writes stats behind every `period` until shutdown (the caller flushes once more after the
/// drain).
pub async fn run(
    period: Duration,
    store: Arc<Store>,
    pool: PoolReader,
    shutdown: Shutdown,
    flushed: impl Fn(Duration) + Clone + Send + 'static,
) {
    crate::every(period, shutdown, move || {
        let (store, pool, flushed) = (Arc::clone(&store), pool.clone(), flushed.clone());
        async move {
            match persist_now(store, pool, flushed).await {
                Ok(n) if n > 0 => tracing::debug!(upstreams = n, "stats written"),
                Ok(_) => {}
                Err(e) => tracing::error!("writing stats: {e}"),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use proxygate_core::Outcome;
    use proxygate_pool::{HealthConfig, Pool, Strategy};

    #[test]
    fn persist_writes_only_what_changed_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), None).unwrap();
        let mut c = Catalog::load(Arc::new(store), HealthConfig::default()).unwrap();
        let (reader, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        c.attach(writer, Strategy::RoundRobin);
        c.add(&["http://10.0.0.1:1".into(), "http://10.0.0.2:1".into()])
            .unwrap();
        assert_eq!(reader.snapshot().len(), 2, "published live");
        assert_eq!(persist(c.store(), &reader).unwrap(), 0, "nothing used yet");
        let lease = reader.select(&[]).unwrap();
        let id = lease.id();
        lease.report(&Outcome {
            connect: Some(Duration::from_millis(20)),
            handshake: Some(Duration::ZERO),
            ..Outcome::default()
        });
        assert_eq!(persist(c.store(), &reader).unwrap(), 1);
        assert_eq!(persist(c.store(), &reader).unwrap(), 0, "written once");
        let saved = c.store().stats(id).unwrap();
        assert_eq!((saved.total_uses, saved.failures), (1, 0));
        assert!(saved.last_used_unix_ms.is_some() && saved.last_health_check_unix_ms.is_some());
        let live_rep = reader.snapshot().get(id).unwrap().health.reputation();
        assert_eq!(saved.reputation, live_rep);

        // A fresh pool over the same store starts from the saved stats.
        let store = Arc::clone(c.store());
        drop(c);
        let mut again = Catalog::load(store, HealthConfig::default()).unwrap();
        let (reader, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        again.attach(writer, Strategy::RoundRobin);
        let snap = reader.snapshot();
        let h = &snap.get(id).unwrap().health;
        assert_eq!((h.total_uses(), h.reputation()), (1, live_rep));
        assert!(!h.is_on_probation());

        // Used again after the restart, off probation: nothing re-checked it in this process,
        // so its last check comes from the store, which the flush must read for it.
        let checked = saved.last_health_check_unix_ms;
        let e = snap.get(id).unwrap();
        assert!(
            lacks_stored(&live_only(e, Instant::now(), unix_ms())),
            "no check since the restart"
        );
        reader
            .lease(id)
            .unwrap()
            .report(&Outcome::failed(proxygate_core::ErrorKind::UpstreamIo));
        assert_eq!(persist(again.store(), &reader).unwrap(), 1);
        let saved = again.store().stats(id).unwrap();
        assert_eq!((saved.total_uses, saved.failures), (2, 1));
        assert_eq!(
            saved.last_health_check_unix_ms, checked,
            "kept from the store"
        );
        assert!(
            saved.latency_histogram.is_some(),
            "restored, then written back"
        );
    }
}
