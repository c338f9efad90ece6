//! pg-load: the load harness. Measures the gateway against the same load sent straight to its
//! upstream, side by side in one run, and prints the ratios.
//!
//! ```text
//! cargo run --release -p proxygate-tests --bin pg-load -- [--requests 1000] [--concurrency 50]
//!     [--upstream fake|tinyproxy] [--gateway-bin target/release/proxygate]
//! ```
//!
//! Scenarios, each run directly against the upstream proxy and then through the gateway (which
//! uses that upstream), with the same client code:
//! - `connect`: N tunnels: TCP connect, `CONNECT`, one GET through the tunnel, close.
//! - `keepalive`: N absolute-form GETs over `concurrency` kept-alive connections.
//!
//! Everything runs on loopback: an in-process origin, the upstream (an in-process fake HTTP
//! proxy on its own runtime, or tinyproxy), and the release gateway as a child process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark harness: a broken fixture must stop the run loudly"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::origin::Origin;
use proxygate_tests::third_party::ThirdParty;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Opts {
    requests: usize,
    concurrency: usize,
    upstream: String,
    gateway_bin: Option<PathBuf>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        requests: 1000,
        concurrency: 50,
        upstream: "fake".into(),
        gateway_bin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--requests" => o.requests = val().parse().unwrap(),
            "--concurrency" => o.concurrency = val().parse().unwrap(),
            "--upstream" => o.upstream = val(),
            "--gateway-bin" => o.gateway_bin = Some(PathBuf::from(val())),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

#[derive(Clone, Copy)]
enum Scenario {
    Connect,
    KeepAlive,
}

struct Result_ {
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: usize,
}

impl Result_ {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

/// Reads one response (head + Content-Length body); returns the status.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<u16> {
    let mut line = String::new();
    r.read_line(&mut line).await.ok()?;
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.ok()?;
    Some(status)
}

async fn one_tunnel(proxy: SocketAddr, origin: SocketAddr) -> bool {
    let Ok(s) = TcpStream::connect(proxy).await else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let mut s = BufReader::new(s);
    let req = format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    if s.get_mut().write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    // The CONNECT answer has no body.
    let mut line = String::new();
    if s.read_line(&mut line).await.is_err() || !line.contains(" 200") {
        return false;
    }
    loop {
        line.clear();
        match s.read_line(&mut line).await {
            Ok(0) | Err(_) => return false,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let get = format!("GET /t HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n");
    if s.get_mut().write_all(get.as_bytes()).await.is_err() {
        return false;
    }
    read_response(&mut s).await == Some(200)
}

async fn run(scenario: Scenario, proxy: SocketAddr, origin: SocketAddr, o: &Opts) -> Result_ {
    let per_worker = o.requests / o.concurrency;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_worker);
            let mut errors = 0;
            match scenario {
                Scenario::Connect => {
                    for _ in 0..per_worker {
                        let t = Instant::now();
                        if one_tunnel(proxy, origin).await {
                            lat.push(t.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                }
                Scenario::KeepAlive => {
                    let s = TcpStream::connect(proxy).await.unwrap();
                    let _ = s.set_nodelay(true);
                    let mut s = BufReader::new(s);
                    let req = format!("GET http://{origin}/k HTTP/1.1\r\nHost: {origin}\r\n\r\n");
                    for _ in 0..per_worker {
                        let t = Instant::now();
                        let ok = s.get_mut().write_all(req.as_bytes()).await.is_ok()
                            && read_response(&mut s).await == Some(200);
                        if ok {
                            lat.push(t.elapsed());
                        } else {
                            errors += 1;
                            break;
                        }
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Result_ {
        elapsed,
        latencies,
        errors,
    }
}

async fn start_gateway(
    bin: &PathBuf,
    upstream: SocketAddr,
    data_dir: &std::path::Path,
) -> (tokio::process::Child, SocketAddr) {
    let mut child = tokio::process::Command::new(bin)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--upstream")
        .arg(format!("http://{upstream}"))
        .env("RUST_LOG", "warn,proxygate::app=info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next_line().await.unwrap().expect("gateway exited");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

fn main() {
    let o = parse_opts();
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
    // The fake upstream gets a runtime of its own, as a separate process would.
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (origin, _fake, _tp, upstream) = upstream_rt.block_on(async {
        let origin = Origin::start().await;
        if o.upstream == "tinyproxy" {
            let tp = ThirdParty::tinyproxy_open().await;
            let addr = tp.addr;
            (origin, None, Some(tp), addr)
        } else {
            let fake = FakeUpstream::start(Kind::Http, None).await;
            let addr = fake.addr;
            (origin, Some(fake), None, addr)
        }
    });
    let origin_addr = origin.addr;
    let o = Arc::new(o);
    client_rt.block_on(async {
        let data_dir = tempfile::tempdir().unwrap();
        let (_gw, gateway) = start_gateway(&bin, upstream, data_dir.path()).await;
        println!(
            "pg-load: {} requests, concurrency {}, upstream {} ({}), {} cores",
            o.requests,
            o.concurrency,
            o.upstream,
            upstream,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<10} {:<8} {:>9} {:>9} {:>9} {:>9} {:>6}",
            "scenario", "via", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"
        );
        for (name, scenario) in [("connect", Scenario::Connect), ("keepalive", Scenario::KeepAlive)] {
            // Warm up both paths, then measure direct and through the gateway back to back.
            let _ = run(scenario, upstream, origin_addr, &Opts { requests: 100, concurrency: 10, ..clone(&o) }).await;
            let _ = run(scenario, gateway, origin_addr, &Opts { requests: 100, concurrency: 10, ..clone(&o) }).await;
            let direct = run(scenario, upstream, origin_addr, &o).await;
            let through = run(scenario, gateway, origin_addr, &o).await;
            for (via, r) in [("direct", &direct), ("gateway", &through)] {
                println!(
                    "{name:<10} {via:<8} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>6}",
                    r.rps(),
                    ms(r.pct(0.5)),
                    ms(r.pct(0.9)),
                    ms(r.pct(0.99)),
                    r.errors
                );
            }
            println!(
                "{name:<10} ratio    throughput gateway/direct = {:.2}, p50 latency gateway/direct = {:.2}",
                through.rps() / direct.rps(),
                ms(through.pct(0.5)) / ms(direct.pct(0.5)).max(1e-9)
            );
        }
    });
    drop(origin);
}

fn clone(o: &Opts) -> Opts {
    Opts {
        requests: o.requests,
        concurrency: o.concurrency,
        upstream: o.upstream.clone(),
        gateway_bin: o.gateway_bin.clone(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
