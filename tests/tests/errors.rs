//! Bad input and failures get precise, typed answers, and the gateway keeps serving:
//! garbage, oversized heads, truncated and unsupported SOCKS requests, no upstream, client
//! authentication, the allow-list.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::net::SocketAddr;
use std::time::Duration;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind, refusing_addr};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes`, half-closes when `close` is set, and reads until EOF (or 5 s).
async fn exchange(addr: SocketAddr, bytes: &[u8], close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    if close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

async fn still_serves(gw: &Gateway, origin: &Origin) {
    let r = curl(&["-x", &gw.http_proxy(), &format!("{}/alive", origin.url())]).await;
    assert_eq!(
        r.status,
        200,
        "gateway stopped serving: {r:?}\n{}",
        gw.logs()
    );
}

async fn gateway_with_upstream() -> (Origin, FakeUpstream, Gateway) {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Socks5, None).await;
    let gw = Gateway::builder()
        .config("[server]\nheader_read_timeout = \"1s\"\nmax_header_bytes = 8192")
        .upstream(fake.url("socks5"))
        .start()
        .await;
    (origin, fake, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_typed_answers() {
    let (origin, _fake, gw) = gateway_with_upstream().await;

    let binary = exchange(gw.addr, b"\x16\x03\x01\x02\x00garbage", true).await;
    let text = String::from_utf8_lossy(&binary);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(
        text.contains("Proxy-Status: proxygate; error=http_request_error"),
        "{text}"
    );

    let ascii = exchange(gw.addr, b"HELLO THERE\r\n\r\n", false).await;
    let text = String::from_utf8_lossy(&ascii);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(
        text.contains("Proxy-Status: proxygate; error=http_request_error"),
        "{text}"
    );

    let big = format!(
        "GET {}/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        origin.url(),
        "a".repeat(100_000)
    );
    let text =
        String::from_utf8_lossy(&exchange(gw.addr, big.as_bytes(), false).await).into_owned();
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(
        text.contains("Proxy-Status: proxygate; error=http_request_error"),
        "{text}"
    );

    let truncated = exchange(gw.addr, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n", true).await;
    assert!(String::from_utf8_lossy(&truncated).starts_with("HTTP/1.1 400 "));

    // A client that says nothing after its first bytes is timed out (header_read_timeout).
    let slow = exchange(gw.addr, b"GET http://a/ HTTP/1.1\r\n", false).await;
    assert!(String::from_utf8_lossy(&slow).starts_with("HTTP/1.1 408 "));

    let r = curl(&[
        "-x",
        &gw.http_proxy(),
        "-X",
        "GET",
        "--request-target",
        "/",
        &origin.url(),
    ])
    .await;
    assert_eq!(r.status, 400, "origin-form request: {r:?}");
    assert!(r.header("proxy-status").contains("http_request_error"));

    let bad_connect = exchange(
        gw.addr,
        b"CONNECT nohost HTTP/1.1\r\nHost: nohost\r\n\r\n",
        false,
    )
    .await;
    let text = String::from_utf8_lossy(&bad_connect);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("proxy-status: proxygate; error=http_request_error"),
        "{text}"
    );

    still_serves(&gw, &origin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_socks_gets_reply_codes() {
    let (origin, _fake, gw) = gateway_with_upstream().await;

    // Truncated greeting: closed, no reply beyond what was asked.
    assert!(exchange(gw.addr, &[5, 3, 0], true).await.is_empty());
    // Greeting then silence: closed by the handshake timeout.
    let out = exchange(gw.addr, &[5, 1, 0], false).await;
    assert_eq!(out, [5, 0]);
    // No acceptable method.
    assert_eq!(exchange(gw.addr, &[5, 1, 0x80], true).await, [5, 0xff]);
    // BIND: command not supported (0x07).
    let out = exchange(gw.addr, &[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80], true).await;
    assert_eq!(out[..4], [5, 0, 5, 7]);
    // Unknown address type: 0x08.
    let out = exchange(gw.addr, &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3], true).await;
    assert_eq!(out[..4], [5, 0, 5, 8]);
    // SOCKS4 BIND: rejected (91).
    let out = exchange(gw.addr, &[4, 2, 0, 80, 127, 0, 0, 1, 0], true).await;
    assert_eq!(out, [0, 91, 0, 0, 0, 0, 0, 0]);
    // SOCKS4 truncated.
    assert!(exchange(gw.addr, &[4, 1, 0], true).await.is_empty());

    // Random input of every shape: never a crash.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200 {
        let len = (i % 40) + 1;
        let blob: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x & 0xff) as u8
            })
            .collect();
        let first = [5u8, 4, b'G', b'C', 0][i % 5];
        let mut bytes = vec![first];
        bytes.extend(blob);
        exchange(gw.addr, &bytes, true).await;
    }
    still_serves(&gw, &origin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_typed_for_every_protocol() {
    // No upstream at all: 503 / SOCKS5 general failure / SOCKS4 rejected.
    let empty = Gateway::builder().start().await;
    let r = curl(&["-x", &empty.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert_eq!(r.status, 503);
    assert!(
        r.header("proxy-status")
            .starts_with("proxygate; error=destination_unavailable")
    );
    let r = curl(&["-p", "-x", &empty.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert_eq!(r.status, 503, "{r:?}");
    let out = exchange(
        empty.addr,
        &[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80],
        true,
    )
    .await;
    assert_eq!(out[..4], [5, 0, 5, 1]);
    let out = exchange(empty.addr, &[4, 1, 0, 80, 127, 0, 0, 1, 0], true).await;
    assert_eq!(out[..2], [0, 91]);

    // A refusing upstream: 502 naming the refusal.
    let refusing = refusing_addr().await;
    let gw = Gateway::builder()
        .upstream(format!("http://{refusing}"))
        .start()
        .await;
    let r = curl(&["-x", &gw.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert_eq!(r.status, 502);
    assert!(
        r.header("proxy-status")
            .contains("error=connection_refused"),
        "{r:?}"
    );

    // A black-holed upstream: 504 / SOCKS5 0x06 (TTL expired, the conventional timeout).
    let hole = proxygate_tests::fakes::Blackhole::start().await;
    let gw = Gateway::builder()
        .config("[dial]\nhandshake_timeout = \"300ms\"")
        .upstream(format!("socks5://{}", hole.addr))
        .start()
        .await;
    let r = curl(&["-p", "-x", &gw.http_proxy(), "http://127.0.0.1:9/"]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        r.header("proxy-status")
            .contains("error=connection_read_timeout"),
        "{r:?}"
    );
    let out = exchange(gw.addr, &[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80], true).await;
    assert_eq!(out[..4], [5, 0, 5, 6]);

    // A working upstream whose destination refuses: 502, SOCKS5 0x05, and not retried.
    let fake = FakeUpstream::start(Kind::Socks5, None).await;
    let gw = Gateway::builder()
        .upstream(fake.url("socks5"))
        .start()
        .await;
    let dead = refusing_addr().await;
    let r = curl(&["-p", "-x", &gw.http_proxy(), &format!("http://{dead}/")]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.header("proxy-status").contains("target_refused"), "{r:?}");
    let mut req = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
    req.extend(dead.port().to_be_bytes());
    let out = exchange(gw.addr, &req, true).await;
    assert_eq!(out[..4], [5, 0, 5, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, Some(("up", "Str3amPW"))).await;
    let users = tempfile::NamedTempFile::new().unwrap();
    proxygate_tests::gateway::users_file(users.path(), &[("alice", "wonder:land")]).await;
    let gw = Gateway::builder()
        .config(&format!("[auth]\nusers_file = {:?}", users.path()))
        .upstream(fake.url("http"))
        .start()
        .await;
    let url = format!("{}/auth", origin.url());
    let proxy = gw.http_proxy();

    let r = curl(&["-x", &proxy, &url]).await;
    assert_eq!(r.status, 407);
    assert_eq!(r.header("proxy-authenticate"), "Basic realm=\"proxygate\"");
    assert!(r.header("proxy-status").contains("http_request_denied"));
    let r = curl(&["-x", &proxy, "-U", "alice:wrong", &url]).await;
    assert_eq!(r.status, 407);
    let r = curl(&["-p", "-x", &proxy, &url]).await;
    assert_eq!(r.status, 407, "{r:?}");

    let r = curl(&["-x", &proxy, "-U", "alice:wonder:land", &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // The upstream got its own credentials, never the client's.
    assert!(
        fake.seen()
            .auth
            .iter()
            .all(|a| a == &Some(("up".into(), "Str3amPW".into())))
    );
    let r = curl(&["-p", "-x", &proxy, "-U", "alice:wonder:land", &url]).await;
    assert_eq!(r.status, 200, "{r:?}");

    // SOCKS5: no-auth is not offered back; username/password works.
    assert_eq!(exchange(gw.addr, &[5, 1, 0], true).await, [5, 0xff]);
    let r = curl(&[
        "-x",
        &format!("socks5h://alice:wonder%3Aland@{}", gw.addr),
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(&["-x", &format!("socks5h://alice:nope@{}", gw.addr), &url]).await;
    assert_ne!(r.status, 200);
    // SOCKS4 has no password: refused while authentication is on.
    let out = exchange(gw.addr, &[4, 1, 0, 80, 127, 0, 0, 1, b'a', 0], true).await;
    assert_eq!(out[..2], [0, 91]);
    // Secrets never reach the log.
    let logs = gw.logs();
    for secret in ["wonder", "Str3amPW"] {
        assert!(!logs.contains(secret), "{secret} in the log:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_closes_other_clients() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder()
        .config("[server]\nallow = [\"10.0.0.0/8\"]")
        .upstream(fake.url("http"))
        .start()
        .await;
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(fake.connections(), 0);
    let open = Gateway::builder()
        .config("[server]\nallow = [\"127.0.0.0/8\"]")
        .upstream(fake.url("http"))
        .start()
        .await;
    let r = curl(&["-x", &open.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_counts_open_tunnels() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder()
        // Several workers, whatever the CPUs: the share must reach the worker whose queue
        // holds the waiting client.
        .config("[server]\nmax_connections = 1\nworkers = 4")
        .upstream(fake.url("http"))
        .start()
        .await;
    // One CONNECT tunnel, open and idle, holds the only slot...
    let mut tunnel = TcpStream::connect(gw.addr).await.unwrap();
    tunnel
        .write_all(format!("CONNECT {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.addr).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tunnel.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // ...so the next client waits in the accept queue...
    let waiting = tokio::spawn({
        let proxy = gw.http_proxy();
        let url = origin.url();
        async move { curl(&["-x", &proxy, &url]).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "served past max_connections");
    // ...until the tunnel closes.
    drop(tunnel);
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dropping_a_request_with_a_body_is_a_502() {
    let origin = Origin::start().await;
    // Accepts the first connection, drops the second at once.
    let flaky = FakeUpstream::start_with(
        Kind::Http,
        None,
        proxygate_tests::fakes::Behavior {
            fail_every_other: true,
            ..Default::default()
        },
    )
    .await;
    let gw = Gateway::builder().upstream(flaky.url("http")).start().await;
    let url = format!("{}/post", origin.url());
    let r = curl(&["-x", &gw.http_proxy(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // A body cannot be sent twice: the upstream's failure is the answer, named as such.
    let r = curl(&["-x", &gw.http_proxy(), "--data-binary", "payload", &url]).await;
    assert_eq!(r.status, 502, "{r:?}\n{}", gw.logs());
    assert!(r.header("proxy-status").contains("upstream_io"), "{r:?}");
}
