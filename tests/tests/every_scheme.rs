//! curl through the built gateway, through a fake upstream of every scheme, in every client
//! protocol: the origin must see the request arrive from that upstream, and the upstream must
//! have been handed its credentials.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::Duration;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::raw::raw_exchange;
use proxygate_tests::tls::TestPki;

struct Setup {
    origin: Origin,
    fake: FakeUpstream,
    gateway: Gateway,
    user: &'static str,
    pass: &'static str,
    _ca: tempfile::NamedTempFile,
}

async fn setup(scheme: &str) -> Setup {
    let origin = Origin::start().await;
    let pki = TestPki::new();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    // Special characters prove percent-decoding and Basic/RFC 1929 encoding end to end.
    let (user, pass) = match scheme {
        // SOCKS4 carries a user id only.
        "socks4" | "socks4a" => ("user4", ""),
        // (A Basic user-id cannot contain a colon: RFC 7617.)
        _ => ("us@er+x", "p@ss w:rd%/!"),
    };
    let kind = match scheme {
        "http" => Kind::Http,
        "https" => Kind::Https(pki.acceptor()),
        "socks5" | "socks5h" => Kind::Socks5,
        _ => Kind::Socks4,
    };
    let fake = FakeUpstream::start(kind, Some((user, pass))).await;
    // Absolute form through HTTP upstreams, as they are named here (by default a request
    // through an upstream that wants credentials goes in a tunnel: tests/tests/reuse.rs).
    let gateway = Gateway::builder()
        .config(&format!(
            "[dial]\ntls_ca_file = {:?}\nconnect_timeout = \"2s\"\nhandshake_timeout = \"2s\"\n\
             tunnel_plain_http = \"never\"",
            ca.path()
        ))
        .upstream(fake.url(scheme))
        .start()
        .await;
    Setup {
        origin,
        fake,
        gateway,
        user,
        pass,
        _ca: ca,
    }
}

async fn check_scheme(scheme: &str) {
    let s = setup(scheme).await;
    let port = s.origin.addr.port();
    let gw = s.gateway.addr.to_string();
    let proxy = s.gateway.http_proxy();
    let egress = s.fake.egress.to_string();

    // Absolute-form through the HTTP front end.
    let url = format!("http://127.0.0.1:{port}/abs?q=1");
    let r = curl(&["-x", &proxy, &url]).await;
    assert_eq!(
        r.status,
        200,
        "{scheme} absolute-form: {r:?}\n{}",
        s.gateway.logs()
    );
    assert_eq!(r.header("x-peer"), egress, "{scheme}: not via the upstream");
    assert_eq!(r.header("x-host"), format!("127.0.0.1:{port}"));
    if scheme.starts_with("http") {
        // An HTTP upstream gets the request itself, in absolute form.
        assert_eq!(r.header("x-target"), url);
    } else {
        // A SOCKS upstream carries a tunnel; the request goes in origin form.
        assert_eq!(r.header("x-target"), "/abs?q=1");
        // An absolute URI with an empty path has the origin form `/`, with its query kept
        // (curl writes the `/` itself, so these go raw).
        for (uri, origin_form) in [
            (format!("http://127.0.0.1:{port}"), "/"),
            (format!("http://127.0.0.1:{port}?x=1&y"), "/?x=1&y"),
        ] {
            let req = format!(
                "GET {uri} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            );
            let got = raw_exchange(s.gateway.addr, req.as_bytes(), Duration::from_secs(10)).await;
            assert!(got.starts_with("HTTP/1.1 200"), "{scheme} {uri}: {got}");
            assert!(
                got.to_ascii_lowercase()
                    .contains(&format!("\r\nx-target: {origin_form}\r\n")),
                "{scheme} {uri}: {got}"
            );
        }
    }

    // CONNECT through the HTTP front end.
    let url = format!("http://127.0.0.1:{port}/tunnel");
    let r = curl(&["-p", "-x", &proxy, &url]).await;
    assert_eq!(
        r.status,
        200,
        "{scheme} CONNECT: {r:?}\n{}",
        s.gateway.logs()
    );
    assert_eq!(r.header("x-peer"), egress);
    assert_eq!(r.header("x-target"), "/tunnel");

    // SOCKS5 with a domain (the gateway's client resolves nothing).
    let url = format!("http://localhost:{port}/s5h");
    let r = curl(&["--socks5-hostname", &gw, &url]).await;
    assert_eq!(
        r.status,
        200,
        "{scheme} socks5h: {r:?}\n{}",
        s.gateway.logs()
    );
    assert_eq!(r.header("x-peer"), egress);

    // SOCKS5 with an IPv4 address.
    let url = format!("http://127.0.0.1:{port}/s5");
    let r = curl(&["--socks5", &gw, &url]).await;
    assert_eq!(r.status, 200, "{scheme} socks5: {r:?}");
    assert_eq!(r.header("x-peer"), egress);

    // SOCKS4a with a domain, SOCKS4 with an address.
    let url = format!("http://localhost:{port}/s4a");
    let r = curl(&["--socks4a", &gw, &url]).await;
    assert_eq!(r.status, 200, "{scheme} socks4a: {r:?}");
    assert_eq!(r.header("x-peer"), egress);
    let url = format!("http://127.0.0.1:{port}/s4");
    let r = curl(&["--socks4", &gw, &url]).await;
    assert_eq!(r.status, 200, "{scheme} socks4: {r:?}");
    assert_eq!(r.header("x-peer"), egress);

    // Every handshake presented the upstream's credentials.
    let seen = s.fake.seen();
    let want = Some((s.user.to_owned(), s.pass.to_owned()));
    assert!(!seen.auth.is_empty());
    assert!(
        seen.auth.iter().all(|a| *a == want),
        "{scheme}: credentials presented: {:?}",
        seen.auth
    );

    // How the target was named to the upstream.
    let named = |r: &str| seen.requests.iter().any(|x| x == r);
    match scheme {
        "http" | "https" => {
            assert!(
                named(&format!("GET http://127.0.0.1:{port}/abs?q=1")),
                "{seen:?}"
            );
            assert!(named(&format!("CONNECT 127.0.0.1:{port}")), "{seen:?}");
            assert!(named(&format!("CONNECT localhost:{port}")), "{seen:?}");
        }
        "socks5h" => assert!(
            named(&format!("socks5 domain localhost:{port}")),
            "{seen:?}"
        ),
        // socks5: the gateway resolves names itself and sends an address.
        "socks5" => {
            assert!(
                !seen.requests.iter().any(|r| r.contains("domain")),
                "{seen:?}"
            );
            assert!(named(&format!("socks5 ip 127.0.0.1:{port}")), "{seen:?}");
        }
        "socks4a" => assert!(named(&format!("socks4a localhost:{port}")), "{seen:?}"),
        "socks4" => {
            assert!(!seen.requests.iter().any(|r| r.contains("4a")), "{seen:?}");
            assert!(named(&format!("socks4 127.0.0.1:{port}")), "{seen:?}");
        }
        _ => unreachable!(),
    }
    // The client's own Proxy-Authorization (none here) and the upstream's never reach the
    // origin.
    let r = curl(&[
        "-x",
        &proxy,
        "-U",
        "client:secret",
        &format!("http://127.0.0.1:{port}/"),
    ])
    .await;
    assert!(
        !r.header("x-header-names").contains("proxy-authorization"),
        "{r:?}"
    );
    if scheme == "https" {
        // A TLS upstream's sessions are resumed: one full handshake, then abbreviated ones
        // (a full one costs the gateway a signature check and a key exchange per tunnel).
        let resumed = s.fake.seen().tls_resumed;
        assert!(resumed.len() >= 3, "{resumed:?}");
        assert!(
            !resumed[0],
            "the first handshake is a full one: {resumed:?}"
        );
        assert!(resumed[1..].iter().all(|r| *r), "{resumed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_http_upstream() {
    check_scheme("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_https_upstream() {
    check_scheme("https").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_socks5_upstream() {
    check_scheme("socks5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_socks5h_upstream() {
    check_scheme("socks5h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_socks4_upstream() {
    check_scheme("socks4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_socks4a_upstream() {
    check_scheme("socks4a").await;
}
