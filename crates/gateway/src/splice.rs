//! Bulk transfers between two TCP sockets through a pipe (`splice(2)`, Linux): the bytes move
//! from one socket's receive queue to the other's send queue by page reference, never copied
//! into the process and back (`server.splice`).
//!
//! The relay copies through a buffer until a read fills one (data comes faster than it is
//! passed on); then, where both of a direction's streams are plain TCP with nothing buffered
//! above them, it splices from then on. A pipe costs two descriptors, so a direction holds one
//! only while bytes move: whenever a read finds nothing waiting, the empty pipe goes back to
//! the thread (an idle tunnel holds none), a few are kept there, and the direction takes one
//! again when it is woken.

use std::any::Any;
use std::io;
use std::os::fd::OwnedFd;

use tokio::net::TcpStream;

use crate::io::tcp_under;

/// Bytes one splice moves into the pipe at most: a pipe's default capacity (16 pages).
pub(crate) const CHUNK: usize = 64 * 1024;

/// Empty pipes kept per thread.
const PIPES_MAX: usize = 8;

/// A pipe's two ends.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        Ok(Pipe { read, write })
    }

    /// Moves up to [`CHUNK`] bytes waiting on `from` into the (empty) pipe. `Ok(0)`: `from`
    /// reached EOF.
    pub(crate) fn fill(&self, from: &TcpStream) -> io::Result<usize> {
        Ok(rustix::pipe::splice(
            from,
            None,
            &self.write,
            None,
            CHUNK,
            flags(),
        )?)
    }

    /// Moves up to `len` bytes from the pipe to `to`. A peer gone makes it `EPIPE` (and a
    /// SIGPIPE, which Rust programs ignore from the start).
    pub(crate) fn drain(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        Ok(rustix::pipe::splice(
            &self.read,
            None,
            to,
            None,
            len,
            flags(),
        )?)
    }
}

fn flags() -> rustix::pipe::SpliceFlags {
    rustix::pipe::SpliceFlags::MOVE | rustix::pipe::SpliceFlags::NONBLOCK
}

std::thread_local! {
    static PIPES: std::cell::Cell<Vec<Pipe>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty pipe of this thread's, or a new one.
pub(crate) fn take() -> io::Result<Pipe> {
    match crate::spares::pop(&PIPES) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Keeps an empty pipe for the next [`take`] on this thread, if there is room. A pipe that may
/// hold bytes must be dropped instead: they would reach another connection.
pub(crate) fn give_empty(pipe: Pipe) {
    crate::spares::push(&PIPES, pipe, PIPES_MAX);
}

#[cfg(test)]
pub(crate) fn kept() -> usize {
    crate::spares::count(&PIPES)
}

/// The TCP socket under a relay stream whose reads reach it directly ([`tcp_under`]: nothing
/// left to replay above it); anything else is copied.
#[inline]
pub(crate) fn tcp_of<T: Any>(stream: &T) -> Option<&TcpStream> {
    tcp_under(stream).and_then(|(tcp, replayed)| replayed.then_some(tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Fresh, Io, Rewind};
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn tcp_is_found_under_the_stream_types_the_relay_gets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = || async { TcpStream::connect(addr).await.unwrap() };
        assert!(tcp_of(&tcp().await).is_some());
        assert!(tcp_of(&Fresh::registered(tcp().await)).is_some());
        let boxed: Box<dyn Io> = Box::new(Fresh::registered(tcp().await));
        assert!(tcp_of(&boxed).is_some());
        // A SOCKS upstream after its handshake: the dialled stream, boxed again.
        let socks: Box<dyn Io> = Box::new(boxed);
        assert!(tcp_of(&socks).is_some());
        assert!(tcp_of(&Rewind::new(Bytes::new(), tcp().await)).is_some());
        let twice = Rewind::new(Bytes::new(), Rewind::new(Bytes::new(), tcp().await));
        assert!(tcp_of(&twice).is_some());
        // Bytes to replay first: not until they are read.
        let (_far, _) = listener.accept().await.unwrap();
        let mut pending = Rewind::new(Bytes::from_static(b"x"), tcp().await);
        assert!(tcp_of(&pending).is_none());
        let mut one = [0u8; 1];
        pending.read_exact(&mut one).await.unwrap();
        assert!(tcp_of(&pending).is_some());
        let inner_pending = Rewind::new(
            Bytes::new(),
            Rewind::new(Bytes::from_static(b"x"), tcp().await),
        );
        assert!(tcp_of(&inner_pending).is_none());
        // Not TCP: copied.
        let (pipe, _other) = tokio::io::duplex(64);
        assert!(tcp_of(&pipe).is_none());
        let boxed: Box<dyn Io> = Box::new(tokio::io::duplex(64).0);
        assert!(tcp_of(&boxed).is_none());
    }

    #[test]
    fn pipes_are_kept_per_thread_and_bounded() {
        assert_eq!(kept(), 0);
        let pipes: Vec<Pipe> = (0..PIPES_MAX + 2).map(|_| take().unwrap()).collect();
        for p in pipes {
            give_empty(p);
        }
        assert_eq!(kept(), PIPES_MAX);
        let _p = take().unwrap();
        assert_eq!(kept(), PIPES_MAX - 1);
    }
}
