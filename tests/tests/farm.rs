//! A farm of 30 upstreams, a third of them dead: 10 refusing, 5 black-holed, 5 failing every
//! other connection, 10 good with latencies from 0 to 90 ms. After a warm-up, 2,000 requests
//! per strategy; the client must see near-perfect success with the default strategy (at least
//! 99.9 %), at most 2 % of its attempts may fail (failed attempts are counted from the
//! gateway's log), and every upstream that serves at all (the good and the flaky) must still
//! get requests. Run with `--nocapture` to see the figures of every strategy, with the share of
//! requests each upstream served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxygate_tests::fakes::{Behavior, Blackhole, FakeUpstream, Kind, refusing_addr};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;

const REQUESTS: usize = 2000;
const CONCURRENCY: usize = 16;

struct Farm {
    origin: Origin,
    good: Vec<FakeUpstream>,
    flaky: Vec<FakeUpstream>,
    _holes: Vec<Blackhole>,
    urls: Vec<String>,
}

async fn farm() -> Farm {
    let origin = Origin::start().await;
    let mut urls = Vec::new();
    for _ in 0..10 {
        urls.push(format!("http://{}", refusing_addr().await));
    }
    let mut holes = Vec::new();
    for _ in 0..5 {
        let h = Blackhole::start().await;
        urls.push(format!("socks5://{}", h.addr));
        holes.push(h);
    }
    let mut flaky = Vec::new();
    for i in 0..5 {
        let behavior = Behavior {
            fail_every_other: true,
            ..Behavior::default()
        };
        flaky.push(mixed(i, behavior, &mut urls).await);
    }
    let mut good = Vec::new();
    for i in 0..10 {
        let behavior = Behavior {
            delay: Duration::from_millis(i * 10),
            ..Behavior::default()
        };
        good.push(mixed(i, behavior, &mut urls).await);
    }
    Farm {
        origin,
        good,
        flaky,
        _holes: holes,
        urls,
    }
}

/// The `i`th fake of a group: HTTP and SOCKS5 in turn. Its URL goes into `urls`.
async fn mixed(i: u64, behavior: Behavior, urls: &mut Vec<String>) -> FakeUpstream {
    let (kind, scheme) = if i.is_multiple_of(2) {
        (Kind::Http, "http")
    } else {
        (Kind::Socks5, "socks5")
    };
    let f = FakeUpstream::start_with(kind, None, behavior).await;
    urls.push(f.url(scheme));
    f
}

struct Figures {
    ok: usize,
    failed_attempts: usize,
    elapsed: Duration,
    /// Requests served, by the upstream's egress address.
    served: HashMap<String, usize>,
}

impl Figures {
    /// Failed attempts as a share of all attempts (each request's last attempt served it).
    fn failed_share(&self) -> f64 {
        self.failed_attempts as f64 / (self.failed_attempts + self.ok).max(1) as f64
    }

    /// Each group's upstreams' shares of the requests, in percent.
    fn shares(&self, group: &[FakeUpstream]) -> Vec<f64> {
        group
            .iter()
            .map(|f| {
                let n = self.served.get(&f.egress.to_string()).copied();
                n.unwrap_or(0) as f64 / REQUESTS as f64 * 100.0
            })
            .collect()
    }
}

fn shares_text(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|s| format!("{s:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every request on a new upstream connection (`keep_idle = "0s"`), as every CONNECT tunnel
/// is: kept connections would hide the upstreams that fail every other connection.
async fn run(farm: &Farm, strategy: &str, extra: &str) -> Figures {
    let mut b = Gateway::builder()
        .config(&format!(
            "[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"300ms\"\n\
             retry_deadline = \"5s\"\nmax_attempts = 3\nkeep_idle = \"0s\"\n{extra}"
        ))
        .arg("--strategy")
        .arg(strategy);
    for u in &farm.urls {
        b = b.upstream(u.clone());
    }
    let gw = b.start().await;
    let client = gw.fresh_client();
    let url = farm.origin.url();
    let send = |n: usize| {
        let client = client.clone();
        let url = url.clone();
        let ok = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        async move {
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENCY {
                let (client, url, ok, next, served) = (
                    client.clone(),
                    url.clone(),
                    Arc::clone(&ok),
                    Arc::clone(&next),
                    Arc::clone(&served),
                );
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::SeqCst) < n {
                        if let Ok(r) = client.get(&url).send().await
                            && r.status() == 200
                        {
                            ok.fetch_add(1, Ordering::SeqCst);
                            let peer = r.headers()["x-peer"].to_str().unwrap().to_owned();
                            *served.lock().unwrap().entry(peer).or_default() += 1;
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let served = served.lock().unwrap().clone();
            (ok.load(Ordering::SeqCst), served)
        }
    };
    // Warm-up: the gateway learns which upstreams are dead.
    send(300).await;
    let failed_before = gw.logs().matches("attempt failed").count();
    let start = Instant::now();
    let (ok, served) = send(REQUESTS).await;
    let elapsed = start.elapsed();
    let failed_attempts = gw.logs().matches("attempt failed").count() - failed_before;
    Figures {
        ok,
        failed_attempts,
        elapsed,
        served,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_dead_still_near_perfect() {
    let farm = farm().await;
    let mut report = String::from(
        "strategy              success  failed attempts        s  shares of the good (%) | of the flaky (%)\n",
    );
    let runs = [
        ("weighted_random", ""),
        // weighted_random as it was: by reputation alone.
        ("weighted_random", "[pool]\nweight_success_exponent = 0"),
        ("round_robin", ""),
        ("least_recently_used", ""),
        ("best_reputation", ""),
        ("fastest_response", ""),
        ("random", ""),
    ];
    for (strategy, extra) in runs {
        let f = run(&farm, strategy, extra).await;
        let rate = f.ok as f64 / REQUESTS as f64 * 100.0;
        let name = if extra.is_empty() {
            strategy.to_owned()
        } else {
            format!("{strategy} (^0)")
        };
        let line = format!(
            "{name:<20} {rate:6.2} %  {:4} ({:4.1} %)  {:5.1}  {} | {}\n",
            f.failed_attempts,
            f.failed_share() * 100.0,
            f.elapsed.as_secs_f64(),
            shares_text(&f.shares(&farm.good)),
            shares_text(&f.shares(&farm.flaky)),
        );
        eprint!("{line}");
        report.push_str(&line);
        if strategy == "weighted_random" && extra.is_empty() {
            // The default strategy: near-perfect, without paying for the flaky upstreams, and
            // without starving anyone that serves.
            assert!(rate >= 99.9, "success under 99.9 %:\n{report}");
            assert!(
                f.failed_share() <= 0.02,
                "over 2 % of attempts failed:\n{report}"
            );
            let starved: Vec<_> = f
                .shares(&farm.good)
                .into_iter()
                .chain(f.shares(&farm.flaky))
                .filter(|s| *s == 0.0)
                .collect();
            assert!(
                starved.is_empty(),
                "an upstream that serves got nothing:\n{report}"
            );
            continue;
        }
        // The greedy strategies measure 100 % with no attempt on a dead upstream, even with
        // both cores busy (fastest_response once ranked by rt / success and fell to 88-94 %
        // here when the 0 ms upstream had one slow warm-up sample). The others measure 99 %+
        // (cyclic strategies retry by reputation, LRU does not favour upstreams just back from
        // backoff) and are held to 95 %, enough to catch a broken strategy without flaking on
        // a loaded machine: the "every other connection" upstreams stay healthy under the
        // documented formula, and the strategies that do not weigh them keep drawing them.
        let floor = match strategy {
            "best_reputation" | "fastest_response" => 99.5,
            _ => 95.0,
        };
        assert!(rate >= floor, "{strategy} under {floor} %:\n{report}");
    }
}

/// One CONNECT tunnel and a GET through it on a new client connection: the time to the first
/// byte of the response, or `None` if it failed.
async fn tunnel_ttfb(
    gateway: std::net::SocketAddr,
    origin: std::net::SocketAddr,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let mut s = tokio::net::TcpStream::connect(gateway).await.ok()?;
    s.write_all(format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return None;
    }
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let n = s.read(&mut b).await.ok()?;
    let ttfb = t0.elapsed();
    (n == 1 && b[0] == b'H').then_some(ttfb)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Hedged connects on a farm with a slow upstream (its CONNECT answered after 2 s) and two
/// black-holed ones among twenty-four good ones, round robin (so the slow one keeps its share
/// of first attempts, a twenty-fifth of the live ones: weighted_random would learn to avoid
/// it, and the tail would be too thin to see). That share stays under the 5 % above the p95
/// and under the 10 % hedge budget with room: with a twelfth (twelve good ones), a loaded box's
/// own slow attempts ran the budget out, the unhedged slow attempts then fed the p95 its 2 s,
/// and the delay climbed to them (CI, once): 400 CONNECT tunnels, 8 at a time, hedging off and on. Prints p50/p99/max time to first byte and the attempts each cost; asserts that the tail
/// is cut (the slow upstream's 2 s no longer reach the p99), that hedges stay within their
/// budget, and that every tunnel works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_connects_cut_the_tail() {
    const TUNNELS: usize = 400;
    let origin = Origin::start().await;
    let mut keep = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..24 {
        let f = FakeUpstream::start(Kind::Http, None).await;
        urls.push(f.url("http"));
        keep.push(f);
    }
    let slow = FakeUpstream::start_with(
        Kind::Http,
        None,
        Behavior {
            delay: Duration::from_secs(2),
            ..Behavior::default()
        },
    )
    .await;
    urls.push(slow.url("http"));
    let holes = [Blackhole::start().await, Blackhole::start().await];
    for h in &holes {
        urls.push(format!("http://{}", h.addr));
    }
    let mut report = String::new();
    let mut p99s = Vec::new();
    for ratio in ["0", "0.1"] {
        let mut b = Gateway::builder()
            .config(&format!(
                "[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"3s\"\n\
             retry_deadline = \"10s\"\nmax_attempts = 3\nhedge_ratio = {ratio}\n\
             hedge_min_delay = \"100ms\"\n[pool]\nbackoff_base = \"1h\"\nbackoff_max = \"2h\""
            ))
            .arg("--strategy")
            .arg("round_robin");
        for u in &urls {
            b = b.upstream(u.clone());
        }
        let gw = b.start().await;
        // Warm-up: every upstream tried once; the slow one's first attempt (new upstreams are
        // on probation, one attempt at a time) succeeds after 2 s, the black holes go into
        // backoff, for good (a backoff is uniform below its ceiling: with the default 30 s
        // one a black hole came back within the run now and then, on probation, and the
        // hedges it then needed on top of the slow upstream's ran the budget out: the tail
        // stayed, once in a while).
        for _ in 0..60 {
            tunnel_ttfb(gw.addr, origin.addr).await;
        }
        proxygate_tests::eventually(Duration::from_secs(10), || {
            (slow.connections() > 0).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (_, before) = gw.admin_get("/metrics").await;
        let next = Arc::new(AtomicUsize::new(0));
        let times = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (next, times, addr, origin) =
                (Arc::clone(&next), Arc::clone(&times), gw.addr, origin.addr);
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < TUNNELS {
                    let t = tunnel_ttfb(addr, origin).await;
                    times.lock().unwrap().push(t);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (_, after) = gw.admin_get("/metrics").await;
        let delta = |s: &str| metric(&after, s) - metric(&before, s);
        let attempts = delta("proxygate_upstream_attempts_total ");
        let won = delta("proxygate_upstream_hedges_total{result=\"won\"} ");
        let lost = delta("proxygate_upstream_hedges_total{result=\"lost\"} ");
        let times = times.lock().unwrap().clone();
        let failed = times.iter().filter(|t| t.is_none()).count();
        let mut ok: Vec<Duration> = times.into_iter().flatten().collect();
        ok.sort();
        let pct = |q: f64| ok[((ok.len() as f64 * q) as usize).min(ok.len() - 1)];
        let (p50, p99, max) = (pct(0.5), pct(0.99), ok[ok.len() - 1]);
        let line = format!(
            "hedge_ratio {ratio:<4} p50 {:6.1} ms  p99 {:7.1} ms  max {:7.1} ms  attempts {attempts} \
             ({:.2} per tunnel)  hedges won {won} lost {lost}  failed {failed}\n",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            attempts / TUNNELS as f64,
        );
        eprint!("{line}");
        report.push_str(&line);
        assert_eq!(failed, 0, "{report}\n{}", gw.logs());
        if ratio == "0" {
            assert_eq!(won + lost, 0.0, "hedged with hedging off:\n{report}");
        } else {
            assert!(won > 0.0, "no hedge won:\n{report}");
            // The budget: a tenth of the attempts, plus what was banked at the start.
            assert!(
                won + lost <= attempts * 0.1 + 10.0,
                "hedges over budget:\n{report}"
            );
        }
        p99s.push(p99);
    }
    // Without hedging the slow upstream's 2 s sit in the tail; with it they are cut short.
    assert!(p99s[0] >= Duration::from_millis(1500), "{report}");
    assert!(p99s[1] < p99s[0] / 2, "the tail was not cut:\n{report}");
}
