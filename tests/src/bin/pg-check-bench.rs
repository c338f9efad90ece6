//! pg-check-bench: how long the checker takes over a large list, on loopback.
//!
//! ```text
//! cargo run --release -p proxygate-tests --bin pg-check-bench -- [--working 5000]
//!     [--refusing 2500] [--blackholed 2500] [--gateway-bin target/release/proxygate]
//!     [--integrity]
//! ```
//!
//! `--integrity` adds the checker's body-integrity step (a static page of the judge, fetched
//! through every working candidate and compared with a direct fetch); without it both
//! integrity steps are off. (The TLS step needs a CONNECT-capable candidate: not here.)
//!
//! It serves a list of `working + refusing + blackholed` candidates from a file: working ones
//! are HTTP proxies of ours (one listener each, forwarding to a local judge), refusing ones
//! are loopback addresses where nothing listens, black-holed ones accept and never answer.
//! Then it times `proxygate sources fetch --import` on a fresh data dir (the checker's
//! defaults: concurrency 256, timeout 2 s) and prints the summary, the wall time and the
//! checker's peak RSS. Needs about `working + 2 x blackholed` file descriptors.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark harness: a broken fixture must stop the run loudly"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proxygate_tests::lists::Judge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Opts {
    working: usize,
    refusing: usize,
    blackholed: usize,
    gateway_bin: Option<PathBuf>,
    integrity: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        working: 5000,
        refusing: 2500,
        blackholed: 2500,
        gateway_bin: None,
        integrity: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--working" => o.working = val().parse().unwrap(),
            "--refusing" => o.refusing = val().parse().unwrap(),
            "--blackholed" => o.blackholed = val().parse().unwrap(),
            "--gateway-bin" => o.gateway_bin = Some(PathBuf::from(val())),
            "--integrity" => o.integrity = true,
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// A minimal forwarding HTTP proxy: reads a request head, connects to `judge`, forwards it.
async fn proxy(mut client: TcpStream, judge: SocketAddr) {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        let Ok(n) = client.read(&mut buf[len..]).await else {
            return;
        };
        if n == 0 {
            return;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
            break;
        }
    }
    let Ok(mut up) = TcpStream::connect(judge).await else {
        return;
    };
    if up.write_all(&buf[..len]).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
}

fn main() {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(o));
}

async fn run(o: Opts) {
    let bin = o.gateway_bin.clone().unwrap_or_else(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args([
                "build",
                "--release",
                "-p",
                "proxygate",
                "--bin",
                "proxygate",
            ])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(status.success());
        root.join("target/release/proxygate")
    });
    let judge = Judge::start().await;
    let mut list = String::new();
    for _ in 0..o.working {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        list.push_str(&format!("{}\n", l.local_addr().unwrap()));
        let judge = judge.addr;
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(proxy(s, judge));
            }
        });
    }
    let mut holes = Vec::new();
    for _ in 0..o.blackholed {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        list.push_str(&format!("{}\n", l.local_addr().unwrap()));
        holes.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        }));
    }
    for i in 0..o.refusing {
        // Nothing listens on port 9 of these loopback addresses: refused at once.
        list.push_str(&format!("127.3.{}.{}:9\n", i / 250, 1 + i % 250));
    }
    let dir = tempfile::tempdir().unwrap();
    let list_path = dir.path().join("candidates.txt");
    std::fs::write(&list_path, list).unwrap();
    let cfg = dir.path().join("proxygate.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nallow_private_networks = true\n[[sources]]\nname = \"bench\"\nkind = \"generic\"\nurl = {:?}\n[checker]\njudge_urls = [{:?}]\ntls_judge_url = \"\"\nintegrity_url = {:?}\n",
            dir.path().join("data").to_str().unwrap(),
            list_path.to_str().unwrap(),
            judge.httpbin_url(),
            if o.integrity {
                judge.static_url()
            } else {
                String::new()
            }
        ),
    )
    .unwrap();
    let total = o.working + o.refusing + o.blackholed;
    eprintln!(
        "pg-check-bench: {total} candidates ({} working, {} refusing, {} black-holed)",
        o.working, o.refusing, o.blackholed
    );
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .args(["sources", "fetch", "--import", "--json", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        // PG_CHECK_BENCH_LOG=1 shows the gateway's log (RUST_LOG applies).
        .stderr(if std::env::var_os("PG_CHECK_BENCH_LOG").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut peak_kb = 0u64;
    let mut stdout = child.stdout.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut s = String::new();
        stdout.read_to_string(&mut s).await.unwrap();
        s
    });
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = t0.elapsed();
    let out = reader.await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let s = &v["sources"][0];
    println!(
        "| candidates | checked | passed | imported | wall time | checks/s | peak RSS |\n|---|---|---|---|---|---|---|\n| {total} | {} | {} | {} | {:.1} s | {:.0} | {:.1} MiB |",
        s["checked"],
        s["checked_ok"],
        s["imported"],
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        peak_kb as f64 / 1024.0
    );
    for h in holes {
        h.abort();
    }
}
