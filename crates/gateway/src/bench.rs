//! Entry points of the criterion benches (`benches/`), not an API: the two heads of every
//! tunnel through an HTTP upstream, each read as the data plane reads it, and the upstream's
//! reply by httparse alone beside it (what the short way of `head.rs` is kept for).

use std::sync::OnceLock;

use crate::Config;
use crate::http::{ConnectHead, HeadLimits};

/// The default limits, built once (a whole default config is not what is measured).
fn limits() -> HeadLimits {
    static LIMITS: OnceLock<HeadLimits> = OnceLock::new();
    *LIMITS.get_or_init(|| HeadLimits::of(&Config::default().server))
}

/// A client's CONNECT head read and checked as the server does, within the default limits:
/// the head's length.
pub fn connect_head(head: &[u8]) -> Option<usize> {
    ConnectHead::parse(head, limits()).ok().map(|c| c.len)
}

/// An HTTP upstream's reply to CONNECT as the dialer reads it (the short way, httparse for
/// anything else): its status and the head's length.
pub fn reply_head(buf: &[u8]) -> Option<(u16, usize)> {
    match crate::head::reply(buf) {
        Ok(httparse::Status::Complete(reply)) => Some(reply),
        _ => None,
    }
}

/// The same reply read by httparse alone.
pub fn reply_head_general(buf: &[u8]) -> Option<(u16, usize)> {
    crate::head::httparse_reply(buf)
}
