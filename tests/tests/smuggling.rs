//! Exactly one well-formed request reaches the upstream, whatever arrives. A scripted client
//! sends raw bytes to the gateway; a recording upstream keeps the exact bytes it got and parses
//! them strictly. Each case asserts what reached the upstream and what the client got.
//!
//! Families (the mutations of defparam/smuggler and the differential cases of HTTP Garden):
//! Content-Length / Transfer-Encoding conflicts (CL.TE, TE.CL, TE.TE), obfuscated
//! Transfer-Encoding (whitespace, case, quoting, lists, vertical tab, underscores, folding),
//! duplicate, signed, hex and oversized Content-Length, obs-fold, bare CR and LF, NUL, Host
//! conflicts and duplicates, userinfo, Expect, pipelining after a body, HTTP/1.0 keep-alive
//! and chunked, chunk-size oddities, versions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::time::Duration;

use proxygate_tests::gateway::Gateway;
use proxygate_tests::raw::{RecordingUpstream, raw_exchange};

/// What a case must lead to.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// A 4xx for the client; nothing reaches the upstream.
    Refused,
    /// This many well-formed requests reach the upstream, and the client gets as many `200`s.
    Forwarded(usize),
    /// Either of the above (RFC latitude), but never anything else.
    Either(usize),
    /// The first request is forwarded and answered `200`; what follows its body is a second,
    /// separate request that the gateway refuses (a 4xx) without forwarding it.
    ThenRefused,
    /// Both `Content-Length` and `Transfer-Encoding`: RFC 9112 §6.1 lets a server reject it or
    /// read the body by `Transfer-Encoding` alone and then close. hyper does the latter, so one
    /// request reaches the upstream framed by chunked alone (the smuggled tail goes nowhere)
    /// and the client's connection closes after the answer.
    Reframed,
}

const T: &str = "http://origin.example/path";

fn cases() -> Vec<(&'static str, String, Want)> {
    let get = |extra: &str| format!("GET {T} HTTP/1.1\r\nHost: origin.example\r\n{extra}\r\n");
    let post = |headers: &str, body: &str| {
        format!("POST {T} HTTP/1.1\r\nHost: origin.example\r\n{headers}\r\n{body}")
    };
    use Want::*;
    vec![
        ("plain GET", get(""), Forwarded(1)),
        (
            "POST with Content-Length",
            post("Content-Length: 5\r\n", "hello"),
            Forwarded(1),
        ),
        (
            "POST chunked",
            post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            Forwarded(1),
        ),
        // CL / TE conflicts.
        (
            "CL.TE",
            post(
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\nG",
            ),
            Reframed,
        ),
        (
            "TE.CL",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                "14\r\nGPOST / HTTP/1.1\r\n\r\n\r\n0\r\n\r\n",
            ),
            Reframed,
        ),
        (
            "TE chunked + CL 0 smuggling a request",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
                "0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
            Reframed,
        ),
        // Obfuscated Transfer-Encoding.
        (
            "TE xchunked",
            post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE space before colon",
            post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE tab value",
            post("Transfer-Encoding:\tchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            Either(1),
        ),
        (
            "TE chunked, identity",
            post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE identity, chunked",
            post("Transfer-Encoding: identity, chunked\r\n", "0\r\n\r\n"),
            Either(1),
        ),
        (
            "TE twice",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n",
                "0\r\n\r\n",
            ),
            Refused,
        ),
        (
            "TE leading space (folded first header)",
            format!(
                "POST {T} HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: origin.example\r\n\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        (
            "TE name, newline, colon",
            post("Transfer-Encoding\n : chunked\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE quoted",
            post("Transfer-Encoding: \"chunked\"\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE chunk (truncated)",
            post("Transfer-Encoding: chunk\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE vertical tab",
            post("Transfer-Encoding:\x0bchunked\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "TE upper case",
            post("Transfer-Encoding: CHUNKED\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            Forwarded(1),
        ),
        (
            "Transfer_Encoding with CL",
            post(
                "Content-Length: 5\r\nTransfer_Encoding: chunked\r\n",
                "hello",
            ),
            Refused,
        ),
        (
            "Content_Length with TE",
            post(
                "Transfer-Encoding: chunked\r\nContent_Length: 3\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            Refused,
        ),
        // Content-Length oddities.
        (
            "CL twice, same",
            post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
            Either(1),
        ),
        (
            "CL twice, different",
            post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
            Refused,
        ),
        (
            "CL list",
            post("Content-Length: 5, 5\r\n", "hello"),
            Refused,
        ),
        (
            "CL signed +",
            post("Content-Length: +5\r\n", "hello"),
            Refused,
        ),
        (
            "CL negative",
            post("Content-Length: -1\r\n", "hello"),
            Refused,
        ),
        ("CL hex", post("Content-Length: 0x5\r\n", "hello"), Refused),
        (
            "CL oversized",
            post("Content-Length: 99999999999999999999\r\n", "hello"),
            Refused,
        ),
        (
            "CL with OWS",
            post("Content-Length:  5 \r\n", "hello"),
            Forwarded(1),
        ),
        // Line structure and bytes.
        ("obs-fold", get("X-A: a\r\n b\r\n"), Refused),
        (
            "bare LF line ends",
            format!("GET {T} HTTP/1.1\nHost: origin.example\n\n"),
            Either(1),
        ),
        ("bare CR in a value", get("X-A: a\rb\r\n"), Refused),
        ("NUL in a value", get("X-A: a\0b\r\n"), Refused),
        ("NUL in a name", get("X-\0A: b\r\n"), Refused),
        ("space in a name", get("X A: b\r\n"), Refused),
        // Host.
        (
            "Host disagrees with the URI",
            format!("GET {T} HTTP/1.1\r\nHost: evil.example\r\n\r\n"),
            Forwarded(1),
        ),
        (
            "Host twice",
            format!("GET {T} HTTP/1.1\r\nHost: origin.example\r\nHost: evil.example\r\n\r\n"),
            Refused,
        ),
        (
            "userinfo in the URI",
            "GET http://user:pw@origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n".into(),
            Refused,
        ),
        (
            "origin form",
            "GET /admin HTTP/1.1\r\nHost: origin.example\r\n\r\n".into(),
            Refused,
        ),
        // Expect.
        (
            "Expect 100-continue",
            post("Expect: 100-continue\r\nContent-Length: 5\r\n", "hello"),
            Forwarded(1),
        ),
        (
            "Expect unknown",
            post("Expect: something-else\r\nContent-Length: 5\r\n", "hello"),
            Either(1),
        ),
        // Pipelining.
        (
            "pipelined after a body",
            format!("{}{}", post("Content-Length: 5\r\n", "hello"), get("")),
            Forwarded(2),
        ),
        (
            "pipelined after a chunked body",
            format!(
                "{}{}",
                post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
                get("")
            ),
            Forwarded(2),
        ),
        (
            "smuggled origin-form after a chunked body",
            post(
                "Transfer-Encoding: chunked\r\n",
                "0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
            ThenRefused,
        ),
        // HTTP/1.0.
        (
            "HTTP/1.0",
            format!("GET {T} HTTP/1.0\r\n\r\n"),
            Forwarded(1),
        ),
        (
            "HTTP/1.0 keep-alive",
            format!("GET {T} HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET {T} HTTP/1.0\r\n\r\n"),
            Forwarded(2),
        ),
        (
            "HTTP/1.0 chunked",
            format!(
                "POST {T} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        // Chunk sizes.
        (
            "chunk size hex prefix",
            post(
                "Transfer-Encoding: chunked\r\n",
                "0x5\r\nhello\r\n0\r\n\r\n",
            ),
            Refused,
        ),
        (
            "chunk size negative",
            post("Transfer-Encoding: chunked\r\n", "-5\r\nhello\r\n0\r\n\r\n"),
            Refused,
        ),
        (
            "chunk size overflow",
            post(
                "Transfer-Encoding: chunked\r\n",
                "fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
            ),
            Refused,
        ),
        (
            "chunk extension",
            post(
                "Transfer-Encoding: chunked\r\n",
                "5;ext=1\r\nhello\r\n0\r\n\r\n",
            ),
            Forwarded(1),
        ),
        // Versions.
        (
            "HTTP/2.0 in an h1 request line",
            format!("GET {T} HTTP/2.0\r\nHost: origin.example\r\n\r\n"),
            Refused,
        ),
        (
            "HTTP/1.2",
            format!("GET {T} HTTP/1.2\r\nHost: origin.example\r\n\r\n"),
            Either(1),
        ),
        (
            "garbage version",
            format!("GET {T} HTTX/1.1\r\nHost: origin.example\r\n\r\n"),
            Refused,
        ),
    ]
}

/// The final status codes of every response in `got`, in order (interim `100`s left out).
fn statuses(got: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = got;
    while let Some(i) = rest.find("HTTP/1.") {
        let after = &rest[i + "HTTP/1.".len()..];
        // "HTTP/1.x NNN"
        if let Some(code) = after.get(2..5)
            && after.as_bytes().get(1) == Some(&b' ')
            && code.bytes().all(|b| b.is_ascii_digit())
            && code != "100"
        {
            out.push(code);
        }
        rest = after;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_well_formed_request_reaches_the_upstream() {
    let up = RecordingUpstream::start().await;
    let gw = Gateway::builder().strict().upstream(up.url()).start().await;
    let mut failures = Vec::new();
    for (name, bytes, want) in cases() {
        let before = up.log();
        let got = raw_exchange(gw.addr, bytes.as_bytes(), Duration::from_millis(1500)).await;
        // The upstream may still be reading: let it settle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = up.log();
        let new: Vec<_> = after.requests[before.requests.len()..].to_vec();
        let broken: Vec<_> = after.unparsable[before.unparsable.len()..].to_vec();
        let statuses = statuses(&got);
        let refused = new.is_empty() && statuses.first().is_some_and(|s| s.starts_with('4'));
        let forwarded = |n: usize| {
            new.len() == n && statuses.len() == n && statuses.iter().all(|s| *s == "200")
        };
        let ok = broken.is_empty()
            && match want {
                Want::Refused => refused,
                Want::Forwarded(n) => forwarded(n),
                Want::Either(n) => refused || forwarded(n),
                Want::Reframed => {
                    forwarded(1)
                        && new[0].all("content-length").is_empty()
                        && got.to_ascii_lowercase().contains("connection: close")
                }
                Want::ThenRefused => {
                    new.len() == 1
                        && statuses.len() == 2
                        && statuses[0] == "200"
                        && statuses[1].starts_with('4')
                }
            };
        // Whatever reached the upstream is one request with one framing and the URI's host.
        let well_formed = new.iter().all(|r| {
            let cl = r.all("content-length");
            let te = r.all("transfer-encoding");
            r.all("host") == ["origin.example"]
                && cl.len() + te.len() <= 1
                && te.iter().all(|t| t.eq_ignore_ascii_case("chunked"))
                && r.all("expect").is_empty()
                && r.target.starts_with("http://origin.example/")
        });
        if !ok || !well_formed {
            failures.push(format!(
                "{name}: want {want:?}; client got statuses {statuses:?}; upstream got {} requests {new:?}; unparsable {broken:?}\n  client saw: {:?}",
                new.len(),
                got.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_exact_and_expect_is_answered_here() {
    let up = RecordingUpstream::start().await;
    let gw = Gateway::builder().strict().upstream(up.url()).start().await;
    let got = raw_exchange(
        gw.addr,
        format!("POST {T} HTTP/1.1\r\nHost: origin.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_bytes(),
        Duration::from_millis(1500),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let log = up.log();
    assert_eq!(log.requests.last().unwrap().body, b"hello world");
    // Expect: the gateway answers 100 Continue itself; the upstream gets the body, no Expect.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("POST {T} HTTP/1.1\r\nHost: origin.example\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"hello").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let r = up.log().requests.last().unwrap().clone();
    assert_eq!(r.body, b"hello");
    assert!(r.all("expect").is_empty(), "{r:?}");
}

/// A connection whose first request is CONNECT is parsed outside hyper (no request object is
/// built for a tunnel): the same rules hold there, with header names in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connect_is_held_to_the_same_rules() {
    let up = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    proxygate_tests::gateway::users_file(&users, &[("alice", "pw")]).await;
    let gw = Gateway::builder()
        .strict()
        .config(&format!(
            "[auth]\nusers_file = {:?}",
            users.display().to_string()
        ))
        .upstream(up.url())
        .start()
        .await;
    // alice:pw
    let auth = "Basic YWxpY2U6cHc=";
    let connect = |target: &str, fields: &str| {
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{fields}\r\n")
    };
    // With alice's credentials, then `fields`.
    let authed = |target: &str, fields: &str| {
        connect(target, &format!("Proxy-Authorization: {auth}\r\n{fields}"))
    };
    let fields = |n: usize| -> String { (0..n).map(|i| format!("X-F{i}: v\r\n")).collect() };
    let a = "a.example:443";
    let cases = [
        (
            "lower-case credentials",
            connect(a, &format!("proxy-authorization: {auth}\r\n")),
            "200",
        ),
        (
            "upper-case credentials",
            connect(a, &format!("PROXY-AUTHORIZATION: {auth}\r\n")),
            "200",
        ),
        (
            "Content-Length: 0",
            authed(a, "content-length: 0\r\n"),
            "200",
        ),
        ("no credentials", connect(a, ""), "407"),
        (
            "a body",
            authed(a, "Content-Length: 5\r\n") + "hello",
            "400",
        ),
        (
            "chunked",
            authed(a, "transfer-encoding: chunked\r\n") + "0\r\n\r\n",
            "400",
        ),
        (
            "two Hosts, cases differ",
            authed(a, "HOST: b.example:443\r\n"),
            "400",
        ),
        (
            "a Transfer_Encoding lookalike",
            authed(a, "Transfer_Encoding: chunked\r\n"),
            "400",
        ),
        (
            "CL and TE",
            authed(a, "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"),
            "400",
        ),
        // More fields than the parser's first try has room for (24), within the limit (100).
        (
            "credentials after 30 other fields",
            connect(a, &format!("{}Proxy-Authorization: {auth}\r\n", fields(30))),
            "200",
        ),
        ("101 fields", authed(a, &fields(100)), "431"),
        (
            "a target over the limit",
            authed(&format!("{}.example:443", "a".repeat(9000)), ""),
            "414",
        ),
        ("userinfo", authed("u:p@a.example:443", ""), "400"),
        ("no port", authed("a.example", ""), "400"),
        ("a path", authed("/a", ""), "400"),
    ];
    let mut failures = Vec::new();
    for (name, bytes, want) in &cases {
        let before = up.log().requests.len();
        let got = raw_exchange(gw.addr, bytes.as_bytes(), Duration::from_millis(700)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reached = up.log().requests.len() - before;
        let status = statuses(&got)
            .first()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let want_reached = usize::from(*want == "200");
        if status != *want || reached != want_reached {
            failures.push(format!(
                "{name}: want {want} and {want_reached} CONNECT upstream; got {status:?} and {reached}: {:?}",
                got.chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Upstream side: exactly the CONNECTs that were let through, one Host each.
    for r in up.log().requests {
        assert_eq!(
            (r.method.as_str(), r.all("host")),
            ("CONNECT", vec!["a.example:443"]),
            "{r:?}"
        );
        assert!(
            r.all("proxy-authorization").is_empty(),
            "the client's credentials went on: {r:?}"
        );
    }
}
