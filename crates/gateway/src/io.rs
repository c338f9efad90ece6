//! Stream plumbing: [`Rewind`] replays bytes already read (first-byte detection, a request head
//! read ahead, a SOCKS handshake buffered), [`Fresh`] writes to a new connection before the
//! reactor knows it, and [`BoxedIo`] erases the stream type so a tunnel through TCP, TLS or a
//! SOCKS wrapper is one type.

use std::any::{Any, TypeId};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Any bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The stream as its own type, for the relay to find a TCP socket under a boxed stream
    /// (`splice::tcp_of`).
    fn as_any(&self) -> &dyn Any;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A boxed stream: TCP, TLS over TCP, a SOCKS tunnel...
pub type BoxedIo = Box<dyn Io>;

/// A stream that first yields `prefix`, then reads from `inner`. Writes go straight through.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// Every byte of the prefix has been read: reads go straight to the inner stream.
    pub fn replayed(&self) -> bool {
        self.prefix.is_empty()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The bytes not yet replayed.
    pub fn unread(&self) -> &[u8] {
        &self.prefix
    }

    /// The bytes not yet replayed, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An advanced-to-empty `Bytes` still holds its whole buffer (the first read's
                // 4 KiB, say) for as long as the stream lives: a tunnel's whole life.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connected TCP stream that is registered with the runtime's reactor only when it first has
/// to wait.
///
/// A tokio socket knows nothing of its readiness until epoll has reported it, so the first
/// write to a socket registered right after its connect waits for a trip through the event
/// loop, though the kernel would take the bytes at once. `Fresh` sends directly until a send
/// would block or a read comes (a reply always has to be waited for): the request that opens
/// a tunnel, a SOCKS greeting, a TLS ClientHello go out without that trip.
#[derive(Debug)]
pub struct Fresh(State);

#[derive(Debug)]
enum State {
    Raw(socket2::Socket),
    Registered(tokio::net::TcpStream),
    /// Registration failed; the error was returned.
    Lost,
}

impl Fresh {
    /// `socket`: connected and non-blocking.
    pub fn new(socket: socket2::Socket) -> Self {
        Fresh(State::Raw(socket))
    }

    /// A stream already registered.
    pub fn registered(stream: tokio::net::TcpStream) -> Self {
        Fresh(State::Registered(stream))
    }

    /// The stream, if it is registered already.
    pub(crate) fn as_registered(&self) -> Option<&TcpStream> {
        match &self.0 {
            State::Registered(s) => Some(s),
            _ => None,
        }
    }

    /// The registered stream, registering it now if need be.
    fn stream(&mut self) -> io::Result<&mut tokio::net::TcpStream> {
        if matches!(self.0, State::Raw(_))
            && let State::Raw(socket) = std::mem::replace(&mut self.0, State::Lost)
        {
            self.0 = State::Registered(tokio::net::TcpStream::from_std(socket.into())?);
        }
        match &mut self.0 {
            State::Registered(s) => Ok(s),
            _ => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the socket could not be registered",
            )),
        }
    }
}

/// The TCP socket a relay stream reads from and writes to directly, if it is one: a
/// `TcpStream`, a registered [`Fresh`] connection, a [`Rewind`] of either (or of a `Rewind`),
/// or a boxed stream of these; and whether a `Rewind` has replayed all its bytes (until then
/// reads do not reach the socket; writes always do). Anything else (TLS, a test pipe) is
/// `None`.
///
/// The relay is generic over its streams; the plain TCP ones are told apart by type, which the
/// compiler resolves for each type (inlined: no call, no comparison left at run time) but a
/// boxed one, whose stream is looked up once through its vtable ([`tcp_under_dyn`]). As a call
/// on `&dyn Any` for every type, it cost ~85 instructions each time, four times per tunnel.
#[inline]
pub(crate) fn tcp_under<T: Any>(stream: &T) -> Option<(&TcpStream, bool)> {
    let any: &dyn Any = stream;
    let ty = TypeId::of::<T>();
    if ty == TypeId::of::<Box<dyn Io>>() {
        return any
            .downcast_ref::<Box<dyn Io>>()
            .and_then(|boxed| tcp_under_dyn(boxed.as_ref().as_any()));
    }
    if ty == TypeId::of::<TcpStream>()
        || ty == TypeId::of::<Fresh>()
        || ty == TypeId::of::<Rewind<TcpStream>>()
        || ty == TypeId::of::<Rewind<Rewind<TcpStream>>>()
    {
        return tcp_under_dyn(any);
    }
    None
}

/// [`tcp_under`] for a stream known only at run time (a boxed one's): the usual upstream
/// stream, a [`Fresh`] connection, is tried first.
fn tcp_under_dyn(stream: &dyn Any) -> Option<(&TcpStream, bool)> {
    if let Some(fresh) = stream.downcast_ref::<Fresh>() {
        return fresh.as_registered().map(|tcp| (tcp, true));
    }
    if let Some(tcp) = stream.downcast_ref::<TcpStream>() {
        return Some((tcp, true));
    }
    if let Some(rewind) = stream.downcast_ref::<Rewind<TcpStream>>() {
        return Some((&rewind.inner, rewind.replayed()));
    }
    if let Some(rewind) = stream.downcast_ref::<Rewind<Rewind<TcpStream>>>() {
        let inner = &rewind.inner;
        return Some((&inner.inner, rewind.replayed() && inner.replayed()));
    }
    if let Some(boxed) = stream.downcast_ref::<Box<dyn Io>>() {
        // A box in a box (a SOCKS upstream's stream after its handshake).
        return tcp_under_dyn(boxed.as_ref().as_any());
    }
    None
}

/// The socket has an error to report (a reset): `EPOLLERR` came with its hang-up. Asked of a
/// socket about to be taken as at its EOF, which a reset must not be: a read reports it.
pub(crate) fn error_pending(tcp: &TcpStream) -> bool {
    // tokio's readiness for `ERROR` as it stands, without a syscall or a waiter (`try_io`
    // runs the closure only if it is set; `ready(Interest::ERROR)` registered and dropped a
    // waiter: ~280 instructions per tunnel).
    tcp.try_io(Interest::ERROR, || Ok(())).is_ok()
}

/// Writes `buf`, the last bytes `w` carries before its FIN (its shutdown or close follows at
/// once). On a TCP socket they go with `MSG_MORE`: the kernel holds them for the FIN and sends
/// both in one segment, where a plain send would push the data at once (`TCP_NODELAY`) and the
/// FIN after it in a segment of its own, which the peer acknowledges apart. At the end of every
/// tunnel whose far side closes first, one loopback segment (and the kernel's work for it, on
/// both ends) fewer: 34.0 -> 33.05 segments per one-request CONNECT tunnel over all four hops,
/// as through HAProxy, which does the same. Other streams (TLS, test pipes) write as
/// usual ([`tcp_under`]).
pub(crate) fn poll_write_last<W: AsyncWrite + Unpin + 'static>(
    w: &mut W,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    if let Some((s, _)) = tcp_under(&*w) {
        // Only where tokio counts the socket writable; anything else goes the usual way, which
        // waits for it.
        match s.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(s).send_with_flags(buf, SEND_FLAGS | libc::MSG_MORE)
        }) {
            Err(e) if would_wait(&e) => {}
            done => {
                #[cfg(test)]
                if let Ok(n) = &done {
                    HELD_FOR_FIN.with(|held| held.set(held.get() + n));
                }
                return Poll::Ready(done);
            }
        }
    }
    Pin::new(w).poll_write(cx, buf)
}

#[cfg(test)]
thread_local! {
    /// Bytes [`poll_write_last`] sent with `MSG_MORE` on this thread.
    pub(crate) static HELD_FOR_FIN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `send(2)` flags for a direct write: never a SIGPIPE.
pub(crate) const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;

/// A direct (non-blocking) send or read that has to wait for readiness, then go through the
/// reactor.
pub(crate) fn would_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl AsyncRead for Fresh {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = self.get_mut().stream()?;
        Pin::new(s).poll_read(cx, buf)
    }
}

impl AsyncWrite for Fresh {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Raw(socket) = &this.0 {
            match socket.send_with_flags(buf, SEND_FLAGS) {
                Err(e) if would_wait(&e) => {}
                done => return Poll::Ready(done),
            }
        }
        Pin::new(this.stream()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Raw(socket) = &this.0 {
            match socket.send_vectored_with_flags(bufs, SEND_FLAGS) {
                Err(e) if would_wait(&e) => {}
                done => return Poll::Ready(done),
            }
        }
        Pin::new(this.stream()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            State::Registered(s) => Pin::new(s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = self.get_mut().stream()?;
        Pin::new(s).poll_shutdown(cx)
    }
}

/// A connected pair over loopback (near, far), both ends `TCP_NODELAY` as the gateway's are.
#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "tests: a failed step must fail the test loudly"
)]
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (far, _) = listener.accept().await.unwrap();
    near.set_nodelay(true).unwrap();
    far.set_nodelay(true).unwrap();
    (near, far)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The last bytes wait in the kernel for the FIN (one segment for both), through each
    /// kind of TCP stream the relay writes to, and arrive with it.
    #[tokio::test]
    async fn the_last_bytes_wait_for_the_fin() {
        async fn check<W: AsyncWrite + Unpin + 'static>(
            mut w: W,
            far: &mut TcpStream,
            finish: impl FnOnce(W) -> Option<W>,
        ) {
            // A write tokio counts writable: once it has seen the socket writable.
            let sent = std::time::Instant::now();
            let n = std::future::poll_fn(|cx| poll_write_last(&mut w, cx, b"last"))
                .await
                .unwrap();
            assert_eq!(n, 4);
            // A plain send with TCP_NODELAY would be in by now (loopback delivers as it sends).
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut got = [0u8; 8];
            let early = far.try_read(&mut got);
            // The kernel sends held bytes after ~200 ms without a FIN: a test thread held up
            // that long has nothing to tell.
            if sent.elapsed() < Duration::from_millis(150) {
                assert!(
                    matches!(early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                    "the last bytes went before the FIN"
                );
            }
            // Shut down, or closed (None).
            let _open = finish(w);
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"last");
        }
        fn shut(s: &TcpStream) {
            socket2::SockRef::from(s)
                .shutdown(std::net::Shutdown::Write)
                .unwrap();
        }
        let (near, mut far) = tcp_pair().await;
        near.writable().await.unwrap();
        check(near, &mut far, |w| {
            shut(&w);
            Some(w)
        })
        .await;
        let (near, mut far) = tcp_pair().await;
        near.writable().await.unwrap();
        check(Rewind::new(Bytes::new(), near), &mut far, |w| {
            shut(&w.inner);
            Some(w)
        })
        .await;
        // An upstream's stream, boxed.
        let (near, mut far) = tcp_pair().await;
        near.writable().await.unwrap();
        let boxed: BoxedIo = Box::new(Fresh::registered(near));
        check(boxed, &mut far, |_| None).await;
        // Closing sends the FIN as a shutdown does.
        let (near, mut far) = tcp_pair().await;
        near.writable().await.unwrap();
        let w = Rewind::new(Bytes::new(), Rewind::new(Bytes::new(), near));
        check(w, &mut far, |_| None).await;
    }

    #[tokio::test]
    async fn replays_prefix_then_inner() {
        let inner = tokio_test::io::Builder::new()
            .read(b" world")
            .write(b"ok")
            .build();
        let mut s = Rewind::new(Bytes::from_static(b"hello"), inner);
        let mut out = [0u8; 11];
        s.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"hello world");
        s.write_all(b"ok").await.unwrap();
    }

    #[tokio::test]
    async fn lets_go_of_the_prefix_buffer_once_replayed() {
        let buffer = Bytes::from(vec![7u8; 4096]);
        let mut s = Rewind::new(buffer.slice(..3), tokio_test::io::Builder::new().build());
        assert!(!buffer.is_unique());
        let mut out = [0u8; 3];
        s.read_exact(&mut out).await.unwrap();
        assert!(
            buffer.is_unique(),
            "the replayed prefix still holds its buffer"
        );
    }

    /// Writes go out directly until a read; then the stream is an ordinary registered one.
    #[tokio::test]
    async fn a_fresh_stream_writes_directly_then_registers_to_read() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.connect(&l.local_addr().unwrap().into()).unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut s = Fresh::new(sock);
        let (mut peer, _) = l.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let n = s
            .write_vectored(&[io::IoSlice::new(b", "), io::IoSlice::new(b"you")])
            .await
            .unwrap();
        assert_eq!(n, 5);
        assert!(
            matches!(s.0, State::Raw(_)),
            "registered before it had to wait"
        );
        let mut got = [0u8; 10];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello, you");
        peer.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        assert!(matches!(s.0, State::Registered(_)));
        s.write_all(b"!").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"!");
    }
}
