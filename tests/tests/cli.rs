//! The command-line contract: `check-config` (exit 64 with every error), `run` refusing bad
//! config and open binds, upstream files, embedded defaults, and a clean exit on SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::Duration;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::{Gateway, binary, cli, cli_env};
use proxygate_tests::origin::Origin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
colour = "blue"
[server]
listen = ["0.0.0.0:8080"]
[dial]
connect_timeout = "soon"
max_attempts = 0
[pool]
strategy = "psychic"
[upstreams]
urls = ["http://ok:1", "gopher://u:hunter2@h:70"]
"#,
    )
    .unwrap();
    let out = cli(&["check-config", bad.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    for want in [
        "colour: unknown key",
        "dial.connect_timeout:",
        "pool.strategy: unknown variant `psychic`",
        "server.listen: 0.0.0.0:8080 is not a loopback address",
        "upstreams.urls[1]: unknown scheme \"gopher\"",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&file) && l.contains(want)),
            "missing {want:?} in:\n{err}"
        );
    }
    assert!(!err.contains("hunter2"), "a password leaked: {err}");

    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/default.toml");
    let out = cli(&["check-config", default]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = cli(&["check-config", "/nonexistent/proxygate.toml"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_open_proxy_and_bad_upstreams() {
    let out = cli(&["run", "--listen", "0.0.0.0:0"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("open proxy"));

    let out = cli(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "socks9://h:1",
    ])
    .await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));

    let out = cli(&["run", "--listen", "127.0.0.1:0", "--strategy", "psychic"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("weighted_random"));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--strategy"));

    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("upstreams.txt");
    std::fs::write(&list, "# mine\nhttp://a:1\n\nnot-a-url\n").unwrap();
    let out = cli(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstreams-file",
        list.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4: missing scheme", list.display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_file_and_embedded_defaults() {
    let origin = Origin::start().await;
    let a = FakeUpstream::start(Kind::Http, Some(("a", "p#1"))).await;
    let b = FakeUpstream::start(Kind::Socks5, None).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("upstreams.txt");
    std::fs::write(
        &list,
        format!(
            "# operator list\n{}\n\n   {}   \n",
            a.url("http"),
            b.url("socks5h")
        ),
    )
    .unwrap();
    // No --config: the embedded defaults (but round robin, to see both upstreams for sure).
    let mut child = tokio::process::Command::new(binary())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--no-sources",
            // The origin is on loopback: a lab's setting.
            "--allow-private-networks",
            "--strategy",
            "round_robin",
        ])
        .arg("--upstreams-file")
        .arg(&list)
        // The default data dir is ./data: keep it in the temp dir.
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("gateway exited");
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
    })
    .await
    .unwrap();
    let mut peers = Vec::new();
    for _ in 0..4 {
        let r = curl(&["-x", &format!("http://{addr}"), &origin.url()]).await;
        assert_eq!(r.status, 200);
        peers.push(r.header("x-peer").to_owned());
    }
    // Round robin over both upstreams of the file.
    assert!(peers.contains(&a.egress.to_string()), "{peers:?}");
    assert!(peers.contains(&b.egress.to_string()), "{peers:?}");
    // The embedded default data dir, with its generated key, owner-only.
    let key = dir.path().join("data").join("encryption.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let mut gw = Gateway::builder()
        .config("[server]\nshutdown_grace = \"1s\"")
        .upstream(fake.url("http"))
        .start()
        .await;
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
    // An idle tunnel stays open across the signal; the grace period bounds the wait.
    let mut tunnel = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tunnel,
        format!("CONNECT {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.addr).as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut tunnel, &mut buf)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let status = gw.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", gw.logs());
    assert!(!gw.is_running());
}

/// mimalloc is the process's allocator (it gives memory back after a burst of tunnels; glibc's
/// malloc kept 128 of 138 MiB). It is linked as `malloc` itself, by a `use mimalloc as _` that
/// looks removable: if it went, nothing would fail but memory and speed. mimalloc's own
/// statistics at exit show it served the process's allocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_allocates_with_mimalloc() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/default.toml");
    let out = cli_env(&["check-config", default], &[("MIMALLOC_SHOW_STATS", "1")]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    // "  pages     :    28          32           1" (peak, total, current)
    let pages = err
        .lines()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix("pages")?
                .trim_start()
                .strip_prefix(':')
        })
        .and_then(|l| l.split_whitespace().next())
        .and_then(|peak| peak.parse::<u64>().ok());
    assert!(
        pages.is_some_and(|p| p > 0),
        "no mimalloc statistics (pages in use) at exit:\n{err}"
    );
}
