//! The control socket, `<data-dir>/control.sock`: how `proxygate pool ...` reaches a running
//! gateway (sled lets one process open the data dir). One JSON [`Op`] per connection, one JSON
//! [`Reply`] back. The socket is mode 0600: whoever may use it may read the data dir anyway.
//! The HTTP admin API ([`crate::api`]) runs the same catalog operations.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxygate_core::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::api::Actions;
use crate::catalog::Catalog;
use crate::ops::{ActionKind, Op, Reply, execute};

pub const SOCKET: &str = "control.sock";
/// Largest request accepted (an import of a large list travels in one).
const MAX_REQUEST: u64 = 256 << 20;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds the socket (replacing a stale one: the caller holds the data dir's lock, so no other
/// gateway owns it).
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers operator commands until shutdown, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    catalog: Arc<Mutex<Catalog>>,
    actions: Arc<dyn Actions>,
    mut shutdown: Shutdown,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket: {e}");
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        let catalog = Arc::clone(&catalog);
        let actions = Arc::clone(&actions);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut request = Vec::new();
            if let Err(e) = read.take(MAX_REQUEST).read_to_end(&mut request).await {
                tracing::debug!("control socket: {e}");
                return;
            }
            let reply = match serde_json::from_slice::<Op>(&request) {
                Ok(op) if op.action_request().is_some() => action(&*actions, &op).await,
                Ok(op) => tokio::task::spawn_blocking(move || match catalog.lock() {
                    Ok(mut c) => execute(&mut c, &op),
                    Err(_) => Reply {
                        code: 1,
                        stderr: "proxygate: the catalog is unavailable".into(),
                        ..Reply::default()
                    },
                })
                .await
                .unwrap_or_default(),
                Err(e) => Reply {
                    code: 1,
                    stderr: format!("proxygate: bad control request: {e}"),
                    ..Reply::default()
                },
            };
            let bytes = serde_json::to_vec(&reply).unwrap_or_default();
            let _ = write.write_all(&bytes).await;
            let _ = write.shutdown().await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Runs a source operation; its reply's stdout is the JSON answer.
async fn action(actions: &dyn Actions, op: &Op) -> Reply {
    let Some((kind, request)) = op.action_request() else {
        return Reply::default();
    };
    let answer = match kind {
        ActionKind::Sources => actions.sources().await,
        ActionKind::Fetch => actions.fetch_sources(request).await,
        ActionKind::Refresh => actions.refresh(request).await,
    };
    match answer {
        Ok(v) => Reply::ok(serde_json::to_string(&v).unwrap_or_default()),
        Err(e) => Reply::error(&e),
    }
}

/// Sends `op` to the gateway running on `data_dir` and waits for its reply.
pub fn request(data_dir: &Path, op: &Op) -> std::io::Result<Reply> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket_path(data_dir))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    stream.write_all(&serde_json::to_vec(op).map_err(std::io::Error::other)?)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    serde_json::from_slice(&reply).map_err(std::io::Error::other)
}
