//! Fixtures for the list sources, on loopback: [`ListServer`] serves proxy lists (whatever a
//! route function answers, so tests can page, fail and misbehave), and [`Judge`] echoes what
//! it got as httpbin (`/get`) and azenv (`/azenv`) do.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a route answers: status, content type, body.
pub type Answer = (u16, &'static str, String);

type Route = dyn Fn(&str, &HashMap<String, String>) -> Answer + Send + Sync;

/// One request the list server got.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `path?query`.
    pub target: String,
    pub user_agent: String,
}

/// An HTTP server answering from a route function.
pub struct ListServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(hyper::Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<Full<Bytes>>> + Send,
{
    while let Ok((stream, peer)) = listener.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn response(status: u16, content_type: &str, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The query string as a map.
pub fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl ListServer {
    /// Serves `route(path, query)` on 127.0.0.1.
    pub async fn start(
        route: impl Fn(&str, &HashMap<String, String>) -> Answer + Send + Sync + 'static,
    ) -> ListServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let route: Arc<Route> = Arc::new(route);
        let log = Arc::clone(&seen);
        let task = tokio::spawn(serve(listener, move |req, _peer| {
            let (route, log) = (Arc::clone(&route), Arc::clone(&log));
            async move {
                let uri = req.uri().clone();
                log.lock().unwrap().push(Seen {
                    target: uri.to_string(),
                    user_agent: req
                        .headers()
                        .get("user-agent")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                });
                let (status, ct, body) = route(uri.path(), &query(uri.query()));
                response(status, ct, body)
            }
        }));
        ListServer { addr, seen, task }
    }

    /// Serves fixed bodies by path (404 elsewhere).
    pub async fn fixed(pages: Vec<(&'static str, u16, &'static str, String)>) -> ListServer {
        let pages: HashMap<&'static str, Answer> = pages
            .into_iter()
            .map(|(path, status, ct, body)| (path, (status, ct, body)))
            .collect();
        ListServer::start(move |path, _| {
            pages.get(path).cloned().unwrap_or((
                404,
                "text/html",
                "<html><head><title>404 Not Found</title></head></html>".into(),
            ))
        })
        .await
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ListServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the judge's `/static` serves, always.
pub const STATIC_PAGE: &str =
    "<!doctype html><html><head><title>Example</title></head><body><p>static</p></body></html>";

/// A judge: `/get...` answers httpbin's JSON (`origin` is `X-Forwarded-For, peer` when the
/// request carried one, as httpbin.org behind its balancer shows), `/azenv` an azenv page.
pub struct Judge {
    pub addr: SocketAddr,
    hits: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Judge {
    pub async fn start() -> Judge {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(0));
        let count = Arc::clone(&hits);
        let task = tokio::spawn(serve(listener, move |req, peer| {
            let count = Arc::clone(&count);
            async move {
                *count.lock().unwrap() += 1;
                let headers: Vec<(String, String)> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                let xff = headers
                    .iter()
                    .find(|(k, _)| k == "x-forwarded-for")
                    .map(|(_, v)| v.clone());
                if req.uri().path().starts_with("/get") {
                    let origin = match xff {
                        Some(x) => format!("{x}, {}", peer.ip()),
                        None => peer.ip().to_string(),
                    };
                    let h: serde_json::Map<String, serde_json::Value> = headers
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect();
                    let body = serde_json::json!({
                        "args": {},
                        "headers": h,
                        "origin": origin,
                        "url": req.uri().to_string(),
                    });
                    response(200, "application/json", body.to_string())
                } else if req.uri().path() == "/static" {
                    response(200, "text/html", STATIC_PAGE.into())
                } else if req.uri().path().starts_with("/azenv") {
                    let mut body = format!(
                        "<html><head><title>AZ Environment variables 1.04</title></head><body><pre>\nREMOTE_ADDR = {}\nREMOTE_PORT = {}\nREQUEST_METHOD = GET\n",
                        peer.ip(),
                        peer.port()
                    );
                    for (k, v) in headers {
                        body.push_str(&format!(
                            "HTTP_{} = {v}\n",
                            k.to_ascii_uppercase().replace('-', "_")
                        ));
                    }
                    body.push_str("</pre></body></html>");
                    response(200, "text/html", body)
                } else {
                    response(404, "text/plain", "not found".into())
                }
            }
        }));
        Judge { addr, hits, task }
    }

    /// The httpbin-style judge URL.
    pub fn httpbin_url(&self) -> String {
        format!("http://{}/get?show_env=1", self.addr)
    }

    /// A static page (the checker's `integrity_url`).
    pub fn static_url(&self) -> String {
        format!("http://{}/static", self.addr)
    }

    pub fn azenv_url(&self) -> String {
        format!("http://{}/azenv", self.addr)
    }

    pub fn hits(&self) -> usize {
        *self.hits.lock().unwrap()
    }
}

impl Drop for Judge {
    fn drop(&mut self) {
        self.task.abort();
    }
}
