//! The request heads of the data plane, per head: a client's CONNECT read and checked, an
//! HTTP upstream's reply to CONNECT read (the way the gateway reads it, and by httparse alone
//! beside it: what the short way of `head.rs` saves), and an absolute-form request head made
//! ready for the next hop (`http::to_upstream_head`). The heads are what curl, Chromium,
//! Python requests, tinyproxy and squid send.
//!
//! ```text
//! cargo bench -p proxygate-gateway --bench head
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark: a broken setup must stop it loudly"
)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderValue, Request};
use proxygate_gateway::bench;

const CONNECTS: &[(&str, &[u8])] = &[
    (
        "curl",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
          User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n",
    ),
    (
        "curl, with credentials",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
          Proxy-Authorization: Basic YWxpY2UtY291bnRyeS11cy1zZXNzaW9uLWExYjI6c2VjcmV0\r\n\
          User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n",
    ),
    (
        "chromium",
        b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n\
          Proxy-Connection: keep-alive\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) \
          AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n\r\n",
    ),
];

const REPLIES: &[(&str, &[u8])] = &[
    (
        "tinyproxy",
        b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n",
    ),
    ("squid", b"HTTP/1.1 200 Connection established\r\n\r\n"),
];

/// Absolute-form requests as hyper hands them over: (name, URI, fields).
type Absolute = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const ABSOLUTE: &[Absolute] = &[
    (
        "curl",
        "http://example.com/index.html?q=1",
        &[
            ("host", "example.com"),
            ("user-agent", "curl/7.88.1"),
            ("accept", "*/*"),
            ("proxy-connection", "Keep-Alive"),
        ],
    ),
    (
        "python requests",
        "http://example.com:8080/api/items?page=2",
        &[
            ("host", "example.com:8080"),
            ("user-agent", "python-requests/2.31.0"),
            ("accept-encoding", "gzip, deflate"),
            ("accept", "*/*"),
            ("connection", "keep-alive"),
            ("proxy-authorization", "Basic YWxpY2U6c2VjcmV0"),
        ],
    ),
];

fn connect(c: &mut Criterion) {
    let mut g = c.benchmark_group("connect head");
    g.throughput(Throughput::Elements(1));
    for (name, head) in CONNECTS {
        assert_eq!(bench::connect_head(head), Some(head.len()), "{name}");
        g.bench_function(*name, |b| b.iter(|| bench::connect_head(black_box(head))));
    }
    g.finish();
}

fn reply(c: &mut Criterion) {
    let mut g = c.benchmark_group("connect reply");
    g.throughput(Throughput::Elements(1));
    for (name, head) in REPLIES {
        assert_eq!(bench::reply_head(head), Some((200, head.len())), "{name}");
        assert_eq!(
            bench::reply_head_general(head),
            Some((200, head.len())),
            "{name}"
        );
        g.bench_function(format!("{name}: gateway"), |b| {
            b.iter(|| bench::reply_head(black_box(head)));
        });
        g.bench_function(format!("{name}: httparse"), |b| {
            b.iter(|| bench::reply_head_general(black_box(head)));
        });
    }
    g.finish();
}

fn absolute(c: &mut Criterion) {
    let mut g = c.benchmark_group("absolute-form head");
    g.throughput(Throughput::Elements(1));
    for (name, uri, fields) in ABSOLUTE {
        let mut req = Request::get(*uri).body(()).unwrap();
        for (k, v) in *fields {
            req.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        let parts = req.into_parts().0;
        assert!(
            proxygate_gateway::http::to_upstream_head(&mut parts.clone()).is_ok(),
            "{name}"
        );
        // The head is cloned outside the measured time: the gateway rewrites the one hyper
        // parsed, in place.
        g.bench_function(format!("{name}: to_upstream_head"), |b| {
            b.iter_batched_ref(
                || parts.clone(),
                |p| proxygate_gateway::http::to_upstream_head(p).map(|(_, origin)| origin),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, connect, reply, absolute);
criterion_main!(benches);
