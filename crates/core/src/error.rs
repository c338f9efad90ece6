//! [`ErrorKind`] and [`Side`]: the closed set of reasons an attempt fails, and whose fault it was.
//!
//! Every crate's error type maps onto a kind; the kind chooses the client-facing reply (HTTP
//! status and `Proxy-Status` error, SOCKS reply code) and the metric label. Labels are static
//! strings: never an error's `to_string()`.

/// Whose fault a failure was. Only [`Side::Upstream`] failures count against an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client sent something we cannot serve, or went away.
    Client,
    /// The upstream proxy failed us (refused, timed out, broke the protocol, rejected our
    /// credentials).
    Upstream,
    /// The destination failed, as reported by a working upstream (refused, unreachable).
    Target,
    /// Our own policy or state (no upstream available, limits).
    Internal,
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The client's request could not be parsed.
    ClientMalformed,
    /// The client's request head exceeded the size limit.
    ClientHeaderTooLarge,
    /// The client's request target (URI) exceeded its limit.
    ClientUriTooLong,
    /// The client's address holds as many connections as it may.
    ClientConnectionLimit,
    /// The client did not send a complete request head in time.
    ClientTimeout,
    /// The client asked for something we do not do (SOCKS BIND, UDP ASSOCIATE...).
    ClientUnsupported,
    /// The client failed authentication, or is not allowed.
    ClientAuth,
    /// The client closed the connection.
    ClientClosed,
    /// The client's routing hints are invalid (unknown hint, bad value).
    RouteInvalid,
    /// The client asked for a tunnel to a port the policy does not allow
    /// (`server.connect_ports`).
    DestinationPort,
    /// The client asked for a loopback, private, link-local... destination
    /// (`allow_private_networks` is off).
    DestinationPrivate,
    /// TCP connect to the upstream was refused or reset.
    UpstreamConnectRefused,
    /// TCP connect to the upstream timed out.
    UpstreamConnectTimeout,
    /// The upstream did not finish its handshake in time.
    UpstreamHandshakeTimeout,
    /// The upstream spoke its protocol wrongly, or closed mid-handshake.
    UpstreamProtocol,
    /// The upstream rejected our credentials.
    UpstreamAuth,
    /// The upstream refused to serve (e.g. HTTP 403/503 to CONNECT, SOCKS "not allowed").
    UpstreamRefused,
    /// TLS to an HTTPS upstream failed.
    UpstreamTls,
    /// The upstream connection failed after the handshake (reset, broken pipe).
    UpstreamIo,
    /// The upstream reported the destination refused the connection.
    TargetRefused,
    /// The upstream reported the destination unreachable or its name unresolvable.
    TargetUnreachable,
    /// The upstream reported the destination timed out.
    TargetTimeout,
    /// No upstream is available for this request.
    NoUpstream,
    /// Every attempt failed, or the retry deadline passed.
    RetriesExhausted,
    /// Something went wrong inside the gateway.
    Internal,
}

impl ErrorKind {
    /// Every kind, in declaration order (metrics create one series per kind up front).
    pub const ALL: [ErrorKind; 25] = [
        Self::ClientMalformed,
        Self::ClientHeaderTooLarge,
        Self::ClientUriTooLong,
        Self::ClientConnectionLimit,
        Self::ClientTimeout,
        Self::ClientUnsupported,
        Self::ClientAuth,
        Self::ClientClosed,
        Self::RouteInvalid,
        Self::DestinationPort,
        Self::DestinationPrivate,
        Self::UpstreamConnectRefused,
        Self::UpstreamConnectTimeout,
        Self::UpstreamHandshakeTimeout,
        Self::UpstreamProtocol,
        Self::UpstreamAuth,
        Self::UpstreamRefused,
        Self::UpstreamTls,
        Self::UpstreamIo,
        Self::TargetRefused,
        Self::TargetUnreachable,
        Self::TargetTimeout,
        Self::NoUpstream,
        Self::RetriesExhausted,
        Self::Internal,
    ];

    /// This kind's position in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// A static label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientMalformed => "client_malformed",
            Self::ClientHeaderTooLarge => "client_header_too_large",
            Self::ClientUriTooLong => "client_uri_too_long",
            Self::ClientConnectionLimit => "client_connection_limit",
            Self::ClientTimeout => "client_timeout",
            Self::ClientUnsupported => "client_unsupported",
            Self::ClientAuth => "client_auth",
            Self::ClientClosed => "client_closed",
            Self::RouteInvalid => "route_invalid",
            Self::DestinationPort => "destination_port_denied",
            Self::DestinationPrivate => "destination_private",
            Self::UpstreamConnectRefused => "upstream_connect_refused",
            Self::UpstreamConnectTimeout => "upstream_connect_timeout",
            Self::UpstreamHandshakeTimeout => "upstream_handshake_timeout",
            Self::UpstreamProtocol => "upstream_protocol",
            Self::UpstreamAuth => "upstream_auth",
            Self::UpstreamRefused => "upstream_refused",
            Self::UpstreamTls => "upstream_tls",
            Self::UpstreamIo => "upstream_io",
            Self::TargetRefused => "target_refused",
            Self::TargetUnreachable => "target_unreachable",
            Self::TargetTimeout => "target_timeout",
            Self::NoUpstream => "no_upstream",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Internal => "internal",
        }
    }

    /// Whose fault this kind of failure is.
    pub fn side(self) -> Side {
        match self {
            Self::ClientMalformed
            | Self::ClientHeaderTooLarge
            | Self::ClientUriTooLong
            | Self::ClientConnectionLimit
            | Self::ClientTimeout
            | Self::ClientUnsupported
            | Self::ClientAuth
            | Self::ClientClosed
            | Self::RouteInvalid
            | Self::DestinationPort
            | Self::DestinationPrivate => Side::Client,
            Self::UpstreamConnectRefused
            | Self::UpstreamConnectTimeout
            | Self::UpstreamHandshakeTimeout
            | Self::UpstreamProtocol
            | Self::UpstreamAuth
            | Self::UpstreamRefused
            | Self::UpstreamTls
            | Self::UpstreamIo => Side::Upstream,
            Self::TargetRefused | Self::TargetUnreachable | Self::TargetTimeout => Side::Target,
            Self::NoUpstream | Self::RetriesExhausted | Self::Internal => Side::Internal,
        }
    }

    /// Whether the dialer should try another upstream after this failure. Only failures that
    /// are the upstream's fault are retried: a destination that refuses will refuse through
    /// every upstream.
    pub fn is_retryable(self) -> bool {
        self.side() == Side::Upstream
    }

    /// Whether this is a timeout (gateways answer 504 rather than 502).
    pub fn is_timeout(self) -> bool {
        matches!(
            self,
            Self::UpstreamConnectTimeout | Self::UpstreamHandshakeTimeout | Self::TargetTimeout
        )
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_kind_at_its_index() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k}");
        }
        let labels: std::collections::HashSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn only_upstream_faults_retry() {
        assert!(ErrorKind::UpstreamConnectRefused.is_retryable());
        assert!(ErrorKind::UpstreamHandshakeTimeout.is_retryable());
        assert!(!ErrorKind::TargetRefused.is_retryable());
        assert!(!ErrorKind::ClientClosed.is_retryable());
        assert!(!ErrorKind::NoUpstream.is_retryable());
    }
}
