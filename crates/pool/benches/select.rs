//! Selection cost per strategy at 100, 10,000 and 1,000,000 upstreams (and with a country
//! filter that 1 upstream in 4,000 matches), on one thread and on
//! every core at once (`available_parallelism` threads sharing one pool). A pick is
//! `select(&[])` plus dropping the lease. Upstreams get one success each first (spread over
//! three response-time tiers, so reputations and latencies differ), which ends their
//! probation, and the pool is reindexed as the running gateway does every second.
//!
//! ```text
//! cargo bench -p proxygate-pool --bench select
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark: a broken setup must stop it loudly"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proxygate_core::{Outcome, Route, Upstream};
use proxygate_pool::{HealthConfig, Pool, PoolReader, Strategy};

/// Upstream number `i`: `http://10.x.y.z:8080`, with `query` appended.
fn upstream(i: usize, query: &str) -> Upstream {
    Upstream::parse(&format!(
        "http://10.{}.{}.{}:8080{query}",
        i >> 16,
        (i >> 8) & 255,
        i & 255
    ))
    .unwrap()
}

fn pool(n: usize) -> (PoolReader, proxygate_pool::PoolWriter) {
    let (r, w) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
    w.replace((0..n).map(|i| upstream(i, "")));
    let ids: Vec<_> = r.snapshot().entries().iter().map(|e| e.id).collect();
    for (i, id) in ids.into_iter().enumerate() {
        let ms = [100, 1250, 3000][i % 3];
        r.lease(id).unwrap().report(&Outcome {
            connect: Some(Duration::from_millis(ms)),
            handshake: Some(Duration::ZERO),
            ..Outcome::default()
        });
    }
    w.reindex();
    (r, w)
}

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for n in [100usize, 10_000, 1_000_000] {
        let (reader, writer) = pool(n);
        let mut group = c.benchmark_group(format!("select/{n}"));
        group.throughput(Throughput::Elements(1));
        group.sample_size(30);
        group.measurement_time(Duration::from_secs(2));
        group.warm_up_time(Duration::from_millis(500));
        for strategy in Strategy::ALL {
            writer.set_strategy(strategy);
            group.bench_function(BenchmarkId::new("1-thread", strategy), |b| {
                b.iter(|| black_box(reader.select(&[])));
            });
            let shared = Arc::new(reader.clone());
            group.bench_function(
                BenchmarkId::new(format!("{threads}-threads"), strategy),
                |b| {
                    b.iter_custom(|iters| {
                        let per = iters / threads as u64 + 1;
                        let start = Instant::now();
                        std::thread::scope(|s| {
                            for _ in 0..threads {
                                let r = Arc::clone(&shared);
                                s.spawn(move || {
                                    for _ in 0..per {
                                        black_box(r.select(&[]));
                                    }
                                });
                            }
                        });
                        // Reported per pick as each thread sees it: wall time / picks per thread.
                        start.elapsed().mul_f64(iters as f64 / per as f64)
                    });
                },
            );
        }
        group.finish();
    }
}

/// A route filter matched by 1 upstream in 4,000 of a 1,000,000 pool.
fn bench_sparse_filter(c: &mut Criterion) {
    let (r, w) = Pool::create(Strategy::WeightedRandom, HealthConfig::default());
    w.replace((0..1_000_000usize).map(|i| {
        let cc = if i % 4000 == 0 { "fr" } else { "us" };
        upstream(i, &format!("?country={cc}"))
    }));
    let route = Route::parse("a-country-fr").unwrap().1;
    let mut group = c.benchmark_group("select_filtered/1000000");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    for strategy in Strategy::ALL {
        w.set_strategy(strategy);
        group.bench_function(BenchmarkId::new("1-thread", strategy), |b| {
            b.iter(|| black_box(r.select_route(&route, None, None, &[])));
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_sparse_filter);
criterion_main!(benches);
