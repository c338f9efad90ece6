//! An upstream that misbehaves on cue: every connection plays a [`Step`] script (read what the
//! gateway sent, answer garbage, trickle, reset, never stop talking). It counts the
//! connections it holds open, so a test can check that the gateway let go of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One step of a connection's script.
#[derive(Debug, Clone)]
pub enum Step {
    /// Reads one chunk (a request head, a SOCKS greeting); ends the script if the peer closed.
    Read,
    /// Writes these bytes at once.
    Write(Vec<u8>),
    /// Writes these bytes one at a time, `every` apart.
    Trickle(Vec<u8>, Duration),
    /// Writes these bytes again and again until the peer goes away.
    Endless(Vec<u8>),
    /// Resets the connection (RST, not FIN).
    Reset,
    /// Keeps the connection open, reading and discarding, until the peer closes it.
    Hold,
    /// Closes the connection (FIN).
    Close,
}

/// A running scripted upstream.
pub struct FaultyUpstream {
    pub addr: std::net::SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FaultyUpstream {
    pub async fn start(script: Vec<Step>) -> FaultyUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, accepted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, a) = (Arc::clone(&open), Arc::clone(&accepted));
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let guard = Open(Arc::clone(&o));
                let script = script.clone();
                tokio::spawn(async move {
                    play(s, &script).await;
                    drop(guard);
                });
            }
        });
        FaultyUpstream {
            addr,
            open,
            accepted,
            task,
        }
    }

    /// Connections it holds open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn play(mut s: TcpStream, script: &[Step]) {
    let mut buf = vec![0u8; 64 * 1024];
    for step in script {
        match step {
            Step::Read => match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            Step::Write(bytes) => {
                if s.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Step::Trickle(bytes, every) => {
                for b in bytes {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(*every).await;
                }
            }
            Step::Endless(bytes) => loop {
                if s.write_all(bytes).await.is_err() {
                    return;
                }
            },
            Step::Reset => {
                // A zero linger makes close send RST; it does not block (the deprecation is
                // about positive lingers).
                #[allow(deprecated, reason = "SO_LINGER 0: an RST on close, no blocking")]
                let _ = s.set_linger(Some(Duration::ZERO));
                return;
            }
            Step::Close => return,
            Step::Hold => loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            },
        }
    }
    // Script done: hold until the peer closes.
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
