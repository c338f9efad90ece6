//! Per-site reputation: two of five upstreams are "blocked" by one site (they answer 403 to a
//! CONNECT to it) and fine for another. Once each has failed there twice, tunnels to that
//! site never go through them again, while tunnels to the other site still do; every client
//! request succeeds throughout (the refusals are retried elsewhere); the API and the CLI list
//! the site where each is blocked.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::collections::HashSet;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{Behavior, FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;

/// CONNECTs the fake saw to `host`.
fn connects_to(f: &FakeUpstream, host: &str) -> usize {
    f.seen()
        .requests
        .iter()
        .filter(|r| r.starts_with(&format!("CONNECT {host}:")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_blocked_by_one_site_are_avoided_there_only() {
    // Two sites on loopback: `localhost` and `127.0.0.1` (an address is its own site).
    let (blocking, open) = (Origin::start().await, Origin::start().await);
    let blocking_url = format!("http://localhost:{}/", blocking.addr.port());
    let open_url = format!("http://127.0.0.1:{}/", open.addr.port());
    let mut fakes = Vec::new();
    for i in 0..5 {
        let behavior = Behavior {
            refuse_host: (i < 2).then_some("localhost"),
            ..Behavior::default()
        };
        fakes.push(FakeUpstream::start_with(Kind::Http, None, behavior).await);
    }
    let mut b = Gateway::builder().arg("--strategy").arg("round_robin");
    for f in &fakes {
        b = b.upstream(f.url("http"));
    }
    let gw = b.start().await;
    let proxy = gw.http_proxy();
    let (blocked, fine) = fakes.split_at(2);
    let via = |r: &proxygate_tests::curl::CurlResponse| r.header("x-peer").to_owned();

    // Every upstream serves the open site a few times first (a new upstream whose very first
    // attempt fails scores low enough for a backoff, which would hide what is tested here).
    for _ in 0..15 {
        let r = curl(&["-p", "-x", &proxy, &open_url]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Learning: every request succeeds (a refusal is retried on another upstream) while the
    // two blocked upstreams are refused there twice each.
    for i in 0..30 {
        let r = curl(&["-p", "-x", &proxy, &blocking_url]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}\n{}", gw.logs());
        if blocked.iter().all(|f| connects_to(f, "localhost") >= 2) {
            break;
        }
    }
    for f in blocked {
        assert!(connects_to(f, "localhost") >= 2, "{:?}", f.seen());
    }

    // Now that site never reaches them...
    let before: Vec<usize> = blocked
        .iter()
        .map(|f| connects_to(f, "localhost"))
        .collect();
    let mut exits = HashSet::new();
    for i in 0..30 {
        let r = curl(&["-p", "-x", &proxy, &blocking_url]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        exits.insert(via(&r));
    }
    let after: Vec<usize> = blocked
        .iter()
        .map(|f| connects_to(f, "localhost"))
        .collect();
    assert_eq!(
        before, after,
        "a blocked upstream was tried again for its site"
    );
    let fine_exits: HashSet<String> = fine.iter().map(|f| f.egress.to_string()).collect();
    assert_eq!(exits, fine_exits, "the others share the site's traffic");

    // ...while the other site still goes through them.
    let mut exits = HashSet::new();
    for _ in 0..15 {
        let r = curl(&["-p", "-x", &proxy, &open_url]).await;
        assert_eq!(r.status, 200, "{r:?}");
        exits.insert(via(&r));
    }
    for f in blocked {
        assert!(
            exits.contains(&f.egress.to_string()),
            "an upstream blocked elsewhere was avoided for an open site: {exits:?}"
        );
    }

    // The pool views say where each is blocked.
    let list = gw.api("/api/v1/upstreams").await;
    let rows = list["upstreams"].as_array().unwrap().clone();
    let id_of = |f: &FakeUpstream| {
        rows.iter()
            .find(|r| r["address"] == f.addr.to_string())
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for (f, want) in fakes.iter().zip([true, true, false, false, false]) {
        let e = gw.api(&format!("/api/v1/upstreams/{}", id_of(f))).await;
        let sites: Vec<&str> = e["blocked_sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["site"].as_str().unwrap())
            .collect();
        if want {
            assert_eq!(sites, ["localhost"], "{e}");
        } else {
            assert!(sites.is_empty(), "{e}");
        }
    }
    let out = tokio::process::Command::new(proxygate_tests::gateway::binary())
        .args([
            "reputation",
            &id_of(&blocked[0]),
            "--admin",
            &gw.admin_url(),
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("blocked at"), "{text}");
    assert!(text.contains("localhost"), "{text}");
}
