//! Letting hyper go of an idle kept-alive connection, so that it waits for its next request
//! holding no buffer (`server.keepalive_release_after`).
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB buffer for heads for as long as it serves a
//! connection, and its API cannot shrink either: an idle kept-alive client held 16.4 KiB, an
//! idle tunnel 1.4. The one way to drop them is to take the connection back from hyper. hyper
//! hands its parts back (`Connection::into_parts`) once it has let the connection go, and it
//! must let go only between requests, with every byte of the last answer flushed:
//!
//! - Between requests is when hyper waits for a head: the only time its header-read timer
//!   runs. That timer is ours ([`ParkTimer`]), set to `keepalive_release_after`. When it
//!   fires, hyper stops with a timeout error, its parts intact (what it read of a next head
//!   included), and the timer has noted why ([`Park::parked_since`]).
//! - Flushed: hyper goes idle only after a flush, except when a request's body ends after its
//!   answer was written. [`Watched`] tells whether every byte hyper wrote has been flushed
//!   (hyper writes only through it, and asks it to flush only once its own buffer is empty); a
//!   timer that fires with bytes not yet flushed waits another round instead.
//!
//! Past `keepalive_timeout` the timer fires whatever the state: hyper ends the connection, and
//! it is closed, as hyper's own timer closed it before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What hyper's side of one connection tells the serve loop.
#[derive(Debug, Default)]
pub(super) struct Park {
    /// hyper has written bytes it has not yet seen flushed.
    unflushed: AtomicBool,
    /// When the idle wait began that the timer ended, letting the connection go.
    parked: Mutex<Option<Instant>>,
}

impl Park {
    /// Whether hyper has bytes written and not yet flushed.
    pub(super) fn unflushed(&self) -> bool {
        self.unflushed.load(Ordering::Relaxed)
    }

    /// When the idle wait began, if the timer let the connection go.
    pub(super) fn parked_since(&self) -> Option<Instant> {
        self.parked.lock().ok().and_then(|p| *p)
    }
}

pin_project_lite::pin_project! {
    /// The stream hyper serves, telling [`Park`] whether every byte written has been flushed.
    #[derive(Debug)]
    pub(super) struct Watched<S> {
        #[pin]
        inner: S,
        park: Arc<Park>,
    }
}

impl<S> Watched<S> {
    pub(super) fn new(inner: S, park: Arc<Park>) -> Self {
        Self { inner, park }
    }

    pub(super) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.park.unflushed.store(true, Ordering::Relaxed);
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.park.unflushed.store(true, Ordering::Relaxed);
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = ready!(this.inner.poll_flush(cx));
        if r.is_ok() {
            this.park.unflushed.store(false, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// hyper's timer for one connection. hyper uses it for one thing, the wait for a request head
/// from the moment the connection is idle, set to `release` (at most `keepalive`).
#[derive(Debug, Clone)]
pub(super) struct ParkTimer {
    park: Arc<Park>,
    /// The wait before the connection is let go.
    release: Duration,
    /// The longest a kept-alive connection waits for its next request, whole.
    keepalive: Duration,
}

impl ParkTimer {
    /// A timer for hyper's `header_read_timeout`, which must be [`ParkTimer::wait`].
    pub(super) fn new(park: Arc<Park>, release: Duration, keepalive: Duration) -> Self {
        Self {
            park,
            release: release.min(keepalive),
            keepalive,
        }
    }

    /// What hyper's `header_read_timeout` must be set to.
    pub(super) fn wait(&self) -> Duration {
        self.release
    }
}

impl hyper::rt::Timer for ParkTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = Instant::from_std(deadline);
        Box::pin(ParkSleep {
            sleep: tokio::time::sleep_until(deadline),
            park: Arc::clone(&self.park),
            since: idle_since(deadline, self.release),
            release: self.release,
            keepalive: self.keepalive,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<ParkSleep>() {
            Some(s) => s.reset(Instant::from_std(new_deadline)),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

/// When an idle wait ending at `deadline` began (hyper sets it `release` after the start).
fn idle_since(deadline: Instant, release: Duration) -> Instant {
    deadline.checked_sub(release).unwrap_or(deadline)
}

pin_project_lite::pin_project! {
    /// One idle wait: it ends at `since + release` if everything written is flushed by then
    /// (else a round later), and at `since + keepalive` whatever the state.
    struct ParkSleep {
        #[pin]
        sleep: tokio::time::Sleep,
        park: Arc<Park>,
        since: Instant,
        release: Duration,
        keepalive: Duration,
    }
}

impl ParkSleep {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.project();
        *this.since = idle_since(deadline, *this.release);
        this.sleep.reset(deadline);
    }
}

impl Future for ParkSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let now = Instant::now();
            let end = *this.since + *this.keepalive;
            if now >= end {
                return Poll::Ready(());
            }
            if !this.park.unflushed() {
                if let Ok(mut p) = this.park.parked.lock() {
                    *p = Some(*this.since);
                }
                return Poll::Ready(());
            }
            this.sleep.as_mut().reset((now + *this.release).min(end));
        }
    }
}

impl hyper::rt::Sleep for ParkSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;
    use tokio::io::AsyncWriteExt;

    fn timer(park: &Arc<Park>) -> ParkTimer {
        ParkTimer::new(
            Arc::clone(park),
            Duration::from_secs(1),
            Duration::from_secs(10),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_wait_lets_go_when_everything_is_flushed() {
        let park = Arc::new(Park::default());
        let t = timer(&park);
        let start = Instant::now();
        t.sleep(t.wait()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(park.parked_since(), Some(start));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_not_yet_flushed_hold_the_connection_another_round() {
        let park = Arc::new(Park::default());
        let (a, _b) = tokio::io::duplex(64);
        let mut w = Watched::new(a, Arc::clone(&park));
        w.write_all(b"the end of an answer").await.unwrap();
        assert!(park.unflushed());
        let t = timer(&park);
        let start = Instant::now();
        let sleep = t.sleep(t.wait());
        let flushed_later = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            w.flush().await.unwrap();
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = sleep => {}
            () = flushed_later => unreachable!(),
        }
        // Flushed at 2.5 s: let go at the next round's end, 3 s.
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(park.parked_since(), Some(start));
    }

    #[tokio::test(start_paused = true)]
    async fn never_flushed_ends_at_keepalive_without_letting_go() {
        let park = Arc::new(Park::default());
        park.unflushed.store(true, Ordering::Relaxed);
        let t = timer(&park);
        let start = Instant::now();
        t.sleep(t.wait()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(park.parked_since(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_past_keepalive_is_the_keepalive_limit() {
        let park = Arc::new(Park::default());
        let t = ParkTimer::new(
            Arc::clone(&park),
            Duration::from_secs(90),
            Duration::from_secs(60),
        );
        assert_eq!(t.wait(), Duration::from_secs(60));
        let start = Instant::now();
        t.sleep(t.wait()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        assert_eq!(park.parked_since(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_wait_counts_from_its_new_start() {
        let park = Arc::new(Park::default());
        let t = timer(&park);
        let mut sleep = t.sleep(t.wait());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let restart = Instant::now();
        t.reset(&mut sleep, (restart + t.wait()).into_std());
        sleep.await;
        assert_eq!(restart.elapsed(), Duration::from_secs(1));
        assert_eq!(park.parked_since(), Some(restart));
    }
}
