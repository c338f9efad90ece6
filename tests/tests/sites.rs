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
use proxygate_tests::{eventually_async, id_of};

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
    for (f, want) in fakes.iter().zip([true, true, false, false, false]) {
        let e = gw
            .api(&format!("/api/v1/upstreams/{}", id_of(&f.url("http"))))
            .await;
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
            &id_of(&blocked[0].url("http")),
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

/// How a picky origin turns an address away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Forbidden,
    /// A closed connection before a byte.
    Close,
    /// Cloudflare's challenge page: `503` with `cf-mitigated: challenge`.
    Challenge,
}

/// An origin that turns some upstreams' addresses away as `how` says to a request from
/// `banned`, a `200` with `x-peer` to others.
async fn picky_origin(
    banned: Vec<std::net::IpAddr>,
    how: Refusal,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    serve_each(move |mut s, peer| {
            let banned = banned.contains(&peer.ip());
            async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = match (banned, how) {
                    (true, Refusal::Close) => return,
                    (true, Refusal::Forbidden) => {
                        "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    }
                    (true, Refusal::Challenge) => "HTTP/1.1 503 Service Unavailable\r\n\
                        server: cloudflare\r\ncf-mitigated: challenge\r\nContent-Length: 0\r\n\
                        Connection: close\r\n\r\n"
                        .to_owned(),
                    (false, _) => format!(
                        "HTTP/1.1 200 OK\r\nx-peer: {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        peer.ip()
                    ),
                };
                let _ = s.write_all(answer.as_bytes()).await;
            }
    })
    .await
}

/// Whether the API lists `f` as blocked somewhere now.
async fn is_blocked(gw: &Gateway, f: &FakeUpstream) -> Option<()> {
    let e = gw
        .api(&format!("/api/v1/upstreams/{}", id_of(&f.url("http"))))
        .await;
    (!e["blocked_sites"].as_array()?.is_empty()).then_some(())
}

/// Whether the API lists every one of `fakes` as blocked somewhere now.
async fn all_blocked(gw: &Gateway, fakes: &[FakeUpstream]) -> bool {
    for f in fakes {
        if is_blocked(gw, f).await.is_none() {
            return false;
        }
    }
    true
}

/// Waits until the API lists every one of `fakes` as blocked somewhere: a tunnel's end is
/// recorded when the gateway sees both sides close, a moment after its client got the answer.
async fn wait_until_blocked(gw: &Gateway, fakes: &[FakeUpstream]) {
    for f in fakes {
        eventually_async(std::time::Duration::from_secs(2), || is_blocked(gw, f)).await;
    }
}

/// A loopback server that runs `serve` on each connection (with its peer's address).
async fn serve_each<F, Fut>(serve: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, peer)) = listener.accept().await {
            tokio::spawn(serve(s, peer));
        }
    });
    (addr, task)
}

/// The other ways an upstream fails for a site: an absolute-form answer 403 or a known block
/// page (through HTTP upstreams that forward the request) and the target closing a tunnel
/// before a byte came back. Each blocked upstream is turned away twice, then avoided for that
/// site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_a_block_page_or_a_tunnel_closed_before_a_byte_counts_against_the_upstream_there() {
    for how in [Refusal::Forbidden, Refusal::Challenge, Refusal::Close] {
        let close = how == Refusal::Close;
        let mut fakes = Vec::new();
        for _ in 0..4 {
            fakes.push(FakeUpstream::start(Kind::Http, None).await);
        }
        let banned: Vec<std::net::IpAddr> = fakes[..2].iter().map(|f| f.egress).collect();
        let (origin, _task) = picky_origin(banned.clone(), how).await;
        let mut b = Gateway::builder()
            .config(
                "[dial]\nkeep_idle = \"0s\"\nconnect_timeout = \"1s\"\nhandshake_timeout = \"1s\"",
            )
            .arg("--strategy")
            .arg("round_robin");
        for f in &fakes {
            b = b.upstream(f.url("http"));
        }
        let gw = b.start().await;
        let proxy = gw.http_proxy();
        let url = format!("http://{origin}/");
        // CONNECT tunnels when the target closes them; absolute form for the 403s.
        let get = |proxy: String, url: String| async move {
            if close {
                curl(&["-p", "-x", &proxy, &url]).await
            } else {
                curl(&["-x", &proxy, &url]).await
            }
        };
        let mut turned_away = 0;
        for _ in 0..40 {
            let r = get(proxy.clone(), url.clone()).await;
            // (Through a tunnel the status is the CONNECT's; the empty reply shows as curl's
            // exit code and no answer from the origin.)
            if r.status != 200 || r.exit_code != 0 || r.header("x-peer").is_empty() {
                turned_away += 1;
            }
            // Each banned upstream twice, at least: a refusal is recorded a moment after the
            // client got it, so the next request may still meet the same upstream (and with a
            // round-robin cursor per data-plane worker the order is not fixed either).
            if turned_away >= 4 && all_blocked(&gw, &fakes[..2]).await {
                break;
            }
        }
        assert!(turned_away >= 4, "{how:?}: each banned upstream twice");
        wait_until_blocked(&gw, &fakes[..2]).await;
        for _ in 0..20 {
            let r = get(proxy.clone(), url.clone()).await;
            assert_eq!(
                (r.status, r.exit_code),
                (200, 0),
                "{how:?}: a banned upstream again: {r:?}"
            );
            assert!(
                !banned.iter().any(|ip| r.header("x-peer") == ip.to_string()),
                "{r:?}"
            );
        }
        for f in &fakes[..2] {
            let e = gw
                .api(&format!("/api/v1/upstreams/{}", id_of(&f.url("http"))))
                .await;
            assert_eq!(e["blocked_sites"][0]["site"], "127.0.0.1", "{e}");
        }
    }
}

/// A TLS site that refuses some upstreams' addresses the way TLS does: its first answer to the
/// client's handshake is an alert record. Others get a handshake record carrying their address.
async fn tls_refusing_origin(
    banned: Vec<std::net::IpAddr>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    serve_each(move |mut s, peer| {
        let banned = banned.contains(&peer.ip());
        async move {
            let mut hello = [0u8; 6];
            if s.read_exact(&mut hello).await.is_err() {
                return;
            }
            let answer = if banned {
                vec![0x15, 3, 3, 0, 2, 2, 0x28]
            } else {
                let mut a = vec![0x16];
                a.extend_from_slice(peer.ip().to_string().as_bytes());
                a
            };
            let _ = s.write_all(&answer).await;
        }
    })
    .await
}

/// One tunnel through the gateway to `target`: a ClientHello's first bytes, and the target's
/// whole answer.
async fn tls_attempt(proxy: std::net::SocketAddr, target: std::net::SocketAddr) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "{head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(&[0x16, 3, 1, 0, 1, 1]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    answer
}

/// TLS failing inside the tunnel: the site answers the client's handshake with an alert. Each
/// refused upstream is turned away twice there, then avoided for that site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_alert_in_answer_to_the_handshake_counts_against_the_upstream_there() {
    let mut fakes = Vec::new();
    for _ in 0..4 {
        fakes.push(FakeUpstream::start(Kind::Http, None).await);
    }
    let banned: Vec<std::net::IpAddr> = fakes[..2].iter().map(|f| f.egress).collect();
    let (origin, _task) = tls_refusing_origin(banned.clone()).await;
    let mut b = Gateway::builder().arg("--strategy").arg("round_robin");
    for f in &fakes {
        b = b.upstream(f.url("http"));
    }
    let gw = b.start().await;
    let mut alerts = 0;
    for _ in 0..40 {
        if tls_attempt(gw.addr, origin).await.first() == Some(&0x15) {
            alerts += 1;
        }
        // As above: twice each at least, until both are recorded.
        if alerts >= 4 && all_blocked(&gw, &fakes[..2]).await {
            break;
        }
    }
    assert!(alerts >= 4, "each refused upstream twice");
    wait_until_blocked(&gw, &fakes[..2]).await;
    for _ in 0..20 {
        let answer = tls_attempt(gw.addr, origin).await;
        assert_eq!(answer.first(), Some(&0x16), "a refused upstream again");
        let via = String::from_utf8_lossy(&answer[1..]).into_owned();
        assert!(!banned.iter().any(|ip| via == ip.to_string()), "{via}");
    }
}
