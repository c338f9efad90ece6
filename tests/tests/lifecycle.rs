//! Reload and drain, as an operator runs them: SIGHUP after editing the config, the users
//! file or an upstreams file; SIGTERM to stop; a second signal to stop now.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::{Duration, Instant};

use base64::Engine;
use proxygate_tests::curl::curl;
use proxygate_tests::eventually;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::{Gateway, cli, users_file};
use proxygate_tests::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CONNECT tunnel to `origin` through the gateway, as `user` (with password `pw`).
async fn tunnel(gw: &Gateway, origin: &Origin, user: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let auth = user.map_or_else(String::new, |u| {
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:pw"))
        )
    });
    s.write_all(
        format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n{auth}\r\n",
            origin.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Reads one response head (the origin's answers to GET have no body).
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

/// One GET through an open tunnel: the `x-peer` the origin saw (which upstream dialed it).
async fn get_through(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    head.lines()
        .find_map(|l| l.strip_prefix("x-peer: "))
        .unwrap()
        .to_owned()
}

/// Waits until the gateway has logged `needle` (at most `secs`), showing its log otherwise.
async fn wait_log(gw: &Gateway, needle: &str, secs: u64) {
    let limit = Instant::now() + Duration::from_secs(secs);
    while !gw.logs().contains(needle) {
        assert!(
            Instant::now() < limit,
            "no {needle:?} within {secs} s; the log:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn proxy_as(gw: &Gateway, user: &str) -> String {
    format!("http://{user}:pw@{}", gw.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_config_users_and_upstream_files_without_dropping_a_connection() {
    let origin = Origin::start().await;
    let (a, b) = (
        FakeUpstream::start(Kind::Http, None).await,
        FakeUpstream::start(Kind::Socks5, None).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    users_file(&users, &[("alice", "pw")]).await;
    let list = dir.path().join("upstreams.txt");
    std::fs::write(&list, format!("# ours\n{}\n", a.url("http"))).unwrap();
    let mut gw = Gateway::builder()
        .config(&format!(
            "[auth]\nusers_file = {:?}\n[upstreams]\nfiles = [{:?}]\n[server]\nshutdown_grace = \"1s\"",
            users.display().to_string(),
            list.display().to_string()
        ))
        .start()
        .await;
    let mut open = tunnel(&gw, &origin, Some("alice")).await;
    assert_eq!(get_through(&mut open).await, a.egress.to_string());

    // The operator edits all three: upstream B replaces A, bob replaces alice, a tighter
    // request-target limit, and a key only a restart applies.
    std::fs::write(&list, format!("{}\n", b.url("socks5"))).unwrap();
    users_file(&users, &[("bob", "pw")]).await;
    let out = cli(&[
        "user",
        "remove",
        "alice",
        "--users-file",
        users.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    let edited = config.replacen(
        "[server]\n",
        "[server]\nmax_target_bytes = 300\nmax_connections = 77\n",
        1,
    );
    assert_ne!(edited, config);
    std::fs::write(gw.config_path(), edited).unwrap();
    gw.signal("HUP");
    wait_log(&gw, "configuration reloaded", 10).await;
    let logs = gw.logs();
    assert!(logs.contains("upstreams_changed=1"), "{logs}");
    assert!(logs.contains("upstreams_removed=1"), "{logs}");
    assert!(
        logs.contains("applied at the next restart: server.max_connections"),
        "{logs}"
    );

    // New connections: bob through B; alice is gone; the new limit holds.
    let r = curl(&["-x", &proxy_as(&gw, "bob"), &origin.url()]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-peer"), b.egress.to_string());
    let r = curl(&["-x", &proxy_as(&gw, "alice"), &origin.url()]).await;
    assert_eq!(r.status, 407, "{r:?}");
    let long = format!("{}/{}", origin.url(), "x".repeat(400));
    let r = curl(&["-x", &proxy_as(&gw, "bob"), &long]).await;
    assert_eq!(r.status, 414, "{r:?}");
    // The tunnel opened before the reload still carries traffic, through A.
    assert_eq!(get_through(&mut open).await, a.egress.to_string());
    // The admin API sees the new pool.
    let pool = gw.api("/api/v1/upstreams").await.to_string();
    assert!(pool.contains(&b.addr.to_string()), "{pool}");
    assert!(!pool.contains(&a.addr.to_string()), "{pool}");
    drop(open);
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_bad_config_or_users_file_keeps_the_running_one() {
    let origin = Origin::start().await;
    let a = FakeUpstream::start(Kind::Http, None).await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    users_file(&users, &[("alice", "pw")]).await;
    let gw = Gateway::builder()
        .config(&format!(
            "[auth]\nusers_file = {:?}",
            users.display().to_string()
        ))
        .upstream(a.url("http"))
        .start()
        .await;
    let good = std::fs::read_to_string(gw.config_path()).unwrap();

    // Two problems in two sections: both are named, nothing changes.
    let bad = good.replacen(
        "[server]\n",
        "[server]\nmax_headers = \"many\"\nmax_target_bytes = 10\n",
        1,
    ) + "\n[pool]\nstrategy = \"coin_toss\"\n";
    std::fs::write(gw.config_path(), bad).unwrap();
    gw.signal("HUP");
    wait_log(&gw, "the running configuration is kept", 10).await;
    let logs = gw.logs();
    assert!(logs.contains("server.max_headers"), "{logs}");
    assert!(logs.contains("pool.strategy"), "{logs}");
    assert!(!logs.contains("configuration reloaded"), "{logs}");
    let long = format!("{}/{}", origin.url(), "x".repeat(400));
    let r = curl(&["-x", &proxy_as(&gw, "alice"), &long]).await;
    assert_eq!(r.status, 200, "the old limits still hold: {r:?}");

    // A users file with a plaintext line: refused with the way out, alice still logs in.
    std::fs::write(gw.config_path(), &good).unwrap();
    std::fs::write(&users, "alice:hunter2\n").unwrap();
    gw.signal("HUP");
    eventually(Duration::from_secs(10), || {
        (gw.logs()
            .matches("the running configuration is kept")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    let logs = gw.logs();
    assert!(logs.contains("plaintext password"), "{logs}");
    assert!(
        !logs.contains("hunter2"),
        "a password reached the log: {logs}"
    );
    let r = curl(&["-x", &proxy_as(&gw, "alice"), &origin.url()]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_tunnels_then_closes_them_and_exits_zero() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let mut gw = Gateway::builder()
        .config("[server]\nshutdown_grace = \"3s\"")
        .upstream(fake.url("http"))
        .start()
        .await;
    let mut open = tunnel(&gw, &origin, None).await;
    let signalled = Instant::now();
    gw.signal("TERM");
    wait_log(&gw, "draining connections", 5).await;
    // The listener is closed: no new clients...
    let refused = match TcpStream::connect(gw.addr).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s
                .write_all(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut buf = [0u8; 16];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    };
    assert!(refused, "a new connection was served during the drain");
    // ...but the open tunnel keeps working within the grace period.
    assert_eq!(get_through(&mut open).await, fake.egress.to_string());
    let status = gw.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}\n{}", gw.logs());
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "exited after {took:?}, before the grace ran out"
    );
    assert!(gw.logs().contains("grace period over"), "{}", gw.logs());
    // The tunnel was closed with the process.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_as_soon_as_the_last_tunnel_ends() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let mut gw = Gateway::builder()
        .config("[server]\nshutdown_grace = \"60s\"")
        .upstream(fake.url("http"))
        .start()
        .await;
    let open = tunnel(&gw, &origin, None).await;
    gw.signal("TERM");
    wait_log(&gw, "draining connections", 5).await;
    let closed = Instant::now();
    drop(open);
    let status = gw.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "{:?}",
        closed.elapsed()
    );
    assert!(gw.logs().contains("stats flushed"), "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let mut gw = Gateway::builder()
        .config("[server]\nshutdown_grace = \"60s\"")
        .upstream(fake.url("http"))
        .start()
        .await;
    let _open = tunnel(&gw, &origin, None).await;
    gw.signal("INT");
    wait_log(&gw, "draining connections", 5).await;
    let second = Instant::now();
    gw.signal("TERM");
    let status = gw.wait(Duration::from_secs(10)).await;
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "{:?}",
        second.elapsed()
    );
    assert_eq!(status.code(), Some(128 + 15), "{}", gw.logs());
}
