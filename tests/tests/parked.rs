//! Kept-alive HTTP client connections that idle past `server.keepalive_release_after` give back
//! their HTTP buffers ("parked", counted by `proxygate_parked_connections`) and are served on as
//! before: the next request, a head split over the park, pipelined requests, a request with a
//! body, a CONNECT; an answer the client was slow to read arrives whole first; the keep-alive
//! limit, a client's close and shutdown end a parked connection as they ended an idle one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::{Duration, Instant};

use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::{eventually_async, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client connection that reads answers one at a time (a read may bring the next one too).
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(gw: &Gateway) -> Client {
        Client {
            s: TcpStream::connect(gw.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// A client with a small receive window (set before connecting, so the kernel does not
    /// grow it): what it does not read stays on the gateway's side.
    async fn connect_slow(gw: &Gateway) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(32 << 10).unwrap();
        Client {
            s: socket.connect(gw.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) {
        let mut chunk = vec![0u8; 64 << 10];
        let n = self.s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed early: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next answer: its head and its body (framed by `Content-Length`, which the origin
    /// always sends; none for a CONNECT's).
    async fn response(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(20), async {
            let head_end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                self.fill().await;
            };
            let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while self.buf.len() < head_end + len {
                self.fill().await;
            }
            let body = self.buf[head_end..head_end + len].to_vec();
            self.buf.drain(..head_end + len);
            (head, body)
        })
        .await
        .expect("an answer within 20 s")
    }

    /// Everything until the gateway closes the connection (within 10 s).
    async fn rest(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.buf);
        tokio::time::timeout(Duration::from_secs(10), self.s.read_to_end(&mut rest))
            .await
            .expect("closed within 10 s")
            .unwrap();
        rest
    }
}

/// The answer is the origin's to a request for `path` (in whatever form it reached it).
fn assert_target(head: &str, path: &str) {
    let target = head
        .lines()
        .find_map(|l| l.strip_prefix("x-target: "))
        .unwrap_or_else(|| panic!("not the origin's answer: {head}"));
    assert!(
        target.ends_with(path),
        "{path} asked, {target} answered: {head}"
    );
}

fn get(origin: &Origin, path: &str) -> String {
    format!(
        "GET {}{path} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url(),
        origin.addr
    )
}

async fn parked(gw: &Gateway) -> f64 {
    let (_, text) = gw.admin_get("/metrics").await;
    sample(&text, "proxygate_parked_connections")
}

/// Waits until exactly `n` connections are parked.
async fn until_parked(gw: &Gateway, n: f64) {
    eventually_async(Duration::from_secs(10), || async {
        (parked(gw).await == n).then_some(())
    })
    .await;
}

/// Parks after 200 ms; a kept-alive connection idle for 1.5 s is closed.
const SHORT_KEEPALIVE: &str = "keepalive_release_after = \"200ms\"\nkeepalive_timeout = \"1500ms\"";

/// A new client connection, parked after its one request (for `path`), the only one parked.
async fn parked_client(gw: &Gateway, origin: &Origin, path: &str) -> Client {
    let mut c = Client::connect(gw).await;
    c.send(get(origin, path).as_bytes()).await;
    c.response().await;
    until_parked(gw, 1.0).await;
    c
}

async fn gateway(upstream: &FakeUpstream, server: &str) -> Gateway {
    Gateway::builder()
        .config(&format!("[server]\n{server}"))
        .upstream(upstream.url("http"))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_serves_its_next_requests() {
    let origin = Origin::start().await;
    // Two upstreams picked in turn: the connection keeps its first (dial.rotate's default,
    // "connection") through every park.
    let (a, b) = (
        FakeUpstream::start(Kind::Http, None).await,
        FakeUpstream::start(Kind::Http, None).await,
    );
    let gw = Gateway::builder()
        .config("[server]\nkeepalive_release_after = \"200ms\"\n[pool]\nstrategy = \"round_robin\"")
        .upstream(a.url("http"))
        .upstream(b.url("http"))
        .start()
        .await;
    let mut c = Client::connect(&gw).await;
    let peer = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("x-peer: "))
            .unwrap()
            .to_owned()
    };

    c.send(get(&origin, "/one").as_bytes()).await;
    let (head, _) = c.response().await;
    let first = peer(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_target(&head, "/one");
    until_parked(&gw, 1.0).await;

    // The next request, once parked.
    c.send(get(&origin, "/two").as_bytes()).await;
    let (head, _) = c.response().await;
    assert_target(&head, "/two");
    assert_eq!(peer(&head), first);
    assert_eq!(parked(&gw).await, 0.0, "served, so no longer parked");
    until_parked(&gw, 1.0).await;

    // A head split over the park: its first half read by hyper, the rest after the timer.
    let three = get(&origin, "/three");
    let (a, b) = three.split_at(20);
    c.send(a.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.send(b.as_bytes()).await;
    let (head, _) = c.response().await;
    assert_target(&head, "/three");
    assert_eq!(peer(&head), first);
    until_parked(&gw, 1.0).await;

    // Two requests pipelined, then a body, each answered in order on the same connection.
    let two = format!("{}{}", get(&origin, "/four"), get(&origin, "/five"));
    c.send(two.as_bytes()).await;
    for path in ["/four", "/five"] {
        let (head, _) = c.response().await;
        assert_target(&head, path);
        assert_eq!(peer(&head), first);
    }
    until_parked(&gw, 1.0).await;
    let post = format!(
        "POST {}/six HTTP/1.1\r\nHost: {}\r\nContent-Length: 11\r\n\r\nhello there",
        origin.url(),
        origin.addr
    );
    c.send(post.as_bytes()).await;
    let (head, body) = c.response().await;
    assert_target(&head, "/six");
    assert_eq!(peer(&head), first);
    assert_eq!(body, b"hello there");
    until_parked(&gw, 1.0).await;

    // A CONNECT turns the parked connection into a tunnel.
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.addr);
    c.send(connect.as_bytes()).await;
    let (head, _) = c.response().await;
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    c.send(format!("GET /seven HTTP/1.1\r\nHost: {}\r\n\r\n", origin.addr).as_bytes())
        .await;
    let (head, _) = c.response().await;
    assert_target(&head, "/seven");
    assert_eq!(parked(&gw).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_connect_before_the_park_is_a_tunnel_too() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = gateway(&up, "").await;
    let mut c = Client::connect(&gw).await;
    c.send(get(&origin, "/one").as_bytes()).await;
    let (head, _) = c.response().await;
    assert_target(&head, "/one");
    // Straight after, on hyper's connection: answered by hyper, then let go as a tunnel, with
    // the bytes the client sent right behind the head.
    let connect = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\nGET /two HTTP/1.1\r\nHost: {0}\r\n\r\n",
        origin.addr
    );
    c.send(connect.as_bytes()).await;
    let (head, _) = c.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = c.response().await;
    assert_target(&head, "/two");
    let (_, text) = gw.admin_get("/metrics").await;
    assert_eq!(sample(&text, "proxygate_active_tunnels"), 1.0);
    assert_eq!(
        sample(
            &text,
            "proxygate_client_requests_total{outcome=\"ok\",protocol=\"http_connect\"}"
        ),
        1.0
    );
}

/// POSTs 8 MiB to the echoing origin on a new connection with a small receive window and
/// reads the echo slowly: a little, then nothing for a second (ten release periods), then the
/// rest, which must be the body sent. The sockets on the way hold far less than 8 MiB, so the
/// end of the answer waits in the gateway meanwhile.
async fn echo_read_slowly(gw: &Gateway, origin: &Origin, close: bool) -> Client {
    let body: Vec<u8> = (0..8usize << 20).map(|i| (i % 251) as u8).collect();
    let mut c = Client::connect_slow(gw).await;
    let head = format!(
        "POST {}/big HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{}\r\n",
        origin.url(),
        origin.addr,
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    c.send(head.as_bytes()).await;
    c.send(&body).await;
    // The origin answers once it has the whole body.
    c.fill().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (head, echoed) = c.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        echoed == body,
        "the answer came back altered ({} bytes)",
        echoed.len()
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_read_slowly_arrives_whole_before_the_park() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = gateway(&up, "keepalive_release_after = \"100ms\"").await;
    let mut c = echo_read_slowly(&gw, &origin, false).await;
    // Parked once it was all taken, and still serving.
    until_parked(&gw, 1.0).await;
    c.send(get(&origin, "/after").as_bytes()).await;
    let (head, _) = c.response().await;
    assert_target(&head, "/after");
    // With `Connection: close` hyper ends the connection itself after the answer, which
    // arrives whole before the gateway closes.
    let mut c = echo_read_slowly(&gw, &origin, true).await;
    assert!(c.rest().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_ends_at_the_keepalive_limit_or_with_its_client() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = gateway(&up, SHORT_KEEPALIVE).await;
    // A connection in use outlives keepalive_timeout: it bounds idleness, not a life.
    let mut c = Client::connect(&gw).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        c.send(get(&origin, "/busy").as_bytes()).await;
        let (head, _) = c.response().await;
        assert_target(&head, "/busy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
    // Idle past keepalive_timeout, counted from the answer: closed, nothing answered.
    let mut c = Client::connect(&gw).await;
    c.send(get(&origin, "/one").as_bytes()).await;
    c.response().await;
    let t0 = Instant::now();
    until_parked(&gw, 1.0).await;
    let rest = c.rest().await;
    let waited = t0.elapsed();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        waited >= Duration::from_millis(1300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(parked(&gw).await, 0.0);
    // A client that closes its parked connection: gone from the gauge, and no error counted.
    let c = parked_client(&gw, &origin, "/two").await;
    drop(c);
    until_parked(&gw, 0.0).await;
    let (_, text) = gw.admin_get("/metrics").await;
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("proxygate_client_requests_total{") && !l.contains("\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_after_the_park_gets_408_at_the_keepalive_limit() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = gateway(&up, SHORT_KEEPALIVE).await;
    let mut c = parked_client(&gw, &origin, "/one").await;
    c.send(b"GET http://").await;
    let rest = c.rest().await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_kept_alive_connections_at_once_parked_or_not() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    for release in ["200ms", "1h"] {
        let mut gw = gateway(
            &up,
            &format!("keepalive_release_after = \"{release}\"\nshutdown_grace = \"60s\""),
        )
        .await;
        let mut c = Client::connect(&gw).await;
        c.send(get(&origin, "/one").as_bytes()).await;
        c.response().await;
        if release == "200ms" {
            until_parked(&gw, 1.0).await;
        }
        let t0 = Instant::now();
        gw.signal("TERM");
        assert!(c.rest().await.is_empty(), "{release}");
        let status = gw.wait(Duration::from_secs(20)).await;
        assert!(status.success(), "{release}: {status:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{release}: {:?}",
            t0.elapsed()
        );
    }
}
