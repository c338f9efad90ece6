//! Upstream connection reuse for absolute-form requests: kept connections serve later
//! clients, only ever for their own (upstream, origin); requests with bodies and other
//! non-idempotent ones get a new connection; kept connections expire; credentials never ride a
//! kept connection; an upstream that closes after every request (tinyproxy) is learned and
//! gets a tunnel per origin; `dial.rotate` says whether a client connection keeps its upstream;
//! a kept connection idle past `server.keepalive_release_after` serves again on its socket.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::collections::HashSet;
use std::time::Duration;

use proxygate_tests::curl::{CurlResponse, curl};
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::third_party::ThirdParty;
use proxygate_tests::{eventually_async, sample};

/// One data-plane worker, so that every client connection meets the same kept connections and
/// the counts below are exact (kept connections are per worker).
const ONE_WORKER: &str = "[server]\nworkers = 1";

fn dial(extra: &str) -> String {
    format!("[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n{extra}")
}

/// A one-worker gateway (see [`ONE_WORKER`]) over `fake`, with `[dial]` keys `extra`.
async fn through(fake: &FakeUpstream, extra: &str) -> Gateway {
    Gateway::builder()
        .config(ONE_WORKER)
        .config(&dial(extra))
        .upstream(fake.url("http"))
        .start()
        .await
}

/// A GET on a new client connection (curl).
async fn get(gw: &Gateway, url: &str) -> CurlResponse {
    let r = curl(&["-x", &gw.http_proxy(), url]).await;
    assert_eq!(r.status, 200, "{url}: {r:?}\n{}", gw.logs());
    r
}

/// A GET of `path` on origin `o` through `gw` (curl, a new client connection), which must
/// reach `o` with its own URL.
async fn get_from(gw: &Gateway, o: &Origin, path: &str) -> CurlResponse {
    let url = format!("{}{path}", o.url());
    let r = get(gw, &url).await;
    assert_eq!(r.header("x-origin"), o.addr.to_string(), "wrong origin");
    assert_eq!(r.header("x-target"), url);
    r
}

/// What the gateway's metrics say of reuse: kept connections (live, parked), and requests sent
/// on kept connections.
async fn reuse_figures(gw: &Gateway) -> (f64, f64, f64) {
    let (_, text) = gw.admin_get("/metrics").await;
    let kept = |state| {
        sample(
            &text,
            &format!("proxygate_upstream_kept_connections{{state=\"{state}\"}}"),
        )
    };
    (
        kept("live"),
        kept("parked"),
        sample(&text, "proxygate_upstream_reused_total"),
    )
}

/// Waits (each worker adds its figures once a second) until the metrics say `want`.
async fn until_figures(gw: &Gateway, want: impl Fn((f64, f64, f64)) -> bool) {
    eventually_async(Duration::from_secs(10), || async {
        want(reuse_figures(gw).await).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_serve_later_clients_and_only_their_own_origin() {
    // The fake relays a kept-alive connection blindly to the origin of its first request
    // (as pproxy does): the worst case for reuse.
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let (a, b) = (Origin::start().await, Origin::start().await);
    let gw = through(&fake, "").await;
    for round in 0..4 {
        for o in [&a, &b] {
            let r = get_from(&gw, o, &format!("/r{round}")).await;
            assert_eq!(r.header("x-peer"), fake.egress.to_string());
        }
    }
    // Eight requests from eight client connections: one upstream connection per origin.
    assert_eq!(fake.connections(), 2);
    assert_eq!((a.connections(), b.connections()), (1, 1));
    // The metrics say so: six requests on kept connections, two kept (live, or parked once
    // idle past the release).
    until_figures(&gw, |(live, parked, reused)| {
        live + parked == 2.0 && reused == 6.0
    })
    .await;

    // With two workers, requests still never reach another origin.
    let gw2 = Gateway::builder()
        .config("[server]\nworkers = 2")
        .upstream(fake.url("http"))
        .start()
        .await;
    for i in 0..12 {
        let o = if i % 3 == 0 { &a } else { &b };
        get_from(&gw2, o, &format!("/w{i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_bodies_and_non_idempotent_ones_get_a_new_connection() {
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let origin = Origin::start().await;
    let gw = through(&fake, "").await;
    let url = format!("{}/x", origin.url());
    get(&gw, &url).await;
    assert_eq!(fake.connections(), 1);
    // POST (no body): never on a kept connection, which could turn out closed after the request
    // went out, and a POST must not be sent twice.
    let r = curl(&["-x", &gw.http_proxy(), "-X", "POST", &url]).await;
    assert_eq!((r.status, r.header("x-method")), (200, "POST"), "{r:?}");
    assert_eq!(fake.connections(), 2);
    // PUT with a body: a new one too.
    let r = curl(&["-x", &gw.http_proxy(), "-T", "-", &url]).await;
    assert_eq!((r.status, r.header("x-method")), (200, "PUT"), "{r:?}");
    assert_eq!(fake.connections(), 3);
    // And their connections are kept afterwards: GETs go on them.
    for _ in 0..3 {
        get(&gw, &url).await;
    }
    assert_eq!(fake.connections(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_idle_past_the_release_serves_again_on_the_same_socket() {
    // Idle past `server.keepalive_release_after`, a kept connection lets go of hyper's client
    // state (at the worker's next one-second tick) and waits as the bare connection; the next
    // request starts a new client on it: still one upstream connection, and each request still
    // reaches its own origin.
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let (a, b) = (Origin::start().await, Origin::start().await);
    let gw = Gateway::builder()
        .config("[server]\nworkers = 1\nkeepalive_release_after = \"100ms\"")
        .config(&dial(""))
        .upstream(fake.url("http"))
        .start()
        .await;
    for round in 0..3 {
        for o in [&a, &b] {
            get_from(&gw, o, &format!("/r{round}")).await;
        }
        // Past the release and the tick after it.
        tokio::time::sleep(Duration::from_millis(2200)).await;
    }
    assert_eq!(fake.connections(), 2, "{}", gw.logs());
    assert_eq!(fake.open(), 2);
    // Each connection parked after each round, and rounds 2 and 3 took it up again.
    let parked = gw.logs().matches("kept upstream connection parked").count();
    assert!(parked >= 6, "parked {parked} times:\n{}", gw.logs());
    // As the metrics say: both parked now, four requests went on kept connections.
    until_figures(&gw, |f| f == (0.0, 2.0, 4.0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_expire_and_keep_idle_zero_turns_reuse_off() {
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let origin = Origin::start().await;
    let gw = through(&fake, "keep_idle = \"1s\"").await;
    let url = format!("{}/x", origin.url());
    get(&gw, &url).await;
    get(&gw, &url).await;
    assert_eq!(fake.connections(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    get(&gw, &url).await;
    assert_eq!(fake.connections(), 2, "an expired connection was reused");
    // The sweeper closes what expired even when nothing asks for it again.
    proxygate_tests::eventually(Duration::from_secs(10), || (fake.open() == 0).then_some(())).await;

    let fake = FakeUpstream::start(Kind::Http, None).await;
    let off = through(&fake, "keep_idle = \"0s\"").await;
    for _ in 0..3 {
        get(&off, &url).await;
    }
    assert_eq!(fake.connections(), 3);
    // Past the worker's next tick: nothing kept, nothing reused.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(reuse_figures(&off).await, (0.0, 0.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_ride_a_kept_connection() {
    let fake = FakeUpstream::start(Kind::Http, Some(("u", "secret"))).await;
    let origin = Origin::start().await;
    let gw = through(&fake, "").await;
    let url = format!("{}/c", origin.url());
    for _ in 0..4 {
        let r = get(&gw, &url).await;
        // In a tunnel to the origin: origin form, and no credentials of anyone.
        assert_eq!(r.header("x-target"), "/c");
        assert!(
            !r.header("x-header-names").contains("proxy-authorization"),
            "{r:?}"
        );
        assert!(
            !r.header("x-header-names").contains("authorization"),
            "{r:?}"
        );
    }
    assert_eq!(fake.connections(), 1);
    assert_eq!(
        fake.seen().requests,
        vec![format!("CONNECT {}", origin.addr)]
    );

    // In absolute form (`never`), such connections are not kept at all.
    let fake = FakeUpstream::start(Kind::Http, Some(("u", "secret"))).await;
    let never = through(&fake, "tunnel_plain_http = \"never\"").await;
    for _ in 0..3 {
        let r = get(&never, &url).await;
        assert_eq!(r.header("x-target"), url);
        assert!(
            !r.header("x-header-names").contains("proxy-authorization"),
            "{r:?}"
        );
    }
    assert_eq!(fake.connections(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_after_every_request_is_learned_and_tunnelled() {
    let origin = Origin::start().await;
    let tp = ThirdParty::tinyproxy_open().await;
    let url = format!("{}/t", origin.url());

    // Absolute form only: tinyproxy closes after every request, so every request costs an
    // upstream and an origin connection.
    let never = Gateway::builder()
        .config(ONE_WORKER)
        .config(&dial("tunnel_plain_http = \"never\""))
        .upstream(format!("http://{}", tp.addr))
        .start()
        .await;
    let before = origin.connections();
    for _ in 0..6 {
        let r = get(&never, &url).await;
        assert_eq!(r.header("x-origin"), origin.addr.to_string());
    }
    assert_eq!(origin.connections() - before, 6);

    // By default the gateway learns it (two closings) and opens a tunnel to the origin
    // through it, which the origin keeps alive.
    let auto = Gateway::builder()
        .config(ONE_WORKER)
        .upstream(format!("http://{}", tp.addr))
        .start()
        .await;
    let other = Origin::start().await;
    let before = origin.connections();
    for i in 0..20 {
        let r = get(&auto, &url).await;
        assert_eq!(r.header("x-origin"), origin.addr.to_string());
        if i % 4 == 0 {
            // Another origin between: its own tunnel.
            let r = get(&auto, &format!("{}/o", other.url())).await;
            assert_eq!(r.header("x-origin"), other.addr.to_string());
            assert_eq!(r.header("x-target"), "/o");
        }
    }
    let used = origin.connections() - before;
    // Two absolute-form requests to learn from, then the tunnel.
    assert!(used <= 3, "20 requests took {used} origin connections");
    assert!(other.connections() <= 3, "{}", other.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_per_client_connection_or_per_request() {
    let origin = Origin::start().await;
    let mut fakes = Vec::new();
    for _ in 0..3 {
        fakes.push(FakeUpstream::start(Kind::Http, None).await);
    }
    let exits = async |rotate: &str| {
        let mut b = Gateway::builder().config(ONE_WORKER).config(&format!(
            "{}\n[pool]\nstrategy = \"round_robin\"",
            dial(rotate)
        ));
        for f in &fakes {
            b = b.upstream(f.url("http"));
        }
        let gw = b.start().await;
        // One client connection (curl reuses it), nine requests on it; every response's head.
        let mut args = vec![
            "-s".to_owned(),
            "-x".to_owned(),
            gw.http_proxy(),
            "-D".to_owned(),
            "-".to_owned(),
            "-o".to_owned(),
            "/dev/null".to_owned(),
        ];
        for i in 0..9 {
            args.push(format!("{}/rot{i}", origin.url()));
        }
        let out = tokio::process::Command::new("curl")
            .args(&args)
            .output()
            .await
            .unwrap();
        let heads = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let peers: Vec<&str> = heads
            .lines()
            .filter_map(|l| l.strip_prefix("x-peer:"))
            .map(str::trim)
            .collect();
        assert_eq!(peers.len(), 9, "{heads}");
        let seen: HashSet<String> = peers.iter().map(|p| (*p).to_owned()).collect();
        seen
    };
    assert_eq!(
        exits("").await.len(),
        1,
        "rotate = connection is the default"
    );
    assert_eq!(exits("rotate = \"connection\"").await.len(), 1);
    assert_eq!(exits("rotate = \"request\"").await.len(), 3);
}
