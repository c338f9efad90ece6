//! Failover: with one refusing, one black-holed and one good upstream, every request succeeds
//! within the retry deadline, whichever client protocol it uses.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::{Duration, Instant};

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{Blackhole, FakeUpstream, Kind, refusing_addr};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;

const RETRY_DEADLINE: Duration = Duration::from_secs(3);

async fn farm(good_kind: Kind, good_scheme: &str) -> (Origin, FakeUpstream, Blackhole, Gateway) {
    let origin = Origin::start().await;
    let good = FakeUpstream::start(good_kind, None).await;
    let hole = Blackhole::start().await;
    let refusing = refusing_addr().await;
    let gw = Gateway::builder()
        .config(
            "[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"500ms\"\n\
             retry_deadline = \"3s\"\nmax_attempts = 3\n\
             [pool]\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"",
        )
        // Round robin: the dead upstreams keep their turn once their backoff ends, which is
        // what is checked below (weighted_random draws an upstream that never worked about
        // once in a hundred picks, by design).
        .arg("--strategy")
        .arg("round_robin")
        .upstream(format!("http://{refusing}"))
        .upstream(format!("{good_scheme}://{}", hole.addr))
        .upstream(good.url(good_scheme))
        .start()
        .await;
    (origin, good, hole, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_requests_all_succeed_through_dead_upstreams() {
    let (origin, good, hole, gw) = farm(Kind::Http, "http").await;
    let client = gw.fresh_client();
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let start = Instant::now();
        let r = client
            .get(format!("{}/r/{i}", origin.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", gw.logs()));
        assert_eq!(r.status(), 200, "request {i}\n{}", gw.logs());
        assert_eq!(r.headers()["x-peer"], good.egress.to_string());
        slowest = slowest.max(start.elapsed());
    }
    assert!(
        slowest < RETRY_DEADLINE,
        "slowest request took {slowest:?}, over the retry deadline"
    );
    // The dead upstreams really were tried (and are retried once their backoff ends).
    assert!(
        hole.accepted() >= 2,
        "black hole tried {} times",
        hole.accepted()
    );
    assert!(
        gw.logs().contains("upstream_connect_refused"),
        "{}",
        gw.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_socks_fail_over_too() {
    let (origin, good, hole, gw) = farm(Kind::Socks5, "socks5").await;
    for i in 0..30 {
        let url = format!("{}/c/{i}", origin.url());
        let r = match i % 3 {
            0 => curl(&["-p", "-x", &gw.http_proxy(), &url]).await,
            1 => curl(&["--socks5-hostname", &gw.addr.to_string(), &url]).await,
            _ => curl(&["-x", &gw.http_proxy(), &url]).await,
        };
        assert_eq!(r.status, 200, "request {i}: {r:?}\n{}", gw.logs());
        assert_eq!(r.header("x-peer"), good.egress.to_string());
    }
    assert!(hole.accepted() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_dead_is_a_typed_error_within_the_deadline() {
    let hole = Blackhole::start().await;
    let refusing = refusing_addr().await;
    let gw = Gateway::builder()
        .config("[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"500ms\"\nretry_deadline = \"3s\"")
        .upstream(format!("http://{refusing}"))
        .upstream(format!("socks5://{}", hole.addr))
        .start()
        .await;
    let start = Instant::now();
    let r = curl(&["-p", "-x", &gw.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert!(start.elapsed() < RETRY_DEADLINE + Duration::from_secs(1));
    // The last failure decides: a timeout is 504, a refusal 502.
    assert!(matches!(r.status, 502 | 504), "{r:?}");
    let ps = r.header("proxy-status");
    assert!(ps.starts_with("proxygate; error="), "{ps}");
    assert!(ps.contains("2 upstreams failed"), "{ps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_still_tries_the_least_bad_and_says_so() {
    let refusing = refusing_addr().await;
    let gw = Gateway::builder()
        .config(
            "[pool]\nmax_consecutive_failures = 1\nbackoff_base = \"60s\"\nbackoff_max = \"60s\"",
        )
        .upstream(format!("http://{refusing}"))
        .start()
        .await;
    let first = curl(&["-p", "-x", &gw.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert_eq!(first.status, 502, "{first:?}");
    assert!(!gw.logs().contains("panic mode"), "{}", gw.logs());
    // The only upstream is now in backoff: it is still tried (502 from the attempt, not a
    // 503 "no upstream"), and the log says why.
    let second = curl(&["-p", "-x", &gw.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert_eq!(second.status, 502, "{second:?}");
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("panic mode"))
        .unwrap_or_else(|| panic!("no panic-mode line:\n{logs}"));
    assert!(line.contains("panic_selections=1"), "{line}");
    assert!(line.contains(&refusing.to_string()), "{line}");
}
