//! Never an open proxy: accounts with argon2id hashes (and the `user` commands), a brute
//! force throttled per address, and the destination policy (tunnel ports, private
//! destinations) as clients see it over HTTP and SOCKS.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::{Duration, Instant};

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::{Gateway, cli, users_file};
use proxygate_tests::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_commands_keep_hashes_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users");
    let f = file.to_str().unwrap();
    users_file(&file, &[("alice", "wonder:land"), ("bob", "builder")]).await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("alice:$argon2id$") && text.contains("bob:$argon2id$"),
        "{text}"
    );
    assert!(!text.contains("wonder") && !text.contains("builder"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let out = cli(&["user", "list", "--users-file", f]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alice\nbob\n");
    let out = cli(&["user", "remove", "bob", "--users-file", f]).await;
    assert!(out.status.success());
    let out = cli(&["user", "remove", "bob", "--users-file", f]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = cli(&[
        "user",
        "add",
        "no-dash",
        "--users-file",
        f,
        "--password-stdin",
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(64),
        "a '-' would read as a routing hint"
    );
    // Without a terminal and without --password-stdin: refused, not a blank password.
    let out = cli(&["user", "add", "carol", "--users-file", f]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));

    // An older plaintext file is refused at start-up, naming the line and the way out...
    let old = dir.path().join("old-users");
    std::fs::write(&old, "# clients\ndave:hunter2\n").unwrap();
    let (code, err) = Gateway::builder()
        .arg("--users-file")
        .arg(old.to_str().unwrap())
        .start_fails()
        .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("auth.users_file")
            && err.contains(":2: account \"dave\" has a plaintext password"),
        "{err}"
    );
    assert!(
        err.contains("proxygate user convert") && !err.contains("hunter2"),
        "{err}"
    );
    // ...and `user convert` hashes it in place; then it serves.
    let out = cli(&["user", "convert", "--users-file", old.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("converted 1"));
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder()
        .arg("--users-file")
        .arg(old.to_str().unwrap())
        .upstream(up.url("http"))
        .start()
        .await;
    let r = curl(&["-x", &gw.http_proxy(), "-U", "dave:hunter2", &origin.url()]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = curl(&["-x", &gw.http_proxy(), "-U", "dave:wrong", &origin.url()]).await;
    assert_eq!(r.status, 407);
    assert!(!gw.logs().contains("hunter2"));
}

/// A SOCKS5 request without authentication (the greeting, then `request`: VER CMD RSV ATYP
/// ADDR PORT for an IPv4 address); the 10-byte reply.
async fn socks5_reply(addr: std::net::SocketAddr, request: &[u8]) -> [u8; 10] {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    rep
}

/// A CONNECT to `target`, sent whole; what the gateway answered in its first read.
async fn connect_reply(addr: std::net::SocketAddr, target: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A SOCKS5 username/password exchange; returns the server's auth status byte.
async fn socks5_login(addr: std::net::SocketAddr, user: &str, pass: &str) -> u8 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 2]);
    let mut req = vec![1, user.len() as u8];
    req.extend_from_slice(user.as_bytes());
    req.push(pass.len() as u8);
    req.extend_from_slice(pass.as_bytes());
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.unwrap();
    r[1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_throttled_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users");
    users_file(&file, &[("alice", "right")]).await;
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder()
        .arg("--users-file")
        .arg(file.to_str().unwrap())
        .upstream(up.url("http"))
        .start()
        .await;
    assert_eq!(socks5_login(gw.addr, "alice", "right").await, 0);
    for i in 0..10 {
        let status = socks5_login(gw.addr, "alice", &format!("guess{i}")).await;
        assert_eq!(status, 1, "attempt {i}");
    }
    // The 11th attempt from this address is refused without verifying, after a pause,
    // even with the right password; over HTTP as well.
    let t0 = Instant::now();
    assert_eq!(socks5_login(gw.addr, "alice", "right").await, 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    let r = curl(&["-x", &gw.http_proxy(), "-U", "alice:right", &origin.url()]).await;
    assert_eq!(r.status, 407);
    assert!(r.body.contains("too many failed logins"), "{}", r.body);
    assert!(
        gw.logs().contains("spent its login failure budget"),
        "{}",
        gw.logs()
    );
    assert!(
        !gw.logs().contains("guess"),
        "attempted passwords never reach the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_policed_by_default() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let socks = FakeUpstream::start(Kind::Socks5, None).await;
    let gw = Gateway::builder()
        .strict()
        .upstream(up.url("http"))
        .start()
        .await;
    // The origin is on loopback: not for clients.
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.header("proxy-status")
            .contains("error=destination_ip_prohibited"),
        "{r:?}"
    );
    let r = curl(&["-p", "-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 403, "{r:?}");
    for target in [
        "127.0.0.1:443",
        "169.254.169.254:80",
        "[::1]:443",
        "localhost:443",
        "10.1.2.3:443",
    ] {
        let head = connect_reply(gw.addr, target).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{target}: {head}");
        assert!(
            head.contains("destination_ip_prohibited"),
            "{target}: {head}"
        );
    }
    // A public address on a port that is not allowed: denied before any upstream is asked.
    let head = connect_reply(gw.addr, "93.184.216.34:25").await;
    assert!(
        head.starts_with("HTTP/1.1 403") && head.contains("error=http_request_denied"),
        "{head}"
    );
    assert!(head.contains("server.connect_ports: 443, 80"), "{head}");
    assert!(
        up.seen().requests.is_empty(),
        "the upstream never heard of any of it"
    );
    // SOCKS5: not allowed by ruleset (0x02). 127.0.0.1:443: an allowed port, a private address.
    let rep = socks5_reply(gw.addr, &[5, 1, 0, 1, 127, 0, 0, 1, 1, 187]).await;
    assert_eq!(rep[1], 0x02);
    let m = gw.admin_get("/metrics").await.1;
    assert!(
        m.contains(
            "proxygate_client_requests_total{outcome=\"destination_private\",protocol=\"socks5\"} 1"
        ),
        "{m}"
    );
    drop(socks);

    // A lab: allow_private_networks and every port.
    let lab = Gateway::builder().upstream(up.url("http")).start().await;
    let r = curl(&["-p", "-x", &lab.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
}

/// What a client asks wrongly (a port or destination the policy denies) is logged at debug,
/// over HTTP and SOCKS alike: a client repeating it cannot flood an operator's log at the
/// default level. What fails upstream is logged at info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_refused_requests_stay_out_of_the_info_log() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = Gateway::builder()
        .strict()
        .upstream(format!("http://{dead_addr}"))
        .env("RUST_LOG", "info")
        .start()
        .await;
    // SOCKS5 to a denied port, SOCKS4 to a private address, CONNECT to a denied port.
    let rep = socks5_reply(gw.addr, &[5, 1, 0, 1, 93, 184, 216, 34, 0, 25]).await;
    assert_eq!(rep[1], 0x02, "{rep:?}");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[4, 1, 1, 187, 10, 1, 2, 3, 0]).await.unwrap();
    let mut rep = [0u8; 8];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 91, "{rep:?}");
    let head = connect_reply(gw.addr, "93.184.216.34:25").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Then an allowed request whose upstream is dead: the operator's business.
    let rep = socks5_reply(gw.addr, &[5, 1, 0, 1, 93, 184, 216, 34, 1, 187]).await;
    assert_ne!(rep[1], 0, "{rep:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.logs().contains("socks request failed") {
        assert!(Instant::now() < deadline, "{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = gw.logs();
    for refused in [
        "request refused",
        "destination_port_denied",
        "destination_ip_prohibited",
    ] {
        assert!(!logs.contains(refused), "{refused}:\n{logs}");
    }
}
