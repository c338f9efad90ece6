//! Chromium (headless) through the gateway, as people who automate a browser point it: an
//! HTTP proxy (`--proxy-server=http://...`: absolute-form for `http://` pages, CONNECT for
//! `https://`), a SOCKS5 proxy and a SOCKS4 proxy. The origin's page asks the origin three more
//! times from its script (two GETs and a POST with a body) and writes which address each answer
//! came from into the page; the test reads the page back from Chromium's `--dump-dom`.
//!
//! `tests/run.sh` installs `chromium-headless-shell` (Debian) when no Chromium is on PATH;
//! `CHROMIUM` names another binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::Duration;

use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::tls::TestPki;

/// Loads `url` in a fresh headless Chromium whose every request goes to `proxy` (loopback
/// included: Chromium bypasses proxies for loopback unless told `<-loopback>`), trusting the
/// HTTPS origin by its key alone. Returns the page as Chromium saw it once loaded.
async fn chromium(proxy: &str, url: &str, pki: &TestPki) -> String {
    let profile = tempfile::tempdir().unwrap();
    let args = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        format!("--user-data-dir={}", profile.path().display()),
        format!("--proxy-server={proxy}"),
        "--proxy-bypass-list=<-loopback>".to_owned(),
        format!(
            "--ignore-certificate-errors-spki-list={}",
            pki.server_spki_sha256
        ),
        "--dump-dom".to_owned(),
        url.to_owned(),
    ];
    let candidates = match std::env::var("CHROMIUM") {
        Ok(bin) => vec![bin],
        Err(_) => vec!["chromium-headless-shell".to_owned(), "chromium".to_owned()],
    };
    for bin in &candidates {
        let child = tokio::process::Command::new(bin)
            .args(&args)
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(Duration::from_secs(60), child).await {
            Err(_) => panic!("{bin} did not finish loading {url} within 60 s"),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Ok(Err(e)) => panic!("{bin}: {e}"),
            Ok(Ok(out)) => out,
        };
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{bin} loading {url} through {proxy}: {}\n{dom}\n{stderr}",
            out.status
        );
        return dom;
    }
    panic!("no Chromium found (tried {candidates:?}; tests/run.sh installs one)")
}

/// The lines the page's script wrote: its protocol, then `METHOD STATUS x-peer x-target
/// x-body-len` per request it made.
fn seen_by_page(dom: &str) -> Vec<String> {
    let start = dom
        .find("page ")
        .unwrap_or_else(|| panic!("the page's script did not run:\n{dom}"));
    let end = dom[start..]
        .find("\nend")
        .unwrap_or_else(|| panic!("the page's script did not finish:\n{dom}"));
    dom[start..start + end].lines().map(str::to_owned).collect()
}

fn expected(protocol: &str, egress: &str) -> Vec<String> {
    vec![
        format!("page {protocol}"),
        format!("GET 200 {egress} /asked?n=1 0"),
        format!("GET 200 {egress} /asked?n=2 0"),
        // "from the browser": 16 bytes.
        format!("POST 200 {egress} /asked?n=3 16"),
    ]
}

/// The two origins Chromium loads the page from: plain HTTP, and HTTPS with a certificate
/// pinned by its key.
struct Pages {
    pki: TestPki,
    plain: Origin,
    tls: Origin,
}

impl Pages {
    async fn start() -> Pages {
        let pki = TestPki::new();
        let plain = Origin::start().await;
        let tls = Origin::start_on("127.0.0.1:0".parse().unwrap(), Some(pki.acceptor())).await;
        Pages { pki, plain, tls }
    }

    /// Loads the page over HTTP, then over HTTPS, through `proxy`: every request of each page
    /// reached the origin through `fake` (its egress address), and `fake` carried nothing but
    /// them (no background fetch of Chromium's left this hermetic test).
    async fn load_through(&self, proxy: &str, gw: &Gateway, fake: &FakeUpstream) {
        let egress = fake.egress.to_string();
        let plain = format!("{}/browser-page", self.plain.url());
        let tls = format!("https://localhost:{}/browser-page", self.tls.addr.port());
        for (url, protocol) in [(plain, "http:"), (tls, "https:")] {
            let dom = chromium(proxy, &url, &self.pki).await;
            assert_eq!(
                seen_by_page(&dom),
                expected(protocol, &egress),
                "{}",
                gw.logs()
            );
        }
        let ports = [self.plain.addr.port(), self.tls.addr.port()];
        let seen = fake.seen().requests;
        assert!(!seen.is_empty());
        for r in &seen {
            assert!(
                ports.iter().any(|p| r.contains(&format!(":{p}"))),
                "the upstream carried a request to somewhere else: {r} (all: {seen:?})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_through_an_http_proxy_over_an_upstream_with_credentials() {
    let pages = Pages::start().await;
    let fake = FakeUpstream::start(Kind::Http, Some(("chrome", "s3cret"))).await;
    let gw = Gateway::builder().upstream(fake.url("http")).start().await;
    pages
        .load_through(&format!("http://{}", gw.addr), &gw, &fake)
        .await;
    // Every handshake with the upstream presented the operator's credentials, none the
    // browser's (it sent none).
    let auth = fake.seen().auth;
    assert!(
        auth.iter()
            .all(|a| a == &Some(("chrome".to_owned(), "s3cret".to_owned()))),
        "{auth:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_through_a_socks5_proxy() {
    let pages = Pages::start().await;
    let fake = FakeUpstream::start(Kind::Socks5, Some(("chrome", "s3cret"))).await;
    let gw = Gateway::builder()
        .upstream(fake.url("socks5h"))
        .start()
        .await;
    pages
        .load_through(&format!("socks5://{}", gw.addr), &gw, &fake)
        .await;
    // Chromium sends SOCKS5 targets as names (an address literal too), resolved remotely:
    // the gateway passes the name on to a `socks5h` upstream.
    let seen = fake.seen().requests;
    assert!(
        seen.iter()
            .any(|r| r.starts_with("socks5 domain localhost:")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_through_a_socks4_proxy() {
    let pages = Pages::start().await;
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let gw = Gateway::builder().upstream(fake.url("http")).start().await;
    // SOCKS4 carries no names: Chromium resolves `localhost` itself and sends the address.
    pages
        .load_through(&format!("socks4://{}", gw.addr), &gw, &fake)
        .await;
}
