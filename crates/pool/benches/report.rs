//! The cost of reporting an attempt (what every dial, tunnel and forwarded response pays once):
//! select + report a success with measured times, and select + report a failure, on one
//! thread and on every core at once, over 100 upstreams. Reporting moves the moving averages,
//! the reputation, the per-upstream response-time histogram and the pool's recent-window
//! histogram.
//!
//! ```text
//! cargo bench -p proxygate-pool --bench report
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark: a broken setup must stop it loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proxygate_core::{ErrorKind, Outcome, Upstream};
use proxygate_pool::{HealthConfig, Pool, PoolReader, Strategy};

fn pool(n: usize) -> PoolReader {
    let (r, w) = Pool::create(Strategy::Random, HealthConfig::default());
    w.replace(
        (0..n)
            .map(|i| Upstream::parse(&format!("http://10.0.{}.{}:8080", i >> 8, i & 255)).unwrap()),
    );
    // Off probation, so every pick is selectable.
    let ids: Vec<_> = r.snapshot().entries().iter().map(|e| e.id).collect();
    for id in ids {
        r.lease(id).unwrap().report(&success(7));
    }
    std::mem::forget(w);
    r
}

fn success(ms: u64) -> Outcome {
    Outcome {
        connect: Some(Duration::from_millis(ms)),
        handshake: Some(Duration::from_millis(ms / 2)),
        ..Outcome::default()
    }
}

fn attempt(r: &PoolReader, i: u64) {
    let lease = r.select(&[]).unwrap();
    if i.is_multiple_of(16) {
        // A failure now and then keeps the failure path in the mix without exiling anyone.
        lease.report(&Outcome::failed(ErrorKind::UpstreamIo));
    } else {
        lease.report(&success(1 + i % 200));
    }
}

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut group = c.benchmark_group("report/100");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    let r = pool(100);
    group.bench_function(BenchmarkId::new("1-thread", "select+report"), |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            attempt(&r, i);
        });
    });
    let shared = Arc::new(pool(100));
    group.bench_function(
        BenchmarkId::new(format!("{threads}-threads"), "select+report"),
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let r = Arc::clone(&shared);
                        s.spawn(move || {
                            for i in 0..iters {
                                attempt(&r, i + t as u64);
                            }
                        });
                    }
                });
                start.elapsed()
            });
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
