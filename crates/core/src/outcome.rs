//! [`Outcome`]: what one attempt through one upstream measured. The gateway fills it, the pool
//! turns it into live stats (and, with the reputation work, a score).

use std::time::Duration;

use crate::ErrorKind;

/// The measurement of one attempt through one upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// TCP (and TLS) connect time to the upstream.
    pub connect: Option<Duration>,
    /// Time for the upstream's proxy handshake (CONNECT reply, SOCKS reply).
    pub handshake: Option<Duration>,
    /// Time from the request sent to the first byte back from the target.
    pub first_byte: Option<Duration>,
    /// Bytes from the client to the target.
    pub bytes_up: u64,
    /// Bytes from the target to the client.
    pub bytes_down: u64,
    /// `None` on success.
    pub error: Option<ErrorKind>,
}

impl Outcome {
    pub fn failed(error: ErrorKind) -> Self {
        Self {
            error: Some(error),
            ..Self::default()
        }
    }
}
