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
