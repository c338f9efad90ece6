//! What the store costs at pool scale: loading every record at start (decrypting each), an
//! operator's add (one record, flushed before it is acknowledged), and the persister's
//! write-behind batch.
//!
//! ```text
//! cargo bench -p proxygate-store --bench store
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark: a broken setup must stop it loudly"
)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proxygate_core::{Upstream, UpstreamId};
use proxygate_store::{Origin, Record, Stats, Store};

fn record(i: usize) -> Record {
    let url = format!(
        "socks5://user{i}:pass{i}@10.{}.{}.{}:1080",
        i >> 16,
        (i >> 8) & 255,
        i & 255
    );
    Record::new(Upstream::parse(&url).unwrap(), Origin::Operator, 1)
}

fn filled(n: usize) -> (tempfile::TempDir, Store, Vec<UpstreamId>) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), None).unwrap();
    let ids = (0..n)
        .map(|i| {
            let r = record(i);
            store.put(&r).unwrap();
            r.upstream.id()
        })
        .collect();
    store.flush().unwrap();
    (dir, store, ids)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for n in [10_000usize, 100_000] {
        let (_dir, store, ids) = filled(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("load_all_records", n), |b| {
            b.iter(|| assert_eq!(store.records().unwrap().len(), n));
        });
        let stats = Stats {
            reputation: 80,
            success_rate: Some(0.9),
            response_time_avg_ms: Some(120.0),
            total_uses: 10,
            ..Stats::default()
        };
        group.bench_function(BenchmarkId::new("write_stats_batch", n), |b| {
            b.iter(|| {
                store
                    .write_stats(ids.iter().map(|id| (*id, &stats)))
                    .unwrap()
            });
        });
    }
    group.throughput(Throughput::Elements(1));
    let (_dir, store, _) = filled(1000);
    let mut i = 1_000_000;
    group.bench_function("add_one_flushed", |b| {
        b.iter(|| {
            i += 1;
            store.put(&record(i)).unwrap();
            store.flush().unwrap();
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
