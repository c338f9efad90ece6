//! Bidirectional relay with an idle timeout, byte counts and time to first byte.
//!
//! Each direction copies until EOF and then half-closes its writer; the relay ends when both
//! directions are done, when either fails, or when no byte has moved either way for the idle
//! timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::Metrics;

const BUF_SIZE: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// Reading from or writing to the client failed.
    ClientError,
    /// Reading from or writing to the upstream failed.
    UpstreamError,
}

/// What a relay moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
    /// From the start of the relay to the first byte from the upstream.
    pub first_byte: Option<Duration>,
    pub end: RelayEnd,
}

struct Shared {
    start: Instant,
    /// Milliseconds after `start` of the last byte moved.
    last_activity_ms: AtomicU64,
    /// Microseconds after `start` of the first byte down, plus one (0: none yet).
    first_byte_us: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Shared {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }
}

/// Relays between `client` and `upstream` until both close, one fails, or `idle` passes
/// without traffic. Bytes are added to `metrics` as they move.
pub async fn relay<C, U>(client: C, upstream: U, idle: Duration, metrics: &Metrics) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Shared {
        start: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        first_byte_us: AtomicU64::new(0),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
    };
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let upward = copy(&mut cr, &mut uw, &shared, Direction::Up, metrics);
    let downward = copy(&mut ur, &mut cw, &shared, Direction::Down, metrics);
    let watchdog = async {
        loop {
            let last = Duration::from_millis(shared.last_activity_ms.load(Ordering::Relaxed));
            let deadline = shared.start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::pin!(upward, downward, watchdog);
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        tokio::select! {
            r = &mut upward, if !up_done => {
                up_done = true;
                if let Err(end) = r { break end; }
            }
            r = &mut downward, if !down_done => {
                down_done = true;
                if let Err(end) = r { break end; }
            }
            () = &mut watchdog => break RelayEnd::Idle,
        }
        if up_done && down_done {
            break RelayEnd::Closed;
        }
    };
    let fb = shared.first_byte_us.load(Ordering::Relaxed);
    RelayStats {
        bytes_up: shared.up.load(Ordering::Relaxed),
        bytes_down: shared.down.load(Ordering::Relaxed),
        first_byte: (fb > 0).then(|| Duration::from_micros(fb - 1)),
        end,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    shared: &Shared,
    dir: Direction,
    metrics: &Metrics,
) -> Result<(), RelayEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (up_total, down_total) = metrics.byte_counters();
    let (read_fault, write_fault, counter, total) = match dir {
        Direction::Up => (
            RelayEnd::ClientError,
            RelayEnd::UpstreamError,
            &shared.up,
            up_total,
        ),
        Direction::Down => (
            RelayEnd::UpstreamError,
            RelayEnd::ClientError,
            &shared.down,
            down_total,
        ),
    };
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await.map_err(|_| read_fault)?;
        if n == 0 {
            // Half-close: the peer sees EOF, the other direction goes on.
            let _ = w.shutdown().await;
            return Ok(());
        }
        if dir == Direction::Down && counter.load(Ordering::Relaxed) == 0 {
            let us = u64::try_from(shared.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            let _ = shared.first_byte_us.compare_exchange(
                0,
                us + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        write_all(w, &buf[..n]).await.map_err(|_| write_fault)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        total.inc_by(n as u64);
        shared.touch();
    }
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (client, mut client_peer) = duplex(64);
        let (upstream, mut upstream_peer) = duplex(64);
        let task = tokio::spawn(async move {
            relay(
                client,
                upstream,
                Duration::from_secs(5),
                &Metrics::unregistered(),
            )
            .await
        });
        client_peer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        upstream_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        upstream_peer.write_all(b"world!").await.unwrap();
        let mut buf = [0u8; 6];
        client_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"world!");
        drop(client_peer);
        drop(upstream_peer);
        let stats = task.await.unwrap();
        assert_eq!((stats.bytes_up, stats.bytes_down), (5, 6));
        assert!(stats.first_byte.is_some());
        assert_eq!(stats.end, RelayEnd::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_is_closed() {
        let (client, _client_peer) = duplex(64);
        let (upstream, _upstream_peer) = duplex(64);
        let stats = relay(
            client,
            upstream,
            Duration::from_secs(300),
            &Metrics::unregistered(),
        )
        .await;
        assert_eq!(stats.end, RelayEnd::Idle);
        assert_eq!(stats.first_byte, None);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_idle() {
        let (client, mut client_peer) = duplex(64);
        let (upstream, mut upstream_peer) = duplex(64);
        let task = tokio::spawn(async move {
            relay(
                client,
                upstream,
                Duration::from_secs(10),
                &Metrics::unregistered(),
            )
            .await
        });
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client_peer.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            upstream_peer.read_exact(&mut b).await.unwrap();
        }
        assert!(!task.is_finished());
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Idle);
        assert_eq!(stats.bytes_up, 5);
    }
}
