//! Bidirectional relay with an idle timeout, byte counts and time to first byte.
//!
//! One future drives both directions over the two streams it owns (no split halves and their
//! locks). Each direction copies until EOF and then half-closes its writer (a TCP writer's last
//! bytes go in the segment that carries its FIN); the relay ends when both directions are done,
//! when either fails, or when no byte has moved either way for the idle timeout.
//!
//! Buffers exist only while data moves: a direction takes a buffer when it reads and gives it
//! back as soon as a read finds nothing waiting and everything read has been written. An idle
//! tunnel holds no buffer at all, which is most of what it would otherwise cost in memory.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::Metrics;

const BUF_SIZE: usize = 16 * 1024;

/// A direction's buffer once a read has filled a [`BUF_SIZE`] one (data comes faster than
/// it is passed on: a download, an upload): a quarter of the syscalls per byte moved. A relay
/// of two loopback sockets spends 0.86 s of CPU per GiB with 64 KiB against 1.2-1.4 s with
/// 16 KiB; through the gateway and a tinyproxy upstream, 14 % less (the results file under
/// `tests/bench`, section "The harness corrected"). Taken while the direction stays busy,
/// given back when a read finds nothing waiting.
const BULK_BUF_SIZE: usize = 64 * 1024;

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
    /// The first byte each way (client to upstream, upstream to client): enough to tell a TLS
    /// handshake (0x16) answered by an alert (0x15).
    pub first_up: Option<u8>,
    pub first_down: Option<u8>,
    pub end: RelayEnd,
}

impl RelayStats {
    /// The target answered the client's TLS handshake with an alert record as its very first
    /// bytes: it refused the handshake (an SNI or address block, a protocol mismatch).
    pub fn tls_refused(&self) -> bool {
        self.first_up == Some(0x16) && self.first_down == Some(0x15)
    }
}

/// Relays between `client` and `upstream` until both close, one fails, or `idle` passes
/// without traffic. Bytes are added to `metrics` as they move.
///
/// Both streams are closed when the relay is dropped, which its owners do as soon as it
/// resolves, so the side whose direction ends last is not shut down first: its close sends the
/// FIN a shutdown would have (one syscall fewer per tunnel; nothing is unread on it, its EOF
/// came before). The client is plain TCP; an upstream
/// spoken to over TLS (`upstream_tls`) is always shut down, which sends its `close_notify`.
///
/// With `splice` (Linux), a direction between two plain TCP sockets moves bulk data through a
/// pipe rather than a buffer (`splice.rs`).
///
/// `metrics` is anything that leads to the [`Metrics`]: a reference, or the gateway itself
/// (which a connection's task owns, so that its tunnel is a future of its own with nothing
/// borrowed). Must be called within a Tokio runtime with time enabled (the idle watchdog).
pub fn relay<C, U, M>(
    client: C,
    upstream: U,
    upstream_tls: bool,
    idle: Duration,
    splice: bool,
    metrics: M,
) -> Relaying<C, U, M>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
    U: AsyncRead + AsyncWrite + Unpin + 'static,
    M: AsRef<Metrics>,
{
    let start = Instant::now();
    let infer_eof = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    Relaying {
        core: Relay {
            client,
            upstream,
            up: Pump::new(
                RelayEnd::ClientError,
                RelayEnd::UpstreamError,
                !upstream_tls,
                splice,
                infer_eof,
            ),
            down: Pump::new(
                RelayEnd::UpstreamError,
                RelayEnd::ClientError,
                true,
                splice,
                infer_eof,
            ),
            idle,
            last_activity: start,
            watched_by: None,
            start,
            first_byte: None,
            metrics,
        },
        // In the future's own state, not boxed: one allocation fewer per tunnel.
        watchdog: tokio::time::sleep_until(start + idle),
    }
}

pin_project_lite::pin_project! {
    /// A relay in progress (see [`relay`]): resolves to what it moved and how it ended.
    ///
    /// A plain struct rather than an `async fn`'s state: an async function keeps its arguments
    /// twice (as arguments and as the locals they are moved into), and each level of a call
    /// chain adds its own, so an idle tunnel held ~1 KiB more than it needs.
    pub struct Relaying<C, U, M>
    where
        M: AsRef<Metrics>,
    {
        core: Relay<C, U, M>,
        #[pin]
        watchdog: Sleep,
    }
}

impl<C, U, M: AsRef<Metrics>> Relaying<C, U, M> {
    /// What the relay's bytes are counted in.
    pub fn metrics(&self) -> &M {
        &self.core.metrics
    }
}

impl<C, U, M> Future for Relaying<C, U, M>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
    U: AsyncRead + AsyncWrite + Unpin + 'static,
    M: AsRef<Metrics>,
{
    type Output = RelayStats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayStats> {
        let this = self.project();
        let end = ready!(this.core.poll(cx, this.watchdog));
        let r = &*this.core;
        Poll::Ready(RelayStats {
            bytes_up: r.up.bytes,
            bytes_down: r.down.bytes,
            first_byte: r.first_byte,
            first_up: r.up.first,
            first_down: r.down.first,
            end,
        })
    }
}

struct Relay<C, U, M: AsRef<Metrics>> {
    client: C,
    upstream: U,
    up: Pump,
    down: Pump,
    idle: Duration,
    last_activity: Instant,
    /// The waker the watchdog last registered: while it is this poll's and the watchdog has
    /// not fired, the watchdog is not polled again (its poll re-registers the waker: ~200
    /// instructions, on every wake of the relay).
    watched_by: Option<Waker>,
    start: Instant,
    first_byte: Option<Duration>,
    /// Where `proxygate_bytes_total{direction="up"|"down"}` are, added to every
    /// [`REPORT_EVERY`] bytes and when the relay ends (or is dropped at shutdown): one shared
    /// atomic add per step, not per read.
    metrics: M,
}

impl<C, U, M: AsRef<Metrics>> Drop for Relay<C, U, M> {
    fn drop(&mut self) {
        let (up, down) = self.metrics.as_ref().byte_counters();
        up.inc_by(std::mem::take(&mut self.up.unreported));
        down.inc_by(std::mem::take(&mut self.down.unreported));
    }
}

impl<C, U, M> Relay<C, U, M>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
    U: AsyncRead + AsyncWrite + Unpin + 'static,
    M: AsRef<Metrics>,
{
    fn poll(&mut self, cx: &mut Context<'_>, mut watchdog: Pin<&mut Sleep>) -> Poll<RelayEnd> {
        let (up_before, down_before) = (self.up.bytes, self.down.bytes);
        // A buffer one direction lets go of in this poll serves the other (most wakes are for
        // one direction; the other only looks); whatever is left goes back to the thread.
        let mut slot = None;
        let up = self.up.poll(
            cx,
            &mut self.client,
            &mut self.upstream,
            self.down.done,
            &mut slot,
        );
        let down = self.down.poll(
            cx,
            &mut self.upstream,
            &mut self.client,
            self.up.done,
            &mut slot,
        );
        if let Some(buf) = slot {
            spare::give(buf);
        }
        if self.up.bytes != up_before || self.down.bytes != down_before {
            self.last_activity = Instant::now();
            if down_before == 0 && self.down.bytes > 0 {
                self.first_byte = Some(self.last_activity - self.start);
            }
            if self.up.unreported >= REPORT_EVERY || self.down.unreported >= REPORT_EVERY {
                let (up, down) = self.metrics.as_ref().byte_counters();
                if self.up.unreported >= REPORT_EVERY {
                    up.inc_by(std::mem::take(&mut self.up.unreported));
                }
                if self.down.unreported >= REPORT_EVERY {
                    down.inc_by(std::mem::take(&mut self.down.unreported));
                }
            }
        }
        match (up, down) {
            (Poll::Ready(Err(end)), _) | (_, Poll::Ready(Err(end))) => return Poll::Ready(end),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(RelayEnd::Closed),
            _ => {}
        }
        // The watchdog sleeps until the idle limit counted from the last activity it knows of;
        // activity since then only moves the deadline when it fires (no timer reset per read).
        let watched = self
            .watched_by
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if watched && !watchdog.is_elapsed() {
            return Poll::Pending;
        }
        while watchdog.as_mut().poll(cx).is_ready() {
            let deadline = self.last_activity + self.idle;
            if Instant::now() >= deadline {
                return Poll::Ready(RelayEnd::Idle);
            }
            watchdog.as_mut().reset(deadline);
        }
        if !watched {
            self.watched_by = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// One direction: read from one stream, write to the other.
struct Pump {
    /// Taken while data moves, dropped when the reader has nothing and all is written. Read
    /// into its spare capacity, never zeroed (`len()` is what was read).
    buf: Option<BytesMut>,
    /// Written up to `pos`.
    pos: usize,
    /// The reader reached EOF.
    eof: bool,
    /// EOF was passed on (the writer half-closed): this direction is done.
    done: bool,
    /// A read failed after bytes were read: they are written out before the failure ends
    /// the relay.
    read_failed: bool,
    /// A read filled its buffer: the next is a [`BULK_BUF_SIZE`] one until a read finds
    /// nothing waiting; or, where the direction can splice, a pipe from then on.
    bulk: bool,
    /// Splicing allowed (`server.splice`).
    splice: bool,
    /// The EOF of a TCP reader is inferred, not read: a read from the socket that leaves room
    /// in the buffer has tokio clear the socket's readable state, so if it still reports
    /// ready, what it holds is the peer's FIN (`EPOLLRDHUP`), which came before that read:
    /// every byte before it is read, and the recv that would return 0 is not made (one fewer
    /// per tunnel, as HAProxy does). Only on a current-thread runtime (the data plane's): on a
    /// multi-thread one the reactor may mark the socket from another thread meanwhile, for
    /// bytes and a FIN that came after the read.
    infer_eof: bool,
    /// The reads go to the TCP socket itself (nothing left to replay above it); `None` until
    /// the first read.
    reads_socket: Option<bool>,
    /// While this direction splices: its pipe and the bytes in it.
    #[cfg(target_os = "linux")]
    pipe: Option<(crate::splice::Pipe, usize)>,
    bytes: u64,
    /// The first byte read.
    first: Option<u8>,
    /// Bytes not yet added to the global counter (added every so often, and at the end).
    unreported: u64,
    read_fault: RelayEnd,
    write_fault: RelayEnd,
    /// The writer is closed right after the relay ends: when this direction ends last, its
    /// close passes the EOF on.
    eof_by_close: bool,
}

/// Bytes a direction moves before it adds them to the global counter (and at its end).
const REPORT_EVERY: u64 = 256 * 1024;

impl Pump {
    fn new(
        read_fault: RelayEnd,
        write_fault: RelayEnd,
        eof_by_close: bool,
        splice: bool,
        infer_eof: bool,
    ) -> Self {
        Self {
            buf: None,
            pos: 0,
            eof: false,
            done: false,
            read_failed: false,
            bulk: false,
            splice,
            infer_eof,
            reads_socket: None,
            #[cfg(target_os = "linux")]
            pipe: None,
            bytes: 0,
            first: None,
            unreported: 0,
            read_fault,
            write_fault,
            eof_by_close,
        }
    }

    /// Lets the buffer go: into `slot` (for the other direction, in this poll) if it is
    /// free, else to this thread's spares.
    fn give_back(&mut self, slot: &mut Option<BytesMut>) {
        if let Some(mut buf) = self.buf.take() {
            if slot.is_none() {
                buf.clear();
                *slot = Some(buf);
            } else {
                spare::give(buf);
            }
        }
    }

    /// The reader's EOF, everything before it written: passed on to the writer (a shutdown,
    /// or its close right after the relay when the other direction is done too), and this
    /// direction is done.
    fn pass_eof<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        other_done: bool,
    ) -> Poll<Result<(), RelayEnd>> {
        if !(self.eof_by_close && other_done) {
            ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(|_| self.write_fault)?;
        }
        self.done = true;
        Poll::Ready(Ok(()))
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        other_done: bool,
        slot: &mut Option<BytesMut>,
    ) -> Poll<Result<(), RelayEnd>>
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        #[cfg(target_os = "linux")]
        if self.pipe.is_some() {
            return self.poll_spliced(cx, r, w, other_done);
        }
        let mut read_pending = false;
        loop {
            // Write out what was read.
            if let Some(buf) = &mut self.buf
                && !buf.is_empty()
            {
                while self.pos < buf.len() {
                    let n = ready!(if self.eof {
                        crate::io::poll_write_last(&mut *w, cx, &buf[self.pos..])
                    } else {
                        Pin::new(&mut *w).poll_write(cx, &buf[self.pos..])
                    })
                    .map_err(|_| self.write_fault)?;
                    if n == 0 {
                        return Poll::Ready(Err(self.write_fault));
                    }
                    self.pos += n;
                    self.bytes += n as u64;
                    self.unreported += n as u64;
                }
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|_| self.write_fault)?;
                self.pos = 0;
                buf.clear();
            }
            // All written. Data comes faster than it is passed on: a pipe, or a bigger buffer.
            // (A direction that spliced goes on splicing, with a pipe from the thread's spares,
            // though it let go of its pipe when a read found nothing waiting.)
            if self.bulk && !self.eof && !self.read_failed {
                #[cfg(target_os = "linux")]
                if self.start_splicing(r, w) {
                    self.give_back(slot);
                    return self.poll_spliced(cx, r, w, other_done);
                }
                if let Some(buf) = &mut self.buf
                    && buf.capacity() < BULK_BUF_SIZE
                {
                    spare::give(std::mem::replace(buf, spare::take_bulk()));
                }
            }
            if self.read_failed {
                return Poll::Ready(Err(self.read_fault));
            }
            if self.eof {
                self.give_back(slot);
                return self.pass_eof(cx, w, other_done);
            }
            if read_pending {
                return Poll::Pending;
            }
            // Read more: into the buffer, taken now if there is none. Until it is full, nothing
            // is waiting, or the EOF: after a read that left room, tokio knows the socket is
            // drained and answers the next read without a syscall, unless the peer's FIN is in;
            // then the EOF is known before the last bytes are written, and they go with the FIN
            // (`poll_write_last`).
            let buf = self
                .buf
                .get_or_insert_with(|| slot.take().unwrap_or_else(spare::take));
            // Whether the reads go to a TCP socket itself, nothing left to replay above it:
            // known before the first, then after each read (for the next).
            if self.infer_eof && self.reads_socket.is_none() {
                let under = crate::io::tcp_under(&*r);
                self.infer_eof = under.is_some();
                self.reads_socket = Some(under.is_some_and(|t| t.1));
            }
            loop {
                match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, buf) {
                    Poll::Ready(Ok(0)) => {
                        self.eof = true;
                        break;
                    }
                    Poll::Ready(Ok(_)) => {
                        if self.first.is_none() {
                            self.first = buf.first().copied();
                        }
                        if buf.len() == buf.capacity() {
                            self.bulk = true;
                            break;
                        }
                        // Room left: the socket's readiness says whether the EOF is next.
                        if self.infer_eof {
                            let under = crate::io::tcp_under(&*r);
                            let direct = self.reads_socket == Some(true);
                            self.reads_socket = Some(under.is_some_and(|t| t.1));
                            if direct && let Some((tcp, _)) = under {
                                match tcp.poll_read_ready(cx) {
                                    // A reset is no EOF: the next read reports it.
                                    Poll::Ready(Ok(())) if crate::io::error_pending(tcp) => {
                                        continue;
                                    }
                                    Poll::Ready(Ok(())) => self.eof = true,
                                    Poll::Ready(Err(_)) => self.read_failed = true,
                                    Poll::Pending => read_pending = true,
                                }
                                break;
                            }
                        }
                    }
                    Poll::Ready(Err(_)) if buf.is_empty() => {
                        return Poll::Ready(Err(self.read_fault));
                    }
                    Poll::Ready(Err(_)) => {
                        self.read_failed = true;
                        break;
                    }
                    Poll::Pending if buf.is_empty() => {
                        // Nothing waiting and nothing unwritten: an idle direction holds no buffer.
                        self.bulk = false;
                        self.give_back(slot);
                        return Poll::Pending;
                    }
                    Poll::Pending => {
                        read_pending = true;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl Pump {
    /// Takes a pipe if splicing is on and both streams are plain TCP with nothing buffered
    /// above them; `false` (go on copying) otherwise, or when no pipe can be had.
    fn start_splicing<R: 'static, W: 'static>(&mut self, r: &R, w: &W) -> bool {
        use crate::splice::{take, tcp_of};
        if !self.splice || tcp_of(r).is_none() || tcp_of(w).is_none() {
            return false;
        }
        match take() {
            Ok(pipe) => {
                self.pipe = Some((pipe, 0));
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "no pipe to splice through: copying");
                false
            }
        }
    }

    /// The direction while it splices: from the reader into the pipe, from the pipe to the
    /// writer, until a read finds nothing waiting (the empty pipe goes back to the thread),
    /// the EOF (the writer shut down as when copying) or a failure.
    fn poll_spliced<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        other_done: bool,
    ) -> Poll<Result<(), RelayEnd>>
    where
        R: 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        use crate::io::would_wait;
        use crate::splice::tcp_of;
        use tokio::io::Interest;
        let (Some(from), Some(to)) = (tcp_of(&*r), tcp_of(&*w)) else {
            // Not reached: the streams do not change type.
            return Poll::Ready(Err(self.read_fault));
        };
        while let Some((pipe, held)) = &mut self.pipe {
            if *held > 0 {
                match to.try_io(Interest::WRITABLE, || pipe.drain(to, *held)) {
                    Ok(0) => return Poll::Ready(Err(self.write_fault)),
                    Ok(n) => {
                        *held -= n;
                        self.bytes += n as u64;
                        self.unreported += n as u64;
                    }
                    Err(e) if would_wait(&e) => {
                        ready!(to.poll_write_ready(cx)).map_err(|_| self.write_fault)?;
                    }
                    Err(_) => return Poll::Ready(Err(self.write_fault)),
                }
                continue;
            }
            match from.try_io(Interest::READABLE, || pipe.fill(from)) {
                Ok(0) => {
                    self.eof = true;
                    if let Some((pipe, _)) = self.pipe.take() {
                        crate::splice::give_empty(pipe);
                    }
                }
                Ok(n) => *held = n,
                Err(e) if would_wait(&e) => match from.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(self.read_fault)),
                    Poll::Pending => {
                        // Nothing waiting: the pipe is empty; the thread keeps it (an idle
                        // tunnel holds none), this direction takes one again when woken.
                        if let Some((pipe, _)) = self.pipe.take() {
                            crate::splice::give_empty(pipe);
                        }
                        return Poll::Pending;
                    }
                },
                Err(_) => return Poll::Ready(Err(self.read_fault)),
            }
        }
        self.pass_eof(cx, w, other_done)
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            spare::give(buf);
        }
    }
}

/// Buffers let go by the relays of this thread, for the next one to take.
///
/// Every wake polls both directions, and a direction with nothing in hand takes a buffer before
/// its read can tell whether anything is waiting: most takes find nothing and give the buffer
/// straight back (six takes per one-request tunnel, two of them used). Within one poll the
/// buffer passes from one direction to the other (`Relay::poll`'s slot); between polls a few
/// per thread make each take a pop and a push, not a 16 KiB malloc and free. Idle tunnels
/// still hold none. At most [`SPARE_MAX`] per thread (256 KiB), and [`BULK_SPARE_MAX`] bulk
/// ones (256 KiB); the data plane's workers each run their relays on one thread.
mod spare {
    use std::cell::Cell;

    use bytes::BytesMut;

    use super::{BUF_SIZE, BULK_BUF_SIZE};
    use crate::spares::{Spares, pop, push};

    pub(super) const SPARE_MAX: usize = 16;
    /// Bulk buffers kept per thread (256 KiB).
    pub(super) const BULK_SPARE_MAX: usize = 4;

    thread_local! {
        static SPARE: Cell<Vec<BytesMut>> = const { Cell::new(Vec::new()) };
        static BULK_SPARE: Cell<Vec<BytesMut>> = const { Cell::new(Vec::new()) };
    }

    /// A spare buffer of this thread, or a new one: empty, [`BUF_SIZE`] bytes of room.
    pub(super) fn take() -> BytesMut {
        pop(&SPARE).unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
    }

    /// A spare bulk buffer of this thread, or a new one: empty, [`BULK_BUF_SIZE`] of room.
    pub(super) fn take_bulk() -> BytesMut {
        pop(&BULK_SPARE).unwrap_or_else(|| BytesMut::with_capacity(BULK_BUF_SIZE))
    }

    /// Keeps `buf` for a later [`take`] or [`take_bulk`] if there is room; drops it otherwise.
    pub(super) fn give(mut buf: BytesMut) {
        buf.clear();
        let (spares, max): (&'static Spares<BytesMut>, _) = match buf.capacity() {
            BUF_SIZE => (&SPARE, SPARE_MAX),
            BULK_BUF_SIZE => (&BULK_SPARE, BULK_SPARE_MAX),
            _ => return,
        };
        push(spares, buf, max);
    }

    #[cfg(test)]
    pub(super) fn count() -> usize {
        crate::spares::count(&SPARE)
    }

    #[cfg(test)]
    pub(super) fn count_bulk() -> usize {
        crate::spares::count(&BULK_SPARE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tcp_pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A relay as the gateway runs one (splicing allowed), not over TLS, idle after 5 s.
    async fn relay_5s<C, U>(client: C, upstream: U, metrics: &Metrics) -> RelayStats
    where
        C: AsyncRead + AsyncWrite + Unpin + 'static,
        U: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        relay(
            client,
            upstream,
            false,
            Duration::from_secs(5),
            true,
            metrics,
        )
        .await
    }

    /// A relay between two 64-byte pipes (5 s idle timeout): the client's and the upstream's
    /// far ends, and the relay's task.
    fn spawn_relay() -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<RelayStats>,
    ) {
        let (client, client_peer) = duplex(64);
        let (upstream, upstream_peer) = duplex(64);
        let task =
            tokio::spawn(async move { relay_5s(client, upstream, &Metrics::unregistered()).await });
        (client_peer, upstream_peer, task)
    }

    #[tokio::test]
    async fn moves_megabytes_both_ways_through_small_pipes_with_half_close() {
        // 256-byte pipes: every write fills them, so both directions keep parking on writes
        // with data in hand, and reads find nothing now and then (buffers let go and taken
        // again).
        let (client, mut client_peer) = duplex(256);
        let (upstream, mut upstream_peer) = duplex(256);
        let metrics = Metrics::unregistered();
        let task = tokio::spawn(async move {
            let stats = relay_5s(client, upstream, &metrics).await;
            let (up, down) = metrics.byte_counters();
            (stats, up.get(), down.get())
        });
        let up: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..700_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let (mut cr, mut cw) = tokio::io::split(&mut client_peer);
        let (mut ur, mut uw) = tokio::io::split(&mut upstream_peer);
        let (want_up, want_down) = (up.clone(), down.clone());
        let ((), (), got_up, got_down) = tokio::join!(
            async {
                cw.write_all(&up).await.unwrap();
                // Half-close upward: the upstream sees EOF, downward goes on.
                cw.shutdown().await.unwrap();
            },
            async {
                uw.write_all(&down).await.unwrap();
                uw.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                ur.read_to_end(&mut got).await.unwrap();
                got
            },
            async {
                let mut got = Vec::new();
                cr.read_to_end(&mut got).await.unwrap();
                got
            },
        );
        assert!(got_up == want_up, "upward bytes differ");
        assert!(got_down == want_down, "downward bytes differ");
        let (stats, up_total, down_total) = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Closed);
        assert_eq!((stats.bytes_up, stats.bytes_down), (1_000_000, 700_000));
        // The global counters got every byte (in steps and at the end).
        assert_eq!((up_total, down_total), (1_000_000, 700_000));
    }

    /// The upstream's last bytes and its EOF, both waiting when the relay reads: the EOF is
    /// read before the bytes are written, so that they go to the client with its FIN (in one
    /// segment). Bytes whose EOF comes later go at once.
    #[tokio::test]
    async fn the_last_bytes_go_with_the_fin() {
        async fn run(eof_waiting: bool) -> usize {
            let (near, mut far) = tcp_pair().await;
            let client = crate::io::Rewind::new(bytes::Bytes::new(), near);
            let (upstream, mut upstream_peer) = duplex(64);
            upstream_peer.write_all(b"bye").await.unwrap();
            if eof_waiting {
                upstream_peer.shutdown().await.unwrap();
            }
            crate::io::HELD_FOR_FIN.with(|held| held.set(0));
            let metrics = Metrics::unregistered();
            let relay = relay_5s(client, upstream, &metrics);
            let peers = async {
                let mut got = [0u8; 3];
                far.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"bye");
                upstream_peer.shutdown().await.unwrap();
                let mut rest = Vec::new();
                far.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                far.shutdown().await.unwrap();
            };
            let (stats, ()) = tokio::join!(relay, peers);
            assert_eq!(stats.end, RelayEnd::Closed);
            crate::io::HELD_FOR_FIN.with(|held| held.get())
        }
        assert_eq!(run(true).await, 3);
        assert_eq!(run(false).await, 0);
    }

    /// Bytes read just before a failing read still reach the other side; the failure ends the
    /// relay after them.
    #[tokio::test]
    async fn bytes_before_a_reset_are_passed_on() {
        let (client, mut client_peer) = duplex(64);
        let upstream = tokio_test::io::Builder::new()
            .read(b"data")
            .read_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
            .build();
        let metrics = Metrics::unregistered();
        let stats = relay_5s(client, upstream, &metrics).await;
        assert_eq!(stats.end, RelayEnd::UpstreamError);
        assert_eq!(stats.bytes_down, 4);
        let mut got = [0u8; 4];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"data");
    }

    /// A stream that counts its shutdowns.
    struct Shutdowns<S> {
        inner: S,
        count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Shutdowns<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Shutdowns<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Runs a relay where one side's EOF comes before the other's; answers (client
    /// shutdowns, upstream shutdowns) and checks each peer saw every byte and its EOF.
    async fn shutdowns_when(client_first: bool, upstream_tls: bool) -> (usize, usize) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (client, mut client_peer) = duplex(64);
        let (upstream, mut upstream_peer) = duplex(64);
        let (c, u) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let client = Shutdowns {
            inner: client,
            count: Arc::clone(&c),
        };
        let upstream = Shutdowns {
            inner: upstream,
            count: Arc::clone(&u),
        };
        let task = tokio::spawn(async move {
            relay(
                client,
                upstream,
                upstream_tls,
                Duration::from_secs(5),
                true,
                &Metrics::unregistered(),
            )
            .await
        });
        let (first, second) = if client_first {
            (&mut client_peer, &mut upstream_peer)
        } else {
            (&mut upstream_peer, &mut client_peer)
        };
        first.write_all(b"one").await.unwrap();
        first.shutdown().await.unwrap();
        let mut got = Vec::new();
        second.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"one");
        second.write_all(b"two").await.unwrap();
        second.shutdown().await.unwrap();
        let mut got = Vec::new();
        first.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"two");
        assert_eq!(task.await.unwrap().end, RelayEnd::Closed);
        (c.load(Ordering::Relaxed), u.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn the_side_that_ends_last_is_closed_not_shut_down_unless_tls() {
        // Client's EOF first: the upstream is shut down, the relay goes on; the upstream's EOF
        // then ends it and the client's close passes it on (the peer above read its EOF).
        assert_eq!(shutdowns_when(true, false).await, (0, 1));
        // The other way round.
        assert_eq!(shutdowns_when(false, false).await, (1, 0));
        // An upstream over TLS is always shut down: that sends its close_notify.
        assert_eq!(shutdowns_when(false, true).await, (1, 1));
        assert_eq!(shutdowns_when(true, true).await, (0, 1));
    }

    #[tokio::test]
    async fn a_tls_handshake_answered_by_an_alert_is_seen() {
        let (mut client_peer, mut upstream_peer, task) = spawn_relay();
        // A ClientHello's record header, answered by a fatal handshake_failure alert.
        client_peer.write_all(&[0x16, 3, 1, 0, 1, 1]).await.unwrap();
        let mut hello = [0u8; 6];
        upstream_peer.read_exact(&mut hello).await.unwrap();
        upstream_peer
            .write_all(&[0x15, 3, 3, 0, 2, 2, 0x28])
            .await
            .unwrap();
        drop(upstream_peer);
        let mut alert = Vec::new();
        client_peer.read_to_end(&mut alert).await.unwrap();
        drop(client_peer);
        let stats = task.await.unwrap();
        assert_eq!((stats.first_up, stats.first_down), (Some(0x16), Some(0x15)));
        assert!(stats.tls_refused());
        let served = RelayStats {
            first_down: Some(0x16),
            ..stats
        };
        assert!(!served.tls_refused());
    }

    #[tokio::test]
    async fn a_failing_side_ends_the_relay_with_its_name() {
        let (client_peer, mut upstream_peer, task) = spawn_relay();
        upstream_peer.write_all(b"hello").await.unwrap();
        // The client is gone: writing to it fails.
        drop(client_peer);
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::ClientError);
    }

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (mut client_peer, mut upstream_peer, task) = spawn_relay();
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
            false,
            Duration::from_secs(300),
            true,
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
                false,
                Duration::from_secs(10),
                true,
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

    /// The watchdog is polled again only when the relay's waker changes: a relay polled by
    /// another waker than before (moved under a `select!`, say) is still woken when it idles.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_wakes_the_waker_of_the_latest_poll() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::task::{Context, Wake, Waker};

        #[derive(Default)]
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (client, _client_peer) = duplex(64);
        let (upstream, _upstream_peer) = duplex(64);
        let metrics = Metrics::unregistered();
        let mut relaying = std::pin::pin!(relay(
            client,
            upstream,
            false,
            Duration::from_secs(10),
            true,
            &metrics
        ));
        let (first, second) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
        let (w1, w2) = (
            Waker::from(Arc::clone(&first)),
            Waker::from(Arc::clone(&second)),
        );
        assert!(
            relaying
                .as_mut()
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        assert!(
            relaying
                .as_mut()
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        assert!(
            relaying
                .as_mut()
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            second.0.load(Ordering::SeqCst),
            "the latest waker was not woken"
        );
        assert!(!first.0.load(Ordering::SeqCst));
        let end = relaying.as_mut().poll(&mut Context::from_waker(&w2));
        assert!(matches!(end, Poll::Ready(ref s) if s.end == RelayEnd::Idle));
    }

    #[test]
    fn spare_buffers_are_reused_and_bounded() {
        // A test thread of its own: its spares start empty.
        assert_eq!(spare::count(), 0);
        let buf = spare::take();
        assert!(buf.is_empty());
        assert_eq!(buf.capacity(), BUF_SIZE);
        let at = buf.as_ptr();
        let mut used = buf;
        used.extend_from_slice(b"left over");
        spare::give(used);
        assert_eq!(spare::count(), 1);
        let again = spare::take();
        assert_eq!(again.as_ptr(), at, "the spare was not taken");
        assert!(again.is_empty(), "a spare comes back empty");
        assert_eq!(spare::count(), 0);
        // A buffer of another size is not kept.
        spare::give(BytesMut::with_capacity(100));
        assert_eq!(spare::count(), 0);
        // At most SPARE_MAX are kept.
        let many: Vec<BytesMut> = (0..spare::SPARE_MAX + 5).map(|_| spare::take()).collect();
        for buf in many {
            spare::give(buf);
        }
        assert_eq!(spare::count(), spare::SPARE_MAX);
        drop(again);
        // Bulk buffers go to their own spares, bounded too.
        assert_eq!(spare::count_bulk(), 0);
        let bulk: Vec<BytesMut> = (0..spare::BULK_SPARE_MAX + 2)
            .map(|_| spare::take_bulk())
            .collect();
        assert!(bulk.iter().all(|b| b.capacity() == BULK_BUF_SIZE));
        for buf in bulk {
            spare::give(buf);
        }
        assert_eq!(spare::count_bulk(), spare::BULK_SPARE_MAX);
        assert_eq!(spare::count(), spare::SPARE_MAX);
    }

    #[tokio::test]
    async fn relays_give_their_buffers_back_to_the_thread() {
        // One thread (the test's current-thread runtime) and a fresh set of spares: a relay
        // that parks again and again on 64-byte pipes takes and lets go of buffers all the
        // time, but never holds more than one per direction, and leaves them all as spares.
        assert_eq!(spare::count(), 0);
        let (client, mut client_peer) = duplex(64);
        let (upstream, mut upstream_peer) = duplex(64);
        let metrics = Metrics::unregistered();
        let relay = relay_5s(client, upstream, &metrics);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let peers = async {
            // Chunks that fit the pipe: written at once, then read back through the relay.
            for chunk in data.chunks(50) {
                client_peer.write_all(chunk).await.unwrap();
                let mut got = vec![0u8; chunk.len()];
                upstream_peer.read_exact(&mut got).await.unwrap();
                assert_eq!(got, chunk);
                // Idle between chunks: both directions let their buffers go.
                tokio::task::yield_now().await;
                assert!(spare::count() >= 1);
            }
            drop(client_peer);
            drop(upstream_peer);
        };
        let (stats, ()) = tokio::join!(relay, peers);
        assert_eq!(stats.bytes_up, 100_000);
        let n = spare::count();
        assert!((1..=2).contains(&n), "{n} spares after one relay");
        // No read filled a buffer: no bulk buffer was taken.
        assert_eq!(spare::count_bulk(), 0);
    }

    /// Four megabytes down and a few bytes up between two real TCP connections, spliced or
    /// copied: the same bytes arrive, in order, each EOF passed on.
    async fn tcp_transfer(splice: bool) -> RelayStats {
        let (client, mut client_peer) = tcp_pair().await;
        let (upstream, mut upstream_peer) = tcp_pair().await;
        let client = crate::io::Rewind::new(bytes::Bytes::from_static(b"hi"), client);
        let metrics = Metrics::unregistered();
        let relay = relay(
            client,
            upstream,
            false,
            Duration::from_secs(5),
            splice,
            &metrics,
        );
        let body: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let upstream_side = async {
            upstream_peer.write_all(&body).await.unwrap();
            upstream_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream_peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hi there");
        };
        let client_side = async {
            client_peer.write_all(b" there").await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            client_peer.read_to_end(&mut got).await.unwrap();
            assert!(got == body, "the body arrived changed");
        };
        let (stats, (), ()) = tokio::join!(relay, upstream_side, client_side);
        assert_eq!(stats.end, RelayEnd::Closed);
        assert_eq!((stats.bytes_up, stats.bytes_down), (8, 4 << 20));
        stats
    }

    /// The upstream's bytes in two parts, the second with its FIN, each read apart (a
    /// current-thread runtime, as the data plane's): the EOF known from the socket's readiness
    /// after the second part loses no byte, and a part alone is not taken for the end.
    #[tokio::test]
    async fn an_eof_known_from_readiness_loses_nothing() {
        let (client, mut client_peer) = tcp_pair().await;
        let (upstream, mut upstream_peer) = tcp_pair().await;
        let metrics = Metrics::unregistered();
        let relay = relay_5s(
            crate::io::Rewind::new(bytes::Bytes::new(), client),
            upstream,
            &metrics,
        );
        let peers = async {
            upstream_peer.write_all(b"first part, ").await.unwrap();
            let mut got = [0u8; 12];
            client_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"first part, ");
            upstream_peer.write_all(b"second part").await.unwrap();
            upstream_peer.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client_peer.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"second part");
            client_peer.shutdown().await.unwrap();
            let mut up = Vec::new();
            upstream_peer.read_to_end(&mut up).await.unwrap();
            assert!(up.is_empty());
        };
        let (stats, ()) = tokio::join!(relay, peers);
        assert_eq!(stats.end, RelayEnd::Closed);
        assert_eq!(stats.bytes_down, 23);
    }

    /// Bytes, then a reset, both in before the relay reads: the reset is reported as the
    /// upstream's failure after the bytes, not taken for an EOF from the socket's readiness.
    #[tokio::test]
    async fn a_reset_after_bytes_is_a_failure_not_an_eof() {
        let (client, mut client_peer) = tcp_pair().await;
        let (upstream, upstream_peer) = tcp_pair().await;
        let upstream_peer = upstream_peer.into_std().unwrap();
        std::io::Write::write_all(&mut &upstream_peer, b"partial").unwrap();
        socket2::SockRef::from(&upstream_peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(upstream_peer);
        // The reactor sees the bytes and the reset (ready, hung up, in error) first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let metrics = Metrics::unregistered();
        let client = crate::io::Rewind::new(bytes::Bytes::new(), client);
        let stats = relay_5s(client, upstream, &metrics).await;
        assert_eq!(stats.end, RelayEnd::UpstreamError);
        assert_eq!(stats.bytes_down, 7);
        let mut got = [0u8; 7];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"partial");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn bulk_between_tcp_sockets_is_spliced_and_arrives_whole() {
        // The test's own thread: no pipe kept yet. The download fills a buffer, moves to a
        // pipe, and the pipe is kept for the next once the EOF came.
        assert_eq!(crate::splice::kept(), 0);
        tcp_transfer(true).await;
        assert_eq!(crate::splice::kept(), 1, "no pipe was used");
        // Off: copied, no pipe taken.
        tcp_transfer(false).await;
        assert_eq!(crate::splice::kept(), 1);
    }

    #[tokio::test]
    async fn a_direction_that_fills_its_buffer_moves_to_a_bulk_one() {
        // The test's own thread, spares empty. A megabyte waiting upstream: the first read
        // fills its 16 KiB, the next ones read 64 KiB.
        assert_eq!(spare::count_bulk(), 0);
        let (client, mut client_peer) = duplex(1 << 21);
        let (upstream, mut upstream_peer) = duplex(1 << 21);
        let body: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        upstream_peer.write_all(&body).await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        client_peer.shutdown().await.unwrap();
        let metrics = Metrics::unregistered();
        let relay = relay_5s(client, upstream, &metrics);
        let peer = async {
            let mut got = Vec::new();
            client_peer.read_to_end(&mut got).await.unwrap();
            got
        };
        let (stats, got) = tokio::join!(relay, peer);
        assert!(got == body, "the body arrived changed");
        assert_eq!(stats.bytes_down, 1 << 20);
        assert_eq!(stats.end, RelayEnd::Closed);
        // The bulk buffer went back to the thread with the relay's end.
        assert_eq!(spare::count_bulk(), 1);
    }
}
