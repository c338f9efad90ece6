//! Routing hints in the username, one grammar for HTTP and SOCKS: filters (country, type,
//! minrep), per-request strategy, sticky sessions that hold and move, and clear errors.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::collections::HashSet;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_errors() {
    let origin = Origin::start().await;
    let us_http = FakeUpstream::start(Kind::Http, None).await;
    let us_socks = FakeUpstream::start(Kind::Socks5, None).await;
    let de_socks = FakeUpstream::start(Kind::Socks5, None).await;
    let gw = Gateway::builder()
        .upstream(format!("{}?country=us", us_http.url("http")))
        .upstream(format!("{}?country=us", us_socks.url("socks5")))
        .upstream(format!("{}?country=DE", de_socks.url("socks5")))
        .start()
        .await;
    let proxy = gw.http_proxy();
    let url = origin.url();
    for _ in 0..5 {
        let r = curl(&["-x", &proxy, "-U", "alice-country-de:x", &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-peer"), de_socks.egress.to_string());
        let r = curl(&[
            "-p",
            "-x",
            &proxy,
            "-U",
            "alice-country-us-type-http:x",
            &url,
        ])
        .await;
        assert_eq!(r.header("x-peer"), us_http.egress.to_string(), "{r:?}");
        // The same grammar over SOCKS5.
        let socks = format!("socks5h://alice-country-us-type-socks5:x@{}", gw.addr);
        let r = curl(&["-x", &socks, &url]).await;
        assert_eq!(r.header("x-peer"), us_socks.egress.to_string(), "{r:?}");
        // And a per-request strategy.
        let r = curl(&["-x", &proxy, "-U", "bob-strategy-random-country-us:x", &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // No upstream satisfies the filter: 503 naming it, never a silent fallback.
    let r = curl(&["-x", &proxy, "-U", "alice-country-fr:x", &url]).await;
    assert_eq!(r.status, 503, "{r:?}");
    let ps = r.header("proxy-status");
    assert!(
        ps.contains("destination_unavailable") && ps.contains("country=FR"),
        "{ps}"
    );
    let r = curl(&["-x", &proxy, "-U", "alice-minrep-99:x", &url]).await;
    assert_eq!(r.status, 503);
    assert!(r.header("proxy-status").contains("minrep=99"), "{r:?}");

    // Unknown hints and bad values: 503 naming the hint.
    let r = curl(&["-x", &proxy, "-U", "alice-colour-red:x", &url]).await;
    assert_eq!(r.status, 503);
    assert!(r.header("proxy-status").contains("route_invalid"), "{r:?}");
    assert!(r.header("proxy-status").contains("colour"), "{r:?}");
    let r = curl(&["-p", "-x", &proxy, "-U", "alice-strategy-psychic:x", &url]).await;
    assert_eq!(r.status, 503, "{r:?}");
    let socks = format!("socks5h://alice-colour-red:x@{}", gw.addr);
    let r = curl(&["-x", &socks, &url]).await;
    assert_ne!(r.status, 200, "{r:?}");
    assert!(r.stderr.contains("(1)") || r.exit_code != 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_hold_and_move() {
    let origin = Origin::start().await;
    let mut fakes = Vec::new();
    for _ in 0..4 {
        fakes.push(FakeUpstream::start(Kind::Http, None).await);
    }
    let mut builder = Gateway::builder()
        .config("[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"500ms\"");
    for f in &fakes {
        builder = builder.upstream(f.url("http"));
    }
    let users = tempfile::NamedTempFile::new().unwrap();
    proxygate_tests::gateway::users_file(users.path(), &[("alice", "pw")]).await;
    let gw = builder
        .config(&format!("[auth]\nusers_file = {:?}", users.path()))
        .start()
        .await;
    let proxy = gw.http_proxy();
    let url = origin.url();

    let peer = |r: &proxygate_tests::curl::CurlResponse| r.header("x-peer").to_owned();
    let first = curl(&["-x", &proxy, "-U", "alice-session-s1:pw", &url]).await;
    assert_eq!(first.status, 200, "{first:?}");
    let pinned = peer(&first);
    for _ in 0..10 {
        let r = curl(&["-p", "-x", &proxy, "-U", "alice-session-s1:pw", &url]).await;
        assert_eq!(peer(&r), pinned, "the session moved without cause");
        let socks = format!("socks5h://alice-session-s1:pw@{}", gw.addr);
        let r = curl(&["-x", &socks, &url]).await;
        assert_eq!(peer(&r), pinned, "SOCKS5 sees the same session");
    }
    // Sessions without a pin spread over the pool, and a new session never gets the exit its
    // client's previous session had (pool.new_session_exit = "different").
    let mut spread = HashSet::new();
    let mut previous = pinned.clone();
    for i in 0..12 {
        let r = curl(&["-x", &proxy, "-U", &format!("alice-session-x{i}:pw"), &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_ne!(peer(&r), previous, "new session {i} got the previous exit");
        previous = peer(&r);
        spread.insert(peer(&r));
    }
    assert!(spread.len() > 1, "{spread:?}");

    // The pinned upstream dies: the session moves, then holds again.
    let dead = fakes
        .iter()
        .position(|f| f.egress.to_string() == pinned)
        .unwrap();
    drop(fakes.remove(dead));
    let r = curl(&["-x", &proxy, "-U", "alice-session-s1:pw", &url]).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.logs());
    let moved = peer(&r);
    assert_ne!(moved, pinned);
    for _ in 0..5 {
        let r = curl(&["-p", "-x", &proxy, "-U", "alice-session-s1:pw", &url]).await;
        assert_eq!(peer(&r), moved);
    }
    // The account's password still guards hinted usernames.
    let r = curl(&["-x", &proxy, "-U", "alice-session-s1:wrong", &url]).await;
    assert_eq!(r.status, 407);
}
