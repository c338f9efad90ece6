//! An origin server that tells what it saw, in response headers:
//! `x-peer` (the connecting address: which upstream dialed it), `x-method`, `x-target` (the
//! request target as received), `x-host`, `x-header-names` (every header name, comma
//! separated), `x-body-len`, `x-origin` (its own address: which origin answered); the body
//! echoes the request body. `GET /browser-page` is the exception: an HTML page for a browser
//! ([`BROWSER_PAGE`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A running origin.
pub struct Origin {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Plain HTTP on 127.0.0.1.
    pub async fn start() -> Origin {
        Self::start_on("127.0.0.1:0".parse().unwrap(), None).await
    }

    /// On any address, with TLS when an acceptor is given.
    pub async fn start_on(bind: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| echo(req, peer, addr));
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Origin {
            addr,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What `GET /browser-page` answers: a page whose script asks the origin three more times
/// (two GETs and a POST with a body, synchronously, so that the page is complete when it has
/// loaded) and writes what each answer's headers say into `<pre id="seen">`, one line each:
/// `METHOD STATUS x-peer x-target x-body-len`. A browser that dumps its DOM then shows which
/// upstream carried each request.
pub const BROWSER_PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>proxygate browser page</title></head>
<body><pre id="seen"></pre><script>
var lines = [];
function ask(method, target, body) {
  var x = new XMLHttpRequest();
  x.open(method, target, false);
  x.send(body);
  lines.push([method, x.status, x.getResponseHeader("x-peer"), x.getResponseHeader("x-target"),
              x.getResponseHeader("x-body-len")].join(" "));
}
ask("GET", "/asked?n=1", null);
ask("GET", "/asked?n=2", null);
ask("POST", "/asked?n=3", "from the browser");
document.getElementById("seen").textContent = "page " + location.protocol + "\n" +
  lines.join("\n") + "\nend";
</script></body></html>
"#;

async fn echo(
    req: Request<Incoming>,
    peer: SocketAddr,
    me: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == hyper::Method::GET && req.uri().path() == "/browser-page" {
        let page = Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .header("x-peer", peer.ip().to_string())
            .body(Full::new(Bytes::from_static(BROWSER_PAGE.as_bytes())))
            .unwrap();
        return Ok(page);
    }
    let method = req.method().to_string();
    let target = req.uri().to_string();
    let host = req
        .headers()
        .get("host")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_else(|| "absent".into());
    let names: Vec<String> = req
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let resp = Response::builder()
        .header("x-peer", peer.ip().to_string())
        .header("x-origin", me.to_string())
        .header("x-method", method)
        .header("x-target", target)
        .header("x-host", host)
        .header("x-header-names", names.join(","))
        .header("x-body-len", body.len().to_string())
        .body(Full::new(body))
        .unwrap();
    Ok(resp)
}
