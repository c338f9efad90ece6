//! The control plane's Prometheus side: the registry every crate registers on (never the
//! global one), the pool's gauges computed at scrape time ([`PoolCollector`]), the store's
//! flush latency and the build info.
//!
//! Pool metrics cost the data path nothing: they are read from the snapshot when Prometheus
//! scrapes (one walk over the pool), not counted per request. None has a per-upstream label:
//! the number of series is the same for 10 upstreams and for a million.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Histogram, HistogramOpts, IntGauge, Opts, Registry};
use proxygate_pool::{PoolReader, State, Strategy};

/// Upper bounds of the reputation histogram's buckets.
const REPUTATION_BUCKETS: [u8; 10] = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];

/// The control plane's own series.
#[derive(Debug, Clone)]
pub struct AdminMetrics {
    /// One write-behind batch of stats, or one operator change, made durable.
    pub store_flush: Histogram,
}

impl AdminMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<AdminMetrics> {
        let store_flush = Histogram::with_opts(
            HistogramOpts::new(
                "proxygate_store_flush_seconds",
                "Time to write and flush one batch of live stats (or one operator change) to \
                 the data dir.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )?;
        registry.register(Box::new(store_flush.clone()))?;
        let info = IntGauge::with_opts(
            Opts::new(
                "proxygate_build_info",
                "Always 1; the labels say which proxygate this is.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        info.set(1);
        registry.register(Box::new(info))?;
        // The process's CPU seconds, open and max fds, resident and virtual memory, threads
        // and start time (`process_*`, Linux): what leaks show up in.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(ProcessCollector::default()))?;
        Ok(AdminMetrics { store_flush })
    }
}

/// The `process_*` metrics of the prometheus crate's collector, with
/// `process_cpu_seconds_total` to the clock tick (10 ms) rather than to the whole second: the
/// crate keeps it in an integer counter (tikv/rust-prometheus#451), so a gateway at 5 % of a
/// core read 0 for twenty seconds and then 1, and the dashboard's CPU panel (a `rate()` of
/// it) was a comb of spikes.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct ProcessCollector {
    inner: prometheus::process_collector::ProcessCollector,
    ticks_per_second: f64,
}

#[cfg(target_os = "linux")]
impl Default for ProcessCollector {
    fn default() -> Self {
        Self {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            ticks_per_second: procfs::ticks_per_second() as f64,
        }
    }
}

#[cfg(target_os = "linux")]
impl ProcessCollector {
    /// User and system CPU time of the whole process so far, in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
        Some((stat.utime + stat.stime) as f64 / self.ticks_per_second)
    }
}

#[cfg(target_os = "linux")]
impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.inner.collect();
        if let Some(cpu) = self.cpu_seconds() {
            for m in families
                .iter_mut()
                .filter(|f| f.name() == "process_cpu_seconds_total")
                .flat_map(|f| f.mut_metric().iter_mut())
            {
                let mut c = proto::Counter::default();
                c.set_value(cpu);
                m.set_counter(c);
            }
        }
        families
    }
}

/// Scrape-time metrics of the async runtimes (the control plane's and every data-plane
/// worker's): `proxygate_runtime_alive_tasks` (every open connection and tunnel is a task or
/// two, plus a fixed set of background ones; a count that only grows is a leak) and
/// `proxygate_runtime_workers` (threads running tasks).
#[derive(Debug)]
pub struct RuntimeCollector {
    control: tokio::runtime::Handle,
    data: Arc<std::sync::Mutex<Vec<tokio::runtime::Handle>>>,
    descs: Vec<Desc>,
}

const TASKS: &str = "proxygate_runtime_alive_tasks";
const TASKS_HELP: &str = "Tasks alive in the async runtime (connections, tunnels, background \
                          work).";
const WORKERS: &str = "proxygate_runtime_workers";
const WORKERS_HELP: &str = "Worker threads of the async runtime.";

impl RuntimeCollector {
    /// Collects from the runtime this is called on and from the data-plane runtimes listed in
    /// `data` (as they start).
    pub fn new(
        data: Arc<std::sync::Mutex<Vec<tokio::runtime::Handle>>>,
    ) -> prometheus::Result<Self> {
        let desc = |name: &str, help: &str| {
            Desc::new(name.into(), help.into(), Vec::new(), Default::default())
        };
        Ok(Self {
            control: tokio::runtime::Handle::current(),
            data,
            descs: vec![desc(TASKS, TASKS_HELP)?, desc(WORKERS, WORKERS_HELP)?],
        })
    }
}

impl Collector for RuntimeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (mut tasks, mut workers) = {
            let m = self.control.metrics();
            (m.num_alive_tasks(), m.num_workers())
        };
        for h in self
            .data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let m = h.metrics();
            tasks += m.num_alive_tasks();
            workers += m.num_workers();
        }
        vec![
            family(
                TASKS,
                TASKS_HELP,
                MetricType::GAUGE,
                vec![gauge(tasks as f64)],
            ),
            family(
                WORKERS,
                WORKERS_HELP,
                MetricType::GAUGE,
                vec![gauge(workers as f64)],
            ),
        ]
    }
}

/// How many upstreams are in each [`State`], indexed by `State as usize`.
pub type StateCounts = [usize; State::ALL.len()];

/// Counts the live pool by state; `disabled` comes from the catalog (disabled upstreams are
/// not in the pool).
pub fn count_states(pool: &PoolReader, disabled: usize) -> StateCounts {
    let now = Instant::now();
    let mut counts = [0; State::ALL.len()];
    for e in pool.snapshot().entries() {
        counts[e.state(now) as usize] += 1;
    }
    counts[State::Disabled as usize] = disabled;
    counts
}

/// Scrape-time metrics of the pool.
#[derive(Debug)]
pub struct PoolCollector {
    pool: PoolReader,
    disabled: Arc<AtomicUsize>,
    descs: Vec<Desc>,
}

const UPSTREAMS: &str = "proxygate_pool_upstreams";
const REPUTATION: &str = "proxygate_upstream_reputation";
const SESSIONS: &str = "proxygate_sticky_sessions";
const PANIC: &str = "proxygate_panic_selections_total";
const STRATEGY: &str = "proxygate_pool_strategy";

const UPSTREAMS_HELP: &str = "Upstreams by state (healthy, probation, backoff, unhealthy, \
                              disabled).";
const REPUTATION_HELP: &str = "Reputation (0-100) of the upstreams in the pool.";
const SESSIONS_HELP: &str = "Sticky sessions pinned to an upstream now.";
const PANIC_HELP: &str = "Selections that fell back to an upstream in backoff because no \
                          other was selectable (panic mode).";
const STRATEGY_HELP: &str = "1 for the selection strategy in force, 0 for the others.";

impl PoolCollector {
    /// `disabled` is the catalog's count of disabled upstreams.
    pub fn new(pool: PoolReader, disabled: Arc<AtomicUsize>) -> prometheus::Result<Self> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| (*l).to_owned()).collect(),
                Default::default(),
            )
        };
        Ok(Self {
            pool,
            disabled,
            descs: vec![
                desc(UPSTREAMS, UPSTREAMS_HELP, &["state"])?,
                desc(REPUTATION, REPUTATION_HELP, &[])?,
                desc(SESSIONS, SESSIONS_HELP, &[])?,
                desc(PANIC, PANIC_HELP, &[])?,
                desc(STRATEGY, STRATEGY_HELP, &["strategy"])?,
            ],
        })
    }
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labelled(label: &str, value: &str, mut m: proto::Metric) -> proto::Metric {
    let mut pair = proto::LabelPair::default();
    pair.set_name(label.into());
    pair.set_value(value.into());
    m.set_label(vec![pair]);
    m
}

fn gauge(v: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(v);
    proto::Metric::from_gauge(g)
}

fn counter(v: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(v);
    let mut m = proto::Metric::default();
    m.set_counter(c);
    m
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = Instant::now();
        let snap = self.pool.snapshot();
        let mut states = [0u64; State::ALL.len()];
        let mut buckets = [0u64; REPUTATION_BUCKETS.len()];
        let mut sum = 0u64;
        for e in snap.entries() {
            states[e.state(now) as usize] += 1;
            let rep = e.health.reputation();
            sum += u64::from(rep);
            if let Some(i) = REPUTATION_BUCKETS.iter().position(|b| rep <= *b) {
                buckets[i] += 1;
            }
        }
        states[State::Disabled as usize] = self.disabled.load(Ordering::Relaxed) as u64;
        let mut cumulative = 0;
        let histogram_buckets = REPUTATION_BUCKETS
            .iter()
            .zip(buckets)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(f64::from(*bound));
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = proto::Histogram::default();
        h.set_sample_count(snap.len() as u64);
        h.set_sample_sum(sum as f64);
        h.set_bucket(histogram_buckets);
        let mut reputation = proto::Metric::default();
        reputation.set_histogram(h);
        let current = self.pool.strategy();
        vec![
            family(
                UPSTREAMS,
                UPSTREAMS_HELP,
                MetricType::GAUGE,
                State::ALL
                    .iter()
                    .map(|s| labelled("state", s.as_str(), gauge(states[*s as usize] as f64)))
                    .collect(),
            ),
            family(
                REPUTATION,
                REPUTATION_HELP,
                MetricType::HISTOGRAM,
                vec![reputation],
            ),
            family(
                SESSIONS,
                SESSIONS_HELP,
                MetricType::GAUGE,
                vec![gauge(self.pool.sessions() as f64)],
            ),
            family(
                PANIC,
                PANIC_HELP,
                MetricType::COUNTER,
                vec![counter(self.pool.panic_selections() as f64)],
            ),
            family(
                STRATEGY,
                STRATEGY_HELP,
                MetricType::GAUGE,
                Strategy::ALL
                    .iter()
                    .map(|s| {
                        let on = if *s == current { 1.0 } else { 0.0 };
                        labelled("strategy", s.as_str(), gauge(on))
                    })
                    .collect(),
            ),
        ]
    }
}

/// The text exposition of everything registered.
pub fn render(registry: &Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxygate_core::Upstream;
    use proxygate_pool::{HealthConfig, Pool};

    /// `process_cpu_seconds_total` to the tick: with the crate's collector it stayed at the
    /// whole seconds below the process's CPU time.
    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_seconds_are_not_rounded_to_whole_seconds() {
        let registry = Registry::new();
        AdminMetrics::register(&registry).unwrap();
        let ticks = || {
            let s = procfs::process::Process::myself().unwrap().stat().unwrap();
            s.utime + s.stime
        };
        let tps = procfs::ticks_per_second();
        // Spin until the process's CPU time is not a whole number of seconds.
        let mut x = 0u64;
        while ticks() % tps == 0 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        let before = ticks() as f64 / tps as f64;
        let cpu = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "process_cpu_seconds_total")
            .unwrap()
            .get_metric()[0]
            .get_counter()
            .get_value();
        let after = ticks() as f64 / tps as f64;
        assert!(
            before <= cpu && cpu <= after,
            "{before} <= {cpu} <= {after}"
        );
    }

    fn series(text: &str) -> usize {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    }

    fn scrape(n: usize) -> String {
        let (reader, writer) = Pool::create(Strategy::Random, HealthConfig::default());
        writer.replace((0..n).map(|i| {
            Upstream::parse(&format!(
                "http://10.{}.{}.{}:80",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ))
            .unwrap()
        }));
        let registry = Registry::new();
        AdminMetrics::register(&registry).unwrap();
        let disabled = Arc::new(AtomicUsize::new(3));
        registry
            .register(Box::new(PoolCollector::new(reader, disabled).unwrap()))
            .unwrap();
        render(&registry)
    }

    #[test]
    fn pool_series_do_not_grow_with_the_pool() {
        let small = scrape(10);
        let large = scrape(10_000);
        assert_eq!(series(&small), series(&large));
        assert!(
            large.contains("proxygate_pool_upstreams{state=\"probation\"} 10000"),
            "{large}"
        );
        assert!(large.contains("proxygate_pool_upstreams{state=\"disabled\"} 3"));
        assert!(large.contains("proxygate_upstream_reputation_bucket{le=\"50\"} 10000"));
        assert!(large.contains("proxygate_upstream_reputation_bucket{le=\"40\"} 0"));
        assert!(large.contains("proxygate_upstream_reputation_count 10000"));
        assert!(large.contains("proxygate_pool_strategy{strategy=\"random\"} 1"));
        assert!(large.contains("proxygate_build_info{version="));
    }
}
