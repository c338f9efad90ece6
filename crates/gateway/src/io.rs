//! Stream plumbing: [`Rewind`] replays bytes already read (first-byte detection, a request head
//! read ahead, a SOCKS handshake buffered), and [`BoxedIo`] erases the stream type so a tunnel
//! through TCP, TLS or a SOCKS wrapper is one type.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
}
