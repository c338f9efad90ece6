//! A farm of 30 upstreams, a third of them dead: 10 refusing, 5 black-holed, 5 failing every
//! other connection, 10 good with latencies from 0 to 90 ms. After a warm-up, 2,000 requests
//! per strategy; the client must see near-perfect success with the default strategy (at least
//! 99.5 %), and the attempts that landed on dead upstreams are counted from the gateway's log.
//! Run with `--nocapture` to see the figures of every strategy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proxygate_tests::fakes::{Behavior, Blackhole, FakeUpstream, Kind, refusing_addr};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;

const REQUESTS: usize = 2000;
const CONCURRENCY: usize = 16;

struct Farm {
    origin: Origin,
    _good: Vec<FakeUpstream>,
    _flaky: Vec<FakeUpstream>,
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
        _good: good,
        _flaky: flaky,
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
}

async fn run(farm: &Farm, strategy: &str) -> Figures {
    let mut b = Gateway::builder()
        .config(
            "[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"300ms\"\n\
             retry_deadline = \"5s\"\nmax_attempts = 3",
        )
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
        async move {
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENCY {
                let (client, url, ok, next) = (
                    client.clone(),
                    url.clone(),
                    Arc::clone(&ok),
                    Arc::clone(&next),
                );
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::SeqCst) < n {
                        if let Ok(r) = client.get(&url).send().await
                            && r.status() == 200
                        {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            ok.load(Ordering::SeqCst)
        }
    };
    // Warm-up: the gateway learns which upstreams are dead.
    send(300).await;
    let failed_before = gw.logs().matches("attempt failed").count();
    let start = Instant::now();
    let ok = send(REQUESTS).await;
    let elapsed = start.elapsed();
    let failed_attempts = gw.logs().matches("attempt failed").count() - failed_before;
    Figures {
        ok,
        failed_attempts,
        elapsed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_dead_still_near_perfect() {
    let farm = farm().await;
    let mut report = String::new();
    for strategy in [
        "weighted_random",
        "round_robin",
        "least_recently_used",
        "best_reputation",
        "fastest_response",
        "random",
    ] {
        let f = run(&farm, strategy).await;
        let rate = f.ok as f64 / REQUESTS as f64 * 100.0;
        let line = format!(
            "{strategy:<20} success {rate:6.2} %  attempts on dead upstreams {:4}  {:5.1} s\n",
            f.failed_attempts,
            f.elapsed.as_secs_f64()
        );
        eprint!("{line}");
        report.push_str(&line);
        // The 99.5 % target is the default strategy's; the greedy strategies are held to it
        // too (they measure 100 % with no attempt on a dead upstream, even with both cores
        // busy; fastest_response once ranked by rt / success and fell to 88-94 % here when
        // the 0 ms upstream had one slow warm-up sample). The others measure 99 %+ (cyclic
        // strategies retry by reputation, LRU does not favour upstreams just back from
        // backoff) and are held to 95 %, enough to catch a broken strategy without flaking on
        // a loaded machine: the "every other connection" upstreams stay healthy under the
        // documented formula, and the random-ish strategies keep drawing them.
        let floor = match strategy {
            "weighted_random" | "best_reputation" | "fastest_response" => 99.5,
            _ => 95.0,
        };
        assert!(rate >= floor, "{strategy} under {floor} %:\n{report}");
    }
}
