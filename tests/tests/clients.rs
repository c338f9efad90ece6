//! A Rust client (reqwest) through the gateway: absolute-form with sized and chunked bodies
//! and keep-alive, CONNECT to an HTTPS origin, SOCKS5; header hygiene; IPv6 CONNECT targets.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::Duration;

use bytes::Bytes;
use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::tls::TestPki;

fn client(proxy: &str, pki: Option<&TestPki>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).unwrap())
        .timeout(Duration::from_secs(20));
    if let Some(pki) = pki {
        b = b.add_root_certificate(reqwest::Certificate::from_der(&pki.ca_der).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_bodies_and_keep_alive_through_http_upstream() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, Some(("u", "p"))).await;
    let gw = Gateway::builder().upstream(fake.url("http")).start().await;
    let c = client(&gw.http_proxy(), None);

    // A sized body.
    let sized = vec![b'x'; 200_000];
    let r = c
        .post(format!("{}/sized", origin.url()))
        .body(sized.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-peer"], fake.egress.to_string());
    assert_eq!(r.headers()["x-body-len"], "200000");
    assert_eq!(r.bytes().await.unwrap().len(), 200_000);

    // A chunked body (unknown length).
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..50)
        .map(|i| Ok(Bytes::from(vec![b'a' + (i % 26) as u8; 1000])))
        .collect();
    let r = c
        .put(format!("{}/chunked", origin.url()))
        .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-method"], "PUT");
    assert_eq!(r.headers()["x-body-len"], "50000");
    // Read to the end, so the client connection is kept for the next request.
    assert_eq!(r.bytes().await.unwrap().len(), 50_000);

    // Keep-alive: curl sends five requests on one client connection; the gateway keeps its
    // upstream connection for all of them (the one the PUT above left is reused: at most one
    // new one).
    let (before, origin_before) = (fake.connections(), origin.connections());
    let urls: Vec<String> = (0..5).map(|i| format!("{}/ka/{i}", origin.url())).collect();
    let mut args = vec!["-x", gw.http_proxy().leak() as &str];
    args.extend(urls.iter().map(String::as_str));
    let r = curl(&args).await;
    assert_eq!((r.exit_code, r.status), (0, 200), "{r:?}");
    assert!(
        fake.connections() - before <= 1,
        "upstream connection not reused: {} new",
        fake.connections() - before
    );
    assert!(origin.connections() - origin_before <= 1);
    // The upstream wants credentials, so the requests went in a tunnel to the origin (the
    // credentials only in the CONNECT, never on a kept connection where they could reach the
    // origin). (The fake records only the first request of a connection, then relays.)
    let seen = fake.seen();
    assert_eq!(
        seen.requests.last().unwrap(),
        &format!("CONNECT {}", origin.addr)
    );
    assert_eq!(r.header("x-target"), "/ka/4");
    assert!(
        !r.header("x-header-names").contains("proxy-authorization"),
        "{r:?}"
    );
    assert!(
        seen.auth
            .iter()
            .all(|a| a == &Some(("u".into(), "p".into())))
    );
}

fn futures_stream(
    items: Vec<Result<Bytes, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct Iter(std::vec::IntoIter<Result<Bytes, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_connect_to_https_origin_and_socks5() {
    let pki = TestPki::new();
    let origin = Origin::start_on("127.0.0.1:0".parse().unwrap(), Some(pki.acceptor())).await;
    let fake = FakeUpstream::start(Kind::Socks5, Some(("s5", "pw"))).await;
    let gw = Gateway::builder()
        .upstream(fake.url("socks5h"))
        .start()
        .await;
    let url = format!("https://localhost:{}/secure", origin.addr.port());

    // https:// through an HTTP proxy: reqwest sends CONNECT.
    let r = client(&gw.http_proxy(), Some(&pki))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-peer"], fake.egress.to_string());

    // The same through the SOCKS5 front end, names resolved by the upstream.
    let r = client(&format!("socks5h://{}", gw.addr), Some(&pki))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-peer"], fake.egress.to_string());
    let seen = fake.seen();
    let want = format!("socks5 domain localhost:{}", origin.addr.port());
    assert_eq!(seen.requests, vec![want.clone(), want]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_host_rebuilt() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Socks5, None).await;
    let gw = Gateway::builder()
        .upstream(fake.url("socks5"))
        .start()
        .await;
    let url = format!("{}/h", origin.url());
    let r = curl(&[
        "-x",
        &gw.http_proxy(),
        "-U",
        "alice:secret",
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "X-Keep: 1",
        "-H",
        "Host: evil.example",
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let names = r.header("x-header-names");
    for gone in [
        "proxy-authorization",
        "proxy-connection",
        "x-hop",
        "keep-alive",
        "te",
    ] {
        assert!(
            !names.split(',').any(|n| n == gone),
            "{gone} reached the origin: {names}"
        );
    }
    assert!(names.split(',').any(|n| n == "x-keep"), "{names}");
    assert_eq!(r.header("x-host"), origin.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_ipv6_literal() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    };
    drop(probe);
    let origin = Origin::start_on("[::1]:0".parse().unwrap(), None).await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder().upstream(fake.url("http")).start().await;
    let url = format!("http://[::1]:{}/v6", origin.addr.port());
    let r = curl(&["-p", "-x", &gw.http_proxy(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.logs());
    assert_eq!(r.header("x-peer"), "::1");
    assert_eq!(
        fake.seen().requests,
        vec![format!("CONNECT [::1]:{}", origin.addr.port())]
    );
    // And through the SOCKS5 front end with an IPv6 address type.
    let r = curl(&["--socks5", &gw.addr.to_string(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// A client may send its first bytes for the target with its handshake, before the gateway's
/// answer (browsers send a TLS hello right after CONNECT; a SOCKS client may do the same): in
/// one write with the handshake, they reach the origin after the answer, whole. The request is
/// padded past the SOCKS handshake's 1 KiB buffer, so part of it is still in the first read's
/// bytes, and part in the handshake's buffer, when the tunnel starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_with_the_handshake_go_through_the_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder().upstream(fake.url("http")).start().await;
    let port = origin.addr.port();
    let pad = "p".repeat(3000);
    let request = format!(
        "GET /early HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n"
    );
    let connect = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let mut socks5 = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
    socks5.extend(port.to_be_bytes());
    let mut socks4 = vec![4, 1];
    socks4.extend(port.to_be_bytes());
    socks4.extend([127, 0, 0, 1, 0]);
    for (name, handshake) in [
        ("CONNECT", connect.into_bytes()),
        ("SOCKS5", socks5),
        ("SOCKS4", socks4),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut bytes = handshake;
        bytes.extend(request.as_bytes());
        s.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer in 10 s\n{}", gw.logs()))
            .unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.contains("x-target: /early") && got.contains("HTTP/1.1 200 OK"),
            "{name}: {got}\n{}",
            gw.logs()
        );
    }
    assert_eq!(origin.connections(), 3);
}
