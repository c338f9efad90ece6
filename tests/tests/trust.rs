//! Trust, end to end, against a local judge, a local TLS judge and fake upstreams that
//! misbehave: a man in the middle (swaps the TLS judge's certificate) and an injector (appends
//! a script to HTTP bodies) are quarantined and counted, never serve, and stay out until an
//! operator enables them; an exit that forwards its client's hop-by-hop headers is demoted to
//! `untrusted`, which `-tier-...` hints and `dial.min_tier` route around; upstreams that share
//! an exit IP are one exit for round robin and for new sessions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{Behavior, FakeUpstream, Kind, Tamper};
use proxygate_tests::gateway::{Gateway, cli};
use proxygate_tests::lists::Judge;
use proxygate_tests::origin::Origin;
use proxygate_tests::tls::TestPki;
use proxygate_tests::{id_of, sample};
use serde_json::Value;

async fn fake(behavior: Behavior) -> FakeUpstream {
    FakeUpstream::start_with(Kind::Http, None, behavior).await
}

/// `[checker]` with the local judges; `[dial]` trusting the test CA (the TLS judge's).
fn config(judge: &Judge, tls_judge: Option<(&Origin, &std::path::Path)>) -> String {
    let (tls, ca) = tls_judge.map_or((String::new(), String::new()), |(o, ca)| {
        (
            format!("https://127.0.0.1:{}/", o.addr.port()),
            format!("tls_ca_file = {ca:?}\n"),
        )
    });
    format!(
        "sources = []\n[checker]\njudge_urls = [{:?}]\ntimeout = \"2s\"\ntls_judge_url = {tls:?}\n\
         integrity_url = {:?}\n[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n\
         retry_deadline = \"5s\"\n{ca}",
        judge.httpbin_url(),
        judge.static_url(),
    )
}

/// A TLS judge with a certificate of a test CA, and that CA in a file (`dial.tls_ca_file`).
async fn tls_judge() -> (Origin, tempfile::NamedTempFile) {
    let pki = TestPki::new();
    let judge = Origin::start_on("127.0.0.1:0".parse().unwrap(), Some(pki.acceptor())).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    (judge, ca)
}

/// `proxygate check --all` against the running gateway: its JSON.
async fn check_all(gw: &Gateway) -> Value {
    let data = gw.data_dir().to_str().unwrap().to_owned();
    let out = cli(&["check", "--all", "--data-dir", &data, "--json"]).await;
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}\n{}", gw.logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_upstreams_are_quarantined_counted_and_never_serve() {
    let judge = Judge::start().await;
    let (tls_judge, ca) = tls_judge().await;
    let honest = fake(Behavior::default()).await;
    let socks = FakeUpstream::start(Kind::Socks5, None).await;
    let mitm = fake(Behavior {
        tamper: Tamper::SwapCertificate,
        ..Behavior::default()
    })
    .await;
    let injector = fake(Behavior {
        tamper: Tamper::InjectBody,
        ..Behavior::default()
    })
    .await;
    let gw = Gateway::builder()
        .config(&config(&judge, Some((&tls_judge, ca.path()))))
        .arg("--strategy")
        .arg("round_robin")
        .upstream(honest.url("http"))
        .upstream(socks.url("socks5"))
        .upstream(mitm.url("http"))
        .upstream(injector.url("http"))
        .start()
        .await;

    let v = check_all(&gw).await;
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(2), Some(2)),
        "{v}\n{}",
        gw.logs()
    );
    let line = |url: &str| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id_of(url))
            .unwrap()
            .clone()
    };
    let m = line(&mitm.url("http"));
    assert!(
        m["tampered"]
            .as_str()
            .unwrap()
            .contains("man in the middle"),
        "{m}"
    );
    let i = line(&injector.url("http"));
    assert!(
        i["tampered"]
            .as_str()
            .is_some_and(|t| t.contains("altered")),
        "{i}\n{}",
        gw.logs()
    );
    for good in [honest.url("http"), socks.url("socks5")] {
        let l = line(&good);
        assert!(l["tampered"].is_null() && l["passed"] == true, "{l}");
    }

    // Quarantined: disabled with the reason, counted, out of the pool.
    for bad in [mitm.url("http"), injector.url("http")] {
        let r = gw.api(&format!("/api/v1/upstreams/{}", id_of(&bad))).await;
        assert!(
            r["disabled_reason"]
                .as_str()
                .unwrap()
                .starts_with("quarantined: "),
            "{r}"
        );
    }
    let (_, text) = gw.admin_get("/metrics").await;
    assert_eq!(sample(&text, "proxygate_upstream_quarantined_total"), 2.0);

    // No client request reaches them.
    let origin = Origin::start().await;
    let (mitm_before, inj_before) = (mitm.connections(), injector.connections());
    for _ in 0..12 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(!r.body.contains("ads.invalid"));
    }
    assert_eq!(
        (mitm.connections(), injector.connections()),
        (mitm_before, inj_before),
        "a quarantined upstream served"
    );

    // A later check that passes does not release them (they are not even checked: disabled);
    // an operator does.
    let v = check_all(&gw).await;
    assert_eq!(v["checked"].as_u64(), Some(2), "{v}");
    let id = id_of(&injector.url("http"));
    let resp = gw
        .admin_client()
        .post(format!("{}/api/v1/upstreams/{id}/enable", gw.admin_url()))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{resp:?}");
    let r = gw.api(&format!("/api/v1/upstreams/{id}")).await;
    assert!(r["disabled_reason"].is_null(), "{r}");
    // Checked again, it is caught again.
    let v = check_all(&gw).await;
    assert_eq!(v["failed"].as_u64(), Some(1), "{v}");
    let (_, text) = gw.admin_get("/metrics").await;
    assert_eq!(sample(&text, "proxygate_upstream_quarantined_total"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaking_exits_are_demoted_and_tier_hints_route_around_them() {
    let judge = Judge::start().await;
    let honest = fake(Behavior::default()).await;
    let leaky = fake(Behavior {
        keep_hop_headers: true,
        ..Behavior::default()
    })
    .await;
    let gw = Gateway::builder()
        .config(&config(&judge, None))
        .arg("--strategy")
        .arg("round_robin")
        .upstream(honest.url("http"))
        .upstream(leaky.url("http"))
        .start()
        .await;
    let v = check_all(&gw).await;
    assert_eq!(v["passed"].as_u64(), Some(2), "a leak is no failure: {v}");
    let leaky_row = gw
        .api(&format!("/api/v1/upstreams/{}", id_of(&leaky.url("http"))))
        .await;
    assert!(
        leaky_row["leak"].as_str().unwrap().contains("hop-by-hop"),
        "{leaky_row}"
    );
    assert_eq!(leaky_row["tier"], "untrusted", "demoted from operator");
    let honest_row = gw
        .api(&format!("/api/v1/upstreams/{}", id_of(&honest.url("http"))))
        .await;
    assert_eq!(honest_row["tier"], "operator");
    assert!(honest_row["leak"].is_null(), "{honest_row}");
    let (_, text) = gw.admin_get("/metrics").await;
    assert_eq!(sample(&text, "proxygate_upstream_leaks_total"), 1.0);

    // A client asking for operator-tier upstreams never goes through the demoted one; one
    // without a hint goes through both (dial.min_tier defaults to untrusted).
    let origin = Origin::start().await;
    let proxy = gw.http_proxy();
    let peer = |r: &proxygate_tests::curl::CurlResponse| r.header("x-peer").to_owned();
    for _ in 0..8 {
        let r = curl(&["-x", &proxy, "-U", "c-tier-operator:x", &origin.url()]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(peer(&r), honest.egress.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        seen.insert(peer(&curl(&["-x", &proxy, &origin.url()]).await));
    }
    assert!(seen.contains(&leaky.egress.to_string()), "{seen:?}");
    // Operator upstreams are at least verified; the demoted one is not.
    for _ in 0..4 {
        let r = curl(&["-x", &proxy, "-U", "c-tier-verified:x", &origin.url()]).await;
        assert_eq!(peer(&r), honest.egress.to_string());
    }

    // dial.min_tier is the default of clients that name no tier.
    drop(gw);
    let gw = Gateway::builder()
        .config(&config(&judge, None).replace("[dial]\n", "[dial]\nmin_tier = \"operator\"\n"))
        // As the first gateway: every eligible upstream in turn (the default, weighted random,
        // weighs the demoted one down and may pass it over eight times running).
        .arg("--strategy")
        .arg("round_robin")
        .upstream(honest.url("http"))
        .upstream(leaky.url("http"))
        .start()
        .await;
    check_all(&gw).await;
    for _ in 0..6 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(peer(&r), honest.egress.to_string(), "{r:?}");
    }
    // A client may still ask for less.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let r = curl(&[
            "-x",
            &gw.http_proxy(),
            "-U",
            "c-tier-untrusted:x",
            &origin.url(),
        ])
        .await;
        seen.insert(peer(&r));
    }
    assert!(seen.contains(&leaky.egress.to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_box_on_several_ports_is_one_exit() {
    let judge = Judge::start().await;
    // Three ports of one box (one egress address), and two single proxies.
    let shared = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 252));
    let mut boxed = Vec::new();
    for _ in 0..3 {
        boxed.push(
            fake(Behavior {
                egress: Some(shared),
                ..Behavior::default()
            })
            .await,
        );
    }
    let singles = [
        fake(Behavior::default()).await,
        fake(Behavior::default()).await,
    ];
    let mut b = Gateway::builder()
        .config(&config(&judge, None))
        .arg("--strategy")
        .arg("round_robin");
    for f in boxed.iter().chain(&singles) {
        b = b.upstream(f.url("http"));
    }
    let gw = b.start().await;
    let v = check_all(&gw).await;
    assert_eq!(v["passed"].as_u64(), Some(5), "{v}");
    let row = gw
        .api(&format!(
            "/api/v1/upstreams/{}",
            id_of(&boxed[0].url("http"))
        ))
        .await;
    assert_eq!(row["exit_ip"], "127.0.0.252", "{row}");
    assert_eq!(row["exit_group_size"], 3, "{row}");
    let data = gw.data_dir().to_str().unwrap().to_owned();
    let out = cli(&["pool", "list", "--data-dir", &data]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.matches("127.0.0.252 (3)").count(), 3, "{table}");

    // Round robin: three exits, a third each; the box's third spread over its ports.
    let origin = Origin::start().await;
    let proxy = gw.http_proxy();
    let mut by_exit: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let r = curl(&["-x", &proxy, &origin.url()]).await;
        assert_eq!(r.status, 200, "{r:?}");
        *by_exit.entry(r.header("x-peer").to_owned()).or_default() += 1;
    }
    // (Each data-plane worker keeps its own cursor: a third each, give or take a turn.)
    let third = |n: Option<&usize>| n.is_some_and(|n| (8..=12).contains(n));
    assert!(third(by_exit.get("127.0.0.252")), "{by_exit:?}");
    for f in &singles {
        assert!(third(by_exit.get(&f.egress.to_string())), "{by_exit:?}");
    }
    for f in &boxed {
        assert!(f.connections() >= 2, "a port of the box never served");
    }

    // New sessions of one client never get the exit the previous one had (best_reputation,
    // which would otherwise pick the same exit every time: they all score alike).
    let mut previous = String::new();
    for i in 0..12 {
        let user = format!("acct-session-n{i}-strategy-best_reputation:x");
        let r = curl(&["-x", &proxy, "-U", &user, &origin.url()]).await;
        assert_eq!(r.status, 200, "{r:?}");
        let exit = r.header("x-peer").to_owned();
        assert_ne!(
            exit, previous,
            "session n{i} got its client's previous exit"
        );
        // The session holds its exit.
        let again = curl(&["-x", &proxy, "-U", &user, &origin.url()]).await;
        assert_eq!(again.header("x-peer"), exit);
        previous = exit;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leak_audit_checks_busy_members_unasked() {
    let judge = Judge::start().await;
    let leaky = fake(Behavior {
        keep_hop_headers: true,
        ..Behavior::default()
    })
    .await;
    // Idle re-checks far away: only the audit can look at it.
    let cfg = config(&judge, None).replace(
        "[checker]\n",
        "[checker]\naudit_every = \"1s\"\nrecheck_every = \"1h\"\n",
    );
    let gw = Gateway::builder()
        .config(&cfg)
        .upstream(leaky.url("http"))
        .start()
        .await;
    let id = id_of(&leaky.url("http"));
    let origin = Origin::start().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        // Busy: traffic all along.
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200, "{r:?}");
        let row = gw.api(&format!("/api/v1/upstreams/{id}")).await;
        if row["tier"] == "untrusted" {
            assert!(
                row["leak"].as_str().unwrap().contains("hop-by-hop"),
                "{row}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit within 20 s: {row}\n{}",
            gw.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(gw.logs().contains("leak audit done"), "{}", gw.logs());
}

/// Real proxies are neither leaking nor tampering: tinyproxy (with credentials, so a
/// Proxy-Authorization is sent and must not reach the judge) and microsocks pass every step,
/// the TLS and body comparisons included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_proxies_pass_the_integrity_and_leak_checks() {
    use proxygate_tests::third_party::ThirdParty;
    let judge = Judge::start().await;
    let (tls_judge, ca) = tls_judge().await;
    // Dialing out from addresses of their own: from 127.0.0.1, the gateway's own address, a
    // judge would rightly call them transparent (tried: demoted, one exit group of two).
    let tiny = ThirdParty::tinyproxy_from("tp", "secret", "127.0.0.246".parse().unwrap()).await;
    let socks = ThirdParty::microsocks_from("ms", "secret", "127.0.0.247".parse().unwrap()).await;
    let tiny_url = format!("http://tp:secret@{}", tiny.addr);
    let socks_url = format!("socks5://ms:secret@{}", socks.addr);
    let gw = Gateway::builder()
        .config(&config(&judge, Some((&tls_judge, ca.path()))))
        .upstream(tiny_url.clone())
        .upstream(socks_url.clone())
        .start()
        .await;
    let v = check_all(&gw).await;
    assert_eq!(v["passed"].as_u64(), Some(2), "{v}\n{}", gw.logs());
    for url in [&tiny_url, &socks_url] {
        let row = gw.api(&format!("/api/v1/upstreams/{}", id_of(url))).await;
        assert!(row["leak"].is_null(), "{row}");
        assert!(row["disabled_reason"].is_null(), "{row}");
        assert_eq!(
            row["integrity_passes"], 1,
            "both steps ran and passed: {row}"
        );
        assert_eq!(row["tier"], "operator");
    }
}
