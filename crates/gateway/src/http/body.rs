//! Body wrappers that measure a forwarded request: [`Counted`] counts the request body's
//! bytes on its way up; [`Reported`] counts the response body's bytes on its way down and
//! reports the attempt's [`Outcome`] to the pool once the body ends (or the client stops
//! reading it).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use proxygate_core::{ErrorKind, Outcome, Target, UpstreamId};
use proxygate_pool::Lease;

/// Counts the data bytes that pass through `inner` into `count`; flags `failed` when the
/// client's body itself is broken (a malformed chunk, a connection cut mid-body).
#[derive(Debug)]
pub(crate) struct Counted {
    inner: Incoming,
    count: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

impl Counted {
    pub(crate) fn new(inner: Incoming, count: Arc<AtomicU64>, failed: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            count,
            failed,
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Some(Err(_))) => self.failed.store(true, Ordering::Relaxed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body; reports the outcome when it ends, fails, or is dropped,
/// and gives its upstream connection back for reuse when it ended cleanly.
pub(crate) struct Reported {
    inner: Incoming,
    lease: Option<Lease>,
    outcome: Outcome,
    up: Arc<AtomicU64>,
    keep: Option<Keep>,
}

impl std::fmt::Debug for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reported")
            .field("outcome", &self.outcome)
            .field("keep", &self.keep.is_some())
            .finish_non_exhaustive()
    }
}

/// An upstream connection to keep once its response has been read to the end.
pub(crate) struct Keep {
    pub(crate) upstream: UpstreamId,
    pub(crate) target: Target,
    pub(crate) sender: SendRequest<super::Body>,
    pub(crate) conn: u64,
    pub(crate) tunnel: bool,
    pub(crate) max: usize,
}

impl Reported {
    pub(crate) fn new(
        inner: Incoming,
        lease: Lease,
        outcome: Outcome,
        up: Arc<AtomicU64>,
        keep: Option<Keep>,
    ) -> Self {
        Self {
            inner,
            lease: Some(lease),
            outcome,
            up,
            keep,
        }
    }

    /// The response was read to its end: its connection can carry another request.
    fn give_back(&mut self) {
        if let Some(k) = self.keep.take() {
            super::reuse::put(
                k.upstream,
                k.target,
                k.sender,
                k.conn,
                k.tunnel,
                k.max,
                std::time::Instant::now(),
            );
        }
    }

    fn report(&mut self, error: Option<ErrorKind>) {
        if let Some(lease) = self.lease.take() {
            self.outcome.bytes_up = self.up.load(Ordering::Relaxed);
            self.outcome.error = error;
            lease.report(&self.outcome);
        }
    }
}

impl Body for Reported {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.outcome.bytes_down += data.len() as u64;
                }
            }
            // The upstream broke off the body it had started: its fault.
            Poll::Ready(Some(Err(_))) => {
                self.keep = None;
                self.report(Some(ErrorKind::UpstreamIo));
            }
            Poll::Ready(None) => {
                self.report(None);
                self.give_back();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        // The client stopped reading (or the body was empty and never polled): the upstream
        // answered, which is all it owed us.
        self.report(None);
        // Reusable only if nothing of the body is left unread on it.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
