//! Bulk transfers through tunnels of the built gateway: curl uploads 16 MiB through an HTTP
//! CONNECT tunnel and through SOCKS5, the origin echoes it back, and every byte must arrive
//! both ways, in order. Spliced (`server.splice`, the default: once a direction's reads fill
//! its buffer, the bytes move through a pipe between the two sockets) and copied.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;

const SIZE: usize = 16 << 20;

/// Printable (curl's helper reads the body as text), and no run repeats at a buffer's or a
/// pipe's period: a chunk lost, doubled or reordered changes it.
fn body() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..SIZE)
        .map(|i| ALPHABET[(i + i / 61 + i / 65_521) % ALPHABET.len()] as char)
        .collect()
}

async fn round_trip(splice: bool) {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let gateway = Gateway::builder()
        .config(&format!("[server]\nsplice = {splice}"))
        .upstream(fake.url("http"))
        .start()
        .await;
    let sent = body();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &sent).unwrap();
    let upload = format!("@{}", file.path().display());
    let url = format!("{}/bulk", origin.url());
    let proxy = gateway.http_proxy();
    let socks = gateway.addr.to_string();
    for (how, client) in [
        ("CONNECT", ["-p", "-x", proxy.as_str()]),
        ("SOCKS5", ["--socks5", socks.as_str(), "-q"]),
    ] {
        let mut args = client.to_vec();
        args.extend(["--data-binary", upload.as_str(), url.as_str()]);
        let r = curl(&args).await;
        assert_eq!(
            r.status,
            200,
            "{how}, splice {splice}: {r:?}\n{}",
            gateway.logs()
        );
        assert_eq!(r.header("x-body-len"), SIZE.to_string(), "{how}: upload");
        assert!(
            r.body.len() == SIZE && r.body == sent,
            "{how}, splice {splice}: the echoed body differs ({} bytes)",
            r.body.len()
        );
    }
}

#[tokio::test]
async fn megabytes_each_way_arrive_whole_spliced() {
    round_trip(true).await;
}

#[tokio::test]
async fn megabytes_each_way_arrive_whole_copied() {
    round_trip(false).await;
}
