//! Limits as hostile clients meet them: too many header fields (431), a target too long (414,
//! on the first request and on a later one of a kept-alive connection), the per-address
//! connection cap (other addresses still served), the keep-alive idle limit, and an upstream
//! whose reply head is too large.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Sends `request` on a new connection and returns what came back until close (or 5 s).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_all(&mut s).await
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection from `ip` (a loopback address of its own).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_targets_and_keepalive_are_bounded() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder()
        .config("[server]\nkeepalive_timeout = \"1s\"")
        .upstream(up.url("http"))
        .start()
        .await;
    let url = origin.url();
    // 101 header fields: 431.
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = exchange(
        gw.addr,
        format!("GET {url} HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // A head of 100 fields (98 + Host + Connection) and a 7 KiB target pass.
    let ok_many: String = (0..98).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = exchange(
        gw.addr,
        format!(
            "GET {url}?{} HTTP/1.1\r\nHost: a\r\n{ok_many}Connection: close\r\n\r\n",
            "q".repeat(7000)
        )
        .as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..r.len().min(200)]);
    // A target over 8 KiB: 414, first request...
    let long = format!("GET {url}?{} HTTP/1.1\r\nHost: a\r\n\r\n", "q".repeat(9000));
    let r = exchange(gw.addr, long.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 414"), "{}", &r[..r.len().min(200)]);
    assert!(r.contains("client_uri_too_long"));
    // ...and a later one on a kept-alive connection.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(long.as_bytes()).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 414"));
    // Idle past keepalive_timeout: closed.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(format!("GET {url} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t0 = Instant::now();
    let rest = read_all(&mut idle).await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "{waited:?}: {rest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder()
        .config("[server]\nmax_connections_per_ip = 2")
        .upstream(up.url("http"))
        .start()
        .await;
    // Two tunnels from 127.0.0.1 hold its share.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.1", gw.addr).await;
        s.write_all(format!("CONNECT {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.addr).as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third from the same address is closed without a word...
    let mut third = connect_from("127.0.0.1", gw.addr).await;
    let _ = third
        .write_all(format!("GET {} HTTP/1.1\r\nHost: a\r\n\r\n", origin.url()).as_bytes())
        .await;
    assert_eq!(read_all(&mut third).await, "");
    // ...while another address is served.
    let mut other = connect_from("127.0.0.9", gw.addr).await;
    other
        .write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                origin.url()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    assert!(read_all(&mut other).await.starts_with("HTTP/1.1 200"));
    // A tunnel closed gives the share back.
    drop(held.pop());
    proxygate_tests::eventually_async(Duration::from_secs(5), || async {
        let mut again = connect_from("127.0.0.1", gw.addr).await;
        again
            .write_all(
                format!(
                    "GET {} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    origin.url()
                )
                .as_bytes(),
            )
            .await
            .ok()?;
        read_all(&mut again)
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    let m = gw.admin_get("/metrics").await.1;
    let refused: f64 = m
        .lines()
        .find(|l| l.contains("outcome=\"client_connection_limit\",protocol=\"http\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(refused >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reply_head_over_the_limit_fails_the_attempt() {
    // An "upstream" whose answer to CONNECT never ends its head.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
                for i in 0.. {
                    if s.write_all(format!("X-Filler-{i}: {}\r\n", "f".repeat(100)).as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let gw = Gateway::builder()
        .upstream(format!("http://{addr}"))
        .start()
        .await;
    let r = exchange(
        gw.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(
        r.contains("head too large") && r.contains("upstream_protocol"),
        "{r}"
    );
}
