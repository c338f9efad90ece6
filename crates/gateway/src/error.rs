//! [`GatewayError`]: an [`ErrorKind`] plus a detail for logs and the client.
//!
//! Details never carry secrets: they name upstreams by their redacted form and targets by
//! `host:port`. The kind alone decides the reply: [`GatewayError::http_status`] with an RFC 9209
//! `Proxy-Status` error type, or [`GatewayError::socks5_reply`] / SOCKS4's "rejected".

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;
use proxygate_core::{ErrorKind, Side};

/// Why a client request failed.
#[derive(Debug, Clone)]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub detail: Cow<'static, str>,
}

impl GatewayError {
    pub fn new(kind: ErrorKind, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    pub fn side(&self) -> Side {
        self.kind.side()
    }

    /// The HTTP status a client sees.
    pub fn http_status(&self) -> StatusCode {
        use ErrorKind as K;
        match self.kind {
            K::ClientMalformed | K::ClientUnsupported => StatusCode::BAD_REQUEST,
            K::ClientHeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            K::ClientUriTooLong => StatusCode::URI_TOO_LONG,
            K::ClientConnectionLimit => StatusCode::SERVICE_UNAVAILABLE,
            K::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            K::ClientAuth => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            K::DestinationPort | K::DestinationPrivate => StatusCode::FORBIDDEN,
            K::NoUpstream | K::RouteInvalid => StatusCode::SERVICE_UNAVAILABLE,
            K::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            k if k.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The RFC 9209 `Proxy-Status` error type.
    pub fn proxy_status_error(&self) -> &'static str {
        use ErrorKind as K;
        match self.kind {
            K::ClientMalformed
            | K::ClientHeaderTooLarge
            | K::ClientUriTooLong
            | K::ClientUnsupported => "http_request_error",
            K::ClientConnectionLimit => "connection_limit_reached",
            K::ClientTimeout | K::RouteInvalid => "http_request_error",
            K::ClientAuth | K::DestinationPort => "http_request_denied",
            K::DestinationPrivate => "destination_ip_prohibited",
            K::ClientClosed => "connection_terminated",
            K::UpstreamConnectRefused | K::TargetRefused => "connection_refused",
            K::UpstreamConnectTimeout | K::TargetTimeout => "connection_timeout",
            K::UpstreamHandshakeTimeout => "connection_read_timeout",
            K::UpstreamProtocol => "http_protocol_error",
            K::UpstreamAuth | K::UpstreamRefused => "http_request_denied",
            K::UpstreamTls => "tls_protocol_error",
            K::UpstreamIo => "connection_terminated",
            K::TargetUnreachable => "destination_unavailable",
            K::NoUpstream => "destination_unavailable",
            K::RetriesExhausted => "destination_unavailable",
            K::Internal => "proxy_internal_error",
        }
    }

    /// The `Proxy-Status` header value: `proxygate; error=...; details="..."`.
    pub fn proxy_status(&self) -> String {
        let details: String = self
            .detail
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .map(|c| if c == '"' || c == '\\' { '\'' } else { c })
            .collect();
        format!(
            "proxygate; error={}; details=\"{}: {}\"",
            self.proxy_status_error(),
            self.kind.as_str(),
            details
        )
    }

    /// The SOCKS5 reply code (RFC 1928 section 6).
    pub fn socks5_reply(&self) -> u8 {
        use ErrorKind as K;
        // Refused and unreachable are said only of the destination, as an upstream reported
        // it; an upstream's own failure is a general failure (or a timeout), so the client is
        // not told its destination refused when it was never tried.
        match self.kind {
            K::ClientAuth | K::DestinationPort | K::DestinationPrivate => 0x02,
            K::TargetUnreachable => 0x04,
            K::TargetRefused => 0x05,
            k if k.is_timeout() => 0x06,
            K::ClientUnsupported => 0x07,
            _ => 0x01,
        }
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for GatewayError {}

/// SOCKS5 reply codes used by the front end.
pub mod socks5_rep {
    pub const SUCCEEDED: u8 = 0x00;
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let e = |k| GatewayError::new(k, "x");
        assert_eq!(e(ErrorKind::NoUpstream).http_status(), 503);
        assert_eq!(e(ErrorKind::UpstreamConnectRefused).http_status(), 502);
        assert_eq!(e(ErrorKind::UpstreamConnectTimeout).http_status(), 504);
        assert_eq!(e(ErrorKind::UpstreamHandshakeTimeout).http_status(), 504);
        assert_eq!(e(ErrorKind::ClientMalformed).http_status(), 400);
        assert_eq!(e(ErrorKind::ClientHeaderTooLarge).http_status(), 431);
        assert_eq!(e(ErrorKind::ClientAuth).http_status(), 407);
        assert_eq!(e(ErrorKind::TargetRefused).socks5_reply(), 5);
        assert_eq!(e(ErrorKind::NoUpstream).socks5_reply(), 1);
        assert_eq!(e(ErrorKind::UpstreamConnectRefused).socks5_reply(), 1);
        assert_eq!(e(ErrorKind::UpstreamHandshakeTimeout).socks5_reply(), 6);
    }

    #[test]
    fn proxy_status_is_a_valid_sf_item() {
        let e = GatewayError::new(ErrorKind::UpstreamConnectRefused, "say \"hi\"\r\n\u{e9}");
        assert_eq!(
            e.proxy_status(),
            "proxygate; error=connection_refused; details=\"upstream_connect_refused: say 'hi'\""
        );
    }
}
