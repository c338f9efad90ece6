//! Raw bytes on both sides of the gateway: [`RecordingUpstream`] is an HTTP proxy that records
//! the exact bytes each connection sent it, parses them as a strict HTTP/1.1 server would
//! (a request line, CRLF headers, a body framed by one Content-Length or by chunked coding),
//! and answers each request `200` with its sequence number. [`raw_exchange`] sends bytes as a
//! scripted client and returns everything that came back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the recording upstream parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub version: u8,
    /// Header fields in order, names lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the upstream saw.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Raw bytes per connection, in order.
    pub raw: Vec<Vec<u8>>,
    /// Every request it parsed, in order.
    pub requests: Vec<Recorded>,
    /// Connections whose bytes did not parse as strict HTTP/1.1 (the reason).
    pub unparsable: Vec<String>,
}

/// A recording HTTP proxy.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let sink = Arc::clone(&log);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let sink = Arc::clone(&sink);
                tokio::spawn(serve(s, sink));
            }
        });
        RecordingUpstream { addr, log, task }
    }

    pub fn log(&self) -> Log {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, log: Arc<Mutex<Log>>) {
    let conn = {
        let mut l = log.lock().unwrap();
        l.raw.push(Vec::new());
        l.raw.len() - 1
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Parse as many whole requests as the buffer holds.
        loop {
            match parse_one(&buf) {
                Ok(Some((req, used))) => {
                    buf.drain(..used);
                    let seq = {
                        let mut l = log.lock().unwrap();
                        l.requests.push(req);
                        l.requests.len()
                    };
                    let body = format!("upstream response {seq}\n");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Seq: {seq}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(why) => {
                    log.lock().unwrap().unparsable.push(why);
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                    return;
                }
            }
        }
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => {
                if !buf.is_empty() {
                    log.lock()
                        .unwrap()
                        .unparsable
                        .push(format!("{} bytes left unparsed at close", buf.len()));
                }
                return;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        log.lock().unwrap().raw[conn].extend_from_slice(&chunk[..n]);
    }
}

/// Parses one strict HTTP/1.1 request off the front of `buf`: `Ok(None)` when it is not
/// complete yet.
fn parse_one(buf: &[u8]) -> Result<Option<(Recorded, usize)>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = &buf[..head_end];
    if head.iter().any(|b| *b == 0 || *b >= 0x80) {
        return Err("NUL or non-ASCII in the head".into());
    }
    let head = std::str::from_utf8(head).map_err(|e| e.to_string())?;
    if head
        .split("\r\n")
        .any(|l| l.contains('\r') || l.contains('\n'))
    {
        return Err("bare CR or LF in the head".into());
    }
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("request line {line:?}"));
    };
    let version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        v => return Err(format!("version {v:?}")),
    };
    let mut headers = Vec::new();
    for l in lines {
        if l.starts_with([' ', '\t']) {
            return Err(format!("folded header {l:?}"));
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("header line {l:?}"))?;
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(format!("header name {k:?}"));
        }
        headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
    }
    let cl: Vec<&String> = headers
        .iter()
        .filter(|(k, _)| k == "content-length")
        .map(|(_, v)| v)
        .collect();
    let te: Vec<&String> = headers
        .iter()
        .filter(|(k, _)| k == "transfer-encoding")
        .map(|(_, v)| v)
        .collect();
    if !cl.is_empty() && !te.is_empty() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    if cl.len() > 1 {
        return Err("several Content-Length".into());
    }
    let mut at = head_end + 4;
    let body = if !te.is_empty() {
        if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") {
            return Err(format!("Transfer-Encoding {te:?}"));
        }
        let mut body = Vec::new();
        loop {
            let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let size_line = std::str::from_utf8(&buf[at..at + eol]).map_err(|e| e.to_string())?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or(""), 16)
                .map_err(|_| format!("chunk size {size_line:?}"))?;
            at += eol + 2;
            if size == 0 {
                // No trailers from a gateway: the terminating CRLF.
                if buf.len() < at + 2 {
                    return Ok(None);
                }
                if &buf[at..at + 2] != b"\r\n" {
                    return Err("trailers or junk after the last chunk".into());
                }
                at += 2;
                break body;
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[at..at + size]);
            if &buf[at + size..at + size + 2] != b"\r\n" {
                return Err("chunk without CRLF".into());
            }
            at += size + 2;
        }
    } else if let Some(cl) = cl.first() {
        let n: usize = cl.parse().map_err(|_| format!("Content-Length {cl:?}"))?;
        if buf.len() < at + n {
            return Ok(None);
        }
        at += n;
        buf[head_end + 4..at].to_vec()
    } else {
        Vec::new()
    };
    Ok(Some((
        Recorded {
            method: method.into(),
            target: target.into(),
            version,
            headers,
            body,
        },
        at,
    )))
}

/// Sends `bytes` to `addr` (in one write), half-closes after `close_after` (or not), and
/// returns what came back within `wait`.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
