//! What the store costs at pool scale: loading every record at start (decrypting each), an
//! operator's add (one record, flushed before it is acknowledged), and the persister's
//! write-behind of stats, in time and (`store_writes`) in bytes the data dir's file system is
//! sent, per changed row.
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

use criterion::measurement::{Measurement, ValueFormatter};
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
    // Under target/, on disk: a tmpfs /tmp would count no storage writes (`StorageWrites`).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
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

/// Bytes this process has caused to be sent to storage (`write_bytes` of `/proc/self/io`: page
/// cache pages dirtied, whoever writes them back), not bytes passed to `write(2)` (`wchar`):
/// with sled's batches the first was 50-150x the second (540-650 MiB against 4-11 for 40,000
/// rows of 200,000), and the first is what the disk sees. Without `/proc/self/io` the bench
/// says so and measures nothing; on a file system without writeback (tmpfs) every figure reads
/// 0, hence the store under `target/`.
struct StorageWrites;

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl Measurement for StorageWrites {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        write_bytes()
    }
    fn end(&self, start: u64) -> u64 {
        write_bytes().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &Bytes
    }
}

struct Bytes;

impl Bytes {
    fn scale(typical: f64, values: &mut [f64]) -> &'static str {
        let (div, unit) = match typical {
            t if t >= 1024.0 * 1024.0 => (1024.0 * 1024.0, "MiB"),
            t if t >= 1024.0 => (1024.0, "KiB"),
            _ => (1.0, "B"),
        };
        values.iter_mut().for_each(|v| *v /= div);
        unit
    }
}

impl ValueFormatter for Bytes {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        Bytes::scale(typical, values)
    }
    fn scale_throughputs(
        &self,
        typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per = match throughput {
            Throughput::Elements(n) | Throughput::Bytes(n) | Throughput::BytesDecimal(n) => {
                (*n).max(1) as f64
            }
            _ => 1.0,
        };
        values.iter_mut().for_each(|v| *v /= per);
        match Bytes::scale(typical / per, values) {
            "MiB" => "MiB/row",
            "KiB" => "KiB/row",
            _ => "B/row",
        }
    }
    fn scale_for_machines(&self, _: &mut [f64]) -> &'static str {
        "B"
    }
}

/// The persister's write of one interval in a pool of 200,000 (past one 16 MiB log segment of
/// records): 20,000 rows changed, as many as a busy gateway's pool used in 5 s. Batches of 256
/// rows cost ~4 MiB of storage writes each here (`Store::write_stats`).
fn bench_writes(c: &mut Criterion<StorageWrites>) {
    if std::fs::read_to_string("/proc/self/io").is_err() {
        eprintln!("store_writes: no /proc/self/io here, nothing to measure");
        return;
    }
    let mut group = c.benchmark_group("store_writes");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let (pool, rows) = (200_000usize, 20_000usize);
    let (_dir, store, ids) = filled(pool);
    let mut stats = Stats {
        reputation: 80,
        success_rate: Some(0.9),
        response_time_avg_ms: Some(120.0),
        ..Stats::default()
    };
    let mut round = 0usize;
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function(BenchmarkId::new("write_stats", pool), |b| {
        b.iter(|| {
            round += 1;
            stats.total_uses = round as u64;
            let step = pool / rows;
            store
                .write_stats(
                    ids.iter()
                        .skip(round % step)
                        .step_by(step)
                        .map(|id| (*id, &stats)),
                )
                .unwrap()
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_group! {
    name = writes;
    config = Criterion::default().with_measurement(StorageWrites);
    targets = bench_writes
}
criterion_main!(benches, writes);
