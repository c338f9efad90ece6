//! Real third-party upstreams from Debian: tinyproxy (HTTP, Basic auth) and microsocks
//! (SOCKS5, username/password), with curl as the client. Each is also tried without
//! credentials to prove the credentials are what let the request through.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use proxygate_tests::curl::curl;
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::third_party::ThirdParty;

async fn all_client_protocols(gw: &Gateway, origin: &Origin) {
    let url = format!("{}/third-party?x=1", origin.url());
    let r = curl(&["-x", &gw.http_proxy(), &url]).await;
    assert_eq!(r.status, 200, "absolute-form: {r:?}\n{}", gw.logs());
    assert_eq!(r.header("x-target"), "/third-party?x=1");
    let r = curl(&["-p", "-x", &gw.http_proxy(), &url]).await;
    assert_eq!(r.status, 200, "CONNECT: {r:?}\n{}", gw.logs());
    let local = format!("http://localhost:{}/s", origin.addr.port());
    let r = curl(&["--socks5-hostname", &gw.addr.to_string(), &local]).await;
    assert_eq!(r.status, 200, "socks5h: {r:?}\n{}", gw.logs());
    let r = curl(&["--socks4a", &gw.addr.to_string(), &local]).await;
    assert_eq!(r.status, 200, "socks4a: {r:?}\n{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_as_http_upstream() {
    let origin = Origin::start().await;
    let tp = ThirdParty::tinyproxy("tiny", "pr0xy").await;
    let gw = Gateway::builder()
        .upstream(format!("http://tiny:pr0xy@{}", tp.addr))
        .start()
        .await;
    all_client_protocols(&gw, &origin).await;

    let wrong = Gateway::builder()
        .upstream(format!("http://tiny:nope@{}", tp.addr))
        .start()
        .await;
    let r = curl(&["-p", "-x", &wrong.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.header("proxy-status").contains("upstream_auth"), "{r:?}");
    // A plain-HTTP request through an upstream that wants credentials goes in a tunnel
    // (`dial.tunnel_plain_http = "auto"`): the bad password is the upstream's fault, said so.
    let r = curl(&["-x", &wrong.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.header("proxy-status").contains("upstream_auth"), "{r:?}");
    // In absolute form tinyproxy answers a bad password with 401 (not 407), which an origin
    // could have said too: it is passed through as the upstream's answer.
    let absolute = Gateway::builder()
        .config("[dial]\ntunnel_plain_http = \"never\"\nconnect_timeout = \"1s\"\nhandshake_timeout = \"1s\"")
        .upstream(format!("http://tiny:nope@{}", tp.addr))
        .start()
        .await;
    let r = curl(&["-x", &absolute.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("server").starts_with("tinyproxy"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsocks_as_socks5_upstream() {
    let origin = Origin::start().await;
    let ms = ThirdParty::microsocks("micro", "s0cks").await;
    for scheme in ["socks5", "socks5h"] {
        let gw = Gateway::builder()
            .upstream(format!("{scheme}://micro:s0cks@{}", ms.addr))
            .start()
            .await;
        all_client_protocols(&gw, &origin).await;
    }
    let wrong = Gateway::builder()
        .upstream(format!("socks5://micro:nope@{}", ms.addr))
        .start()
        .await;
    let r = curl(&["-p", "-x", &wrong.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.header("proxy-status").contains("upstream_auth"), "{r:?}");
}
