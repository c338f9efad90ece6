//! The SOCKS front end: SOCKS5 (RFC 1928) CONNECT with IPv4, IPv6 and domain targets, no-auth
//! and RFC 1929 username/password; SOCKS4 and SOCKS4a CONNECT.
//!
//! Authentication: with client auth on, SOCKS5 clients must choose username/password and SOCKS4
//! clients (no password in the protocol) are rejected. With it off, a SOCKS5 client may still
//! choose username/password (to send routing hints); any password is accepted.
//! Every failure is answered with its reply code before the connection closes: 0x07 for BIND
//! and UDP ASSOCIATE, 0x08 for an unknown address type, the dial error's code otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use proxygate_core::{ErrorKind, Host, Secret, Target};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::GatewayError;
use crate::auth::ClientCredentials;
use crate::dial::{Purpose, Routing};
use crate::error::socks5_rep;
use crate::gateway::{Gateway, Opened, Tunnel};
use crate::io::{Io, Rewind};
use crate::metrics::RequestKind;

const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 0x01;
const SOCKS4_GRANTED: u8 = 90;
const SOCKS4_REJECTED: u8 = 91;
/// Longest SOCKS4 user id or SOCKS4a domain we read.
const MAX_SOCKS4_FIELD: usize = 255;

/// A parsed SOCKS request, ready to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocksRequest {
    pub target: Target,
    pub credentials: Option<ClientCredentials>,
}

/// Why a SOCKS handshake stopped, and what to answer (if anything can be).
#[derive(Debug)]
enum HandshakeError {
    /// Answer with this reply code, then close.
    Reply(u8, GatewayError),
    /// Nothing sensible can be answered (truncated, wrong version, auth failed and answered).
    Close(GatewayError),
}

/// Serves one SOCKS5 client at `peer`: its handshake, the dial and the answer. Returns the
/// tunnel to relay (with whatever the client sent early), or `None` once a failure is answered.
pub async fn serve_socks5<S: Io>(
    gw: Gateway,
    stream: S,
    peer: SocketAddr,
    opened: Opened,
) -> Option<Tunnel<Rewind<S>>> {
    let mut reader = handshake_reader(opened.first.freeze(), stream);
    // Boxed: this state, itself copied whole into a box of its own for each connection, stays
    // the size of what follows the handshake (the dial is boxed in turn).
    let handshake = Box::pin(tokio::time::timeout_at(
        opened.head_deadline,
        socks5_handshake(&gw, &mut reader, peer),
    ))
    .await;
    let refused = |kind| gw.metrics().request(RequestKind::Socks5, Some(kind));
    let request = match handshake {
        Ok(Ok(r)) => r,
        Ok(Err(HandshakeError::Reply(rep, e))) => {
            tracing::debug!(error = %e, "socks5 request refused");
            refused(e.kind);
            let _ = reader.get_mut().write_all(&socks5_reply(rep)).await;
            return None;
        }
        Ok(Err(HandshakeError::Close(e))) => {
            tracing::debug!(error = %e, "socks5 handshake failed");
            refused(e.kind);
            return None;
        }
        Err(_) => {
            tracing::debug!("socks5 handshake timed out");
            refused(ErrorKind::ClientTimeout);
            return None;
        }
    };
    connect(gw, reader, request, Version::Socks5).await
}

/// Serves one SOCKS4/4a client, as [`serve_socks5`] does.
pub async fn serve_socks4<S: Io>(
    gw: Gateway,
    stream: S,
    opened: Opened,
) -> Option<Tunnel<Rewind<S>>> {
    let mut reader = handshake_reader(opened.first.freeze(), stream);
    let refused = |kind| gw.metrics().request(RequestKind::Socks4, Some(kind));
    let request = match Box::pin(tokio::time::timeout_at(
        opened.head_deadline,
        socks4_request(&mut reader),
    ))
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(HandshakeError::Reply(_, e))) => {
            tracing::debug!(error = %e, "socks4 request refused");
            refused(e.kind);
            let _ = reader
                .get_mut()
                .write_all(&socks4_reply(SOCKS4_REJECTED))
                .await;
            return None;
        }
        Ok(Err(HandshakeError::Close(e))) => {
            tracing::debug!(error = %e, "socks4 handshake failed");
            refused(e.kind);
            return None;
        }
        Err(_) => {
            refused(ErrorKind::ClientTimeout);
            return None;
        }
    };
    if gw.auth().is_required() {
        tracing::debug!(
            "socks4 client refused: client authentication is on and SOCKS4 has no password"
        );
        refused(ErrorKind::ClientAuth);
        let _ = reader
            .get_mut()
            .write_all(&socks4_reply(SOCKS4_REJECTED))
            .await;
        return None;
    }
    connect(gw, reader, request, Version::Socks4).await
}

/// The buffer a handshake is read through: room for its longest message (RFC 1929's, 513
/// bytes; a SOCKS4a request with both fields at their limit, 520) in one read. `BufReader`'s
/// default of 8 KiB, zeroed for every connection, was a fifth of a SOCKS5 tunnel's user-space
/// instructions (callgrind: ~8,500 of 38,500) and 8 KiB of cache written for a few bytes.
const HANDSHAKE_BUF: usize = 1024;

/// A SOCKS client's stream, its first read (`first`) replayed first, read through a buffer of
/// [`HANDSHAKE_BUF`].
fn handshake_reader<S: Io>(first: Bytes, stream: S) -> BufReader<Rewind<S>> {
    BufReader::with_capacity(HANDSHAKE_BUF, Rewind::new(first, stream))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Socks4,
    Socks5,
}

impl Version {
    fn request_kind(self) -> RequestKind {
        match self {
            Version::Socks5 => RequestKind::Socks5,
            Version::Socks4 => RequestKind::Socks4,
        }
    }

    fn success(self) -> Vec<u8> {
        match self {
            Version::Socks5 => socks5_reply(socks5_rep::SUCCEEDED).to_vec(),
            Version::Socks4 => socks4_reply(SOCKS4_GRANTED).to_vec(),
        }
    }

    fn failure(self, e: &GatewayError) -> Vec<u8> {
        match self {
            Version::Socks5 => socks5_reply(e.socks5_reply()).to_vec(),
            Version::Socks4 => socks4_reply(SOCKS4_REJECTED).to_vec(),
        }
    }
}

/// Routes, dials and answers a parsed request: the tunnel to relay. Every failure is answered
/// with the version's reply code before the connection closes (`None`).
async fn connect<S: Io>(
    gw: Gateway,
    mut reader: BufReader<Rewind<S>>,
    request: SocksRequest,
    version: Version,
) -> Option<Tunnel<Rewind<S>>> {
    let username = request.credentials.as_ref().map(|c| c.username.as_str());
    let routed = gw
        .policy()
        .tunnel(&request.target)
        .and_then(|()| Routing::from_username(username));
    let dialed = match routed {
        Ok((_, routing)) => {
            Box::pin(gw.dialer().dial(&request.target, Purpose::Tunnel, routing)).await
        }
        Err(e) => Err(e),
    };
    let established = match dialed {
        Ok(est) => est,
        Err(e) => {
            // As for HTTP: what the client asked wrongly (a denied port or destination, a bad
            // username hint) is its own business, at debug, where a client that repeats it
            // cannot flood the log; what went wrong upstream is the operator's.
            match e.side() {
                proxygate_core::Side::Client => {
                    tracing::debug!(?version, target = %request.target, error = %e, "socks request refused")
                }
                _ => {
                    tracing::info!(?version, target = %request.target, error = %e, "socks request failed")
                }
            }
            gw.metrics().request(version.request_kind(), Some(e.kind));
            let _ = reader.get_mut().write_all(&version.failure(&e)).await;
            return None;
        }
    };
    gw.metrics().request(version.request_kind(), None);
    // What the client sent past its request goes first: what the handshake's reader holds,
    // then what it had not read of the first read (a copy: the handshake's buffers go now).
    let buffered = reader.buffer();
    let early = Bytes::from([buffered, reader.get_ref().unread()].concat());
    let (_, mut stream) = reader.into_inner().into_parts();
    if stream.write_all(&version.success()).await.is_err() {
        crate::gateway::client_gone(established);
        return None;
    }
    Some(gw.relay(Rewind::new(early, stream), established, request.target))
}

fn malformed(what: &'static str) -> HandshakeError {
    HandshakeError::Close(GatewayError::new(ErrorKind::ClientMalformed, what))
}

/// A SOCKS5 handshake up to its request (RFC 1928): the greeting and method, the RFC 1929
/// login when that method was chosen, then the CONNECT request. Each step answers the client
/// itself where the protocol says so; the request's reply is left to the caller.
async fn socks5_handshake<S: Io>(
    gw: &Gateway,
    r: &mut BufReader<S>,
    peer: SocketAddr,
) -> Result<SocksRequest, HandshakeError> {
    let credentials = match socks5_method(gw, r).await? {
        USER_PASS => Some(socks5_login(gw, r, peer).await?),
        _ => None,
    };
    let target = socks5_request(r).await?;
    Ok(SocksRequest {
        target,
        credentials,
    })
}

/// The greeting (`VER NMETHODS METHODS...`) and the method chosen for it, told to the client:
/// username/password whenever offered, no authentication only while client auth is off.
async fn socks5_method<S: Io>(gw: &Gateway, r: &mut BufReader<S>) -> Result<u8, HandshakeError> {
    let truncated = |_| malformed("truncated SOCKS5 greeting");
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await.map_err(truncated)?;
    if head[0] != 5 {
        return Err(malformed("not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    r.read_exact(&mut methods).await.map_err(truncated)?;
    let required = gw.auth().is_required();
    let method = if methods.contains(&USER_PASS) {
        USER_PASS
    } else if !required && methods.contains(&NO_AUTH) {
        NO_AUTH
    } else {
        NO_ACCEPTABLE
    };
    r.get_mut()
        .write_all(&[5, method])
        .await
        .map_err(|_| client_closed())?;
    if method == NO_ACCEPTABLE {
        return Err(HandshakeError::Close(GatewayError::new(
            ErrorKind::ClientAuth,
            "no acceptable SOCKS5 method",
        )));
    }
    Ok(method)
}

/// The username/password sub-negotiation (RFC 1929), checked and answered: the credentials
/// as given (routing hints in the username included), or the connection closed.
async fn socks5_login<S: Io>(
    gw: &Gateway,
    r: &mut BufReader<S>,
    peer: SocketAddr,
) -> Result<ClientCredentials, HandshakeError> {
    let creds = read_rfc1929(r).await?;
    // The account is the username up to its routing hints.
    let account = ClientCredentials {
        username: creds
            .username
            .split('-')
            .next()
            .unwrap_or_default()
            .to_owned(),
        password: creds.password.clone(),
    };
    let ok = gw
        .auth()
        .authenticate(peer.ip(), Some(&account))
        .await
        .is_ok();
    r.get_mut()
        .write_all(&[1, if ok { 0 } else { 1 }])
        .await
        .map_err(|_| client_closed())?;
    if !ok {
        return Err(HandshakeError::Close(GatewayError::new(
            ErrorKind::ClientAuth,
            "SOCKS5 username/password rejected",
        )));
    }
    Ok(creds)
}

/// The request (`VER CMD RSV ATYP DST.ADDR DST.PORT`): its target, if it is a CONNECT to a
/// valid address; otherwise the reply code the client is to get.
async fn socks5_request<S: Io>(r: &mut BufReader<S>) -> Result<Target, HandshakeError> {
    let truncated = |_| malformed("truncated SOCKS5 request");
    let mut req = [0u8; 4];
    r.read_exact(&mut req).await.map_err(truncated)?;
    if req[0] != 5 {
        return Err(HandshakeError::Reply(
            socks5_rep::GENERAL_FAILURE,
            GatewayError::new(ErrorKind::ClientMalformed, "bad SOCKS5 request version"),
        ));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            r.read_exact(&mut a).await.map_err(truncated)?;
            Host::Ip(IpAddr::V4(Ipv4Addr::from(a)))
        }
        4 => {
            let mut a = [0u8; 16];
            r.read_exact(&mut a).await.map_err(truncated)?;
            Host::Ip(IpAddr::V6(Ipv6Addr::from(a)))
        }
        3 => {
            let len = r.read_u8().await.map_err(truncated)?;
            let mut name = vec![0u8; usize::from(len)];
            r.read_exact(&mut name).await.map_err(truncated)?;
            std::str::from_utf8(&name)
                .ok()
                .and_then(Host::domain)
                .ok_or_else(|| {
                    HandshakeError::Reply(
                        socks5_rep::GENERAL_FAILURE,
                        GatewayError::new(ErrorKind::ClientMalformed, "invalid domain name"),
                    )
                })?
        }
        _ => {
            return Err(HandshakeError::Reply(
                socks5_rep::ADDRESS_TYPE_NOT_SUPPORTED,
                GatewayError::new(ErrorKind::ClientUnsupported, "unknown address type"),
            ));
        }
    };
    let port = r.read_u16().await.map_err(truncated)?;
    if req[1] != CMD_CONNECT {
        return Err(HandshakeError::Reply(
            socks5_rep::COMMAND_NOT_SUPPORTED,
            GatewayError::new(ErrorKind::ClientUnsupported, "only CONNECT is supported"),
        ));
    }
    if port == 0 {
        return Err(HandshakeError::Reply(
            socks5_rep::GENERAL_FAILURE,
            GatewayError::new(ErrorKind::ClientMalformed, "port 0"),
        ));
    }
    Ok(Target::new(host, port))
}

async fn read_rfc1929<S: Io>(r: &mut BufReader<S>) -> Result<ClientCredentials, HandshakeError> {
    let truncated = |_| malformed("truncated SOCKS5 username/password");
    let ver = r.read_u8().await.map_err(truncated)?;
    if ver != 1 {
        return Err(malformed("bad RFC 1929 version"));
    }
    let ulen = r.read_u8().await.map_err(truncated)?;
    let mut user = vec![0u8; usize::from(ulen)];
    r.read_exact(&mut user).await.map_err(truncated)?;
    let plen = r.read_u8().await.map_err(truncated)?;
    let mut pass = vec![0u8; usize::from(plen)];
    r.read_exact(&mut pass).await.map_err(truncated)?;
    let username = String::from_utf8(user).map_err(|_| malformed("username is not UTF-8"))?;
    let password = String::from_utf8(pass).map_err(|_| malformed("password is not UTF-8"))?;
    Ok(ClientCredentials {
        username,
        password: Secret::new(password),
    })
}

async fn socks4_request<S: Io>(r: &mut BufReader<S>) -> Result<SocksRequest, HandshakeError> {
    let truncated = |_| malformed("truncated SOCKS4 request");
    // VN CD DSTPORT DSTIP USERID NUL [DOMAIN NUL]
    let mut head = [0u8; 8];
    r.read_exact(&mut head).await.map_err(truncated)?;
    if head[0] != 4 {
        return Err(malformed("not SOCKS4"));
    }
    let port = u16::from_be_bytes([head[2], head[3]]);
    let ip = Ipv4Addr::new(head[4], head[5], head[6], head[7]);
    let userid = read_nul_terminated(r).await?;
    let username = String::from_utf8(userid).map_err(|_| malformed("user id is not UTF-8"))?;
    let octets = ip.octets();
    let host = if octets[..3] == [0, 0, 0] && octets[3] != 0 {
        // SOCKS4a: the domain follows the user id.
        let name = read_nul_terminated(r).await?;
        std::str::from_utf8(&name)
            .ok()
            .and_then(Host::domain)
            .ok_or_else(|| {
                HandshakeError::Reply(
                    SOCKS4_REJECTED,
                    GatewayError::new(ErrorKind::ClientMalformed, "invalid SOCKS4a domain"),
                )
            })?
    } else {
        Host::Ip(IpAddr::V4(ip))
    };
    if head[1] != CMD_CONNECT {
        return Err(HandshakeError::Reply(
            SOCKS4_REJECTED,
            GatewayError::new(ErrorKind::ClientUnsupported, "only CONNECT is supported"),
        ));
    }
    if port == 0 {
        return Err(HandshakeError::Reply(
            SOCKS4_REJECTED,
            GatewayError::new(ErrorKind::ClientMalformed, "port 0"),
        ));
    }
    Ok(SocksRequest {
        target: Target::new(host, port),
        credentials: (!username.is_empty()).then(|| ClientCredentials {
            username,
            password: Secret::new(""),
        }),
    })
}

async fn read_nul_terminated<R: AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Vec<u8>, HandshakeError> {
    let mut out = Vec::new();
    loop {
        let byte = r
            .read_u8()
            .await
            .map_err(|_| malformed("truncated SOCKS4 request"))?;
        if byte == 0 {
            return Ok(out);
        }
        if out.len() == MAX_SOCKS4_FIELD {
            return Err(malformed("SOCKS4 field too long"));
        }
        out.push(byte);
    }
}

fn client_closed() -> HandshakeError {
    HandshakeError::Close(GatewayError::new(
        ErrorKind::ClientClosed,
        "client went away",
    ))
}

/// A SOCKS5 reply with an unspecified bound address (0.0.0.0:0).
fn socks5_reply(rep: u8) -> [u8; 10] {
    [5, rep, 0, 1, 0, 0, 0, 0, 0, 0]
}

fn socks4_reply(cd: u8) -> [u8; 8] {
    [0, cd, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::io::Builder;

    #[tokio::test]
    async fn socks4a_request_parses() {
        let mock = Builder::new()
            .read(&[4, 1, 0x01, 0xbb, 0, 0, 0, 1])
            .read(b"alice\0example.com\0")
            .build();
        let mut r = BufReader::new(mock);
        let req = socks4_request(&mut r).await.unwrap();
        assert_eq!(req.target.to_string(), "example.com:443");
        assert_eq!(req.credentials.unwrap().username, "alice");
    }

    #[tokio::test]
    async fn socks4_ip_request_parses() {
        let mock = Builder::new().read(&[4, 1, 0, 80, 10, 0, 0, 7, 0]).build();
        let mut r = BufReader::new(mock);
        let req = socks4_request(&mut r).await.unwrap();
        assert_eq!(req.target.to_string(), "10.0.0.7:80");
        assert!(req.credentials.is_none());
    }

    #[tokio::test]
    async fn socks4_bind_is_rejected_with_reply() {
        let mock = Builder::new().read(&[4, 2, 0, 80, 10, 0, 0, 7, 0]).build();
        let mut r = BufReader::new(mock);
        match socks4_request(&mut r).await {
            Err(HandshakeError::Reply(SOCKS4_REJECTED, e)) => {
                assert_eq!(e.kind, ErrorKind::ClientUnsupported);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn socks4_overlong_userid_is_refused() {
        let mut bytes = vec![4, 1, 0, 80, 10, 0, 0, 7];
        bytes.extend(std::iter::repeat_n(b'a', 300));
        let mock = Builder::new().read(&bytes).build();
        let mut r = BufReader::new(mock);
        assert!(matches!(
            socks4_request(&mut r).await,
            Err(HandshakeError::Close(_))
        ));
    }

    #[tokio::test]
    async fn socks5_domain_request_parses() {
        let mock = Builder::new()
            .read(&[5, 1, 0, 3, 11])
            .read(b"example.com")
            .read(&[0x01, 0xbb])
            .build();
        let target = socks5_request(&mut BufReader::new(mock)).await.unwrap();
        assert_eq!(target.to_string(), "example.com:443");
    }

    /// Each refused request gets the reply code RFC 1928 gives it, and a request cut short in
    /// its address is told as a truncated request (it was once called a truncated greeting).
    #[tokio::test]
    async fn socks5_requests_are_refused_with_their_reply_codes() {
        let refused = |bytes: &'static [u8]| async move {
            let mock = Builder::new().read(bytes).build();
            match socks5_request(&mut BufReader::new(mock)).await {
                Ok(t) => panic!("{bytes:?} gave {t}"),
                Err(HandshakeError::Reply(code, e)) => (Some(code), e),
                Err(HandshakeError::Close(e)) => (None, e),
            }
        };
        let (code, e) = refused(&[5, 2, 0, 1, 10, 0, 0, 7, 0, 80]).await;
        assert_eq!(code, Some(socks5_rep::COMMAND_NOT_SUPPORTED), "{e:?}");
        let (code, e) = refused(&[5, 1, 0, 9, 10, 0, 0, 7, 0, 80]).await;
        assert_eq!(code, Some(socks5_rep::ADDRESS_TYPE_NOT_SUPPORTED), "{e:?}");
        let (code, e) = refused(&[5, 1, 0, 1, 10, 0, 0, 7, 0, 0]).await;
        assert_eq!(
            (code, e.kind),
            (
                Some(socks5_rep::GENERAL_FAILURE),
                ErrorKind::ClientMalformed
            )
        );
        let (code, e) = refused(&[5, 1, 0, 1, 10, 0]).await;
        assert_eq!(code, None);
        assert_eq!(e.detail, "truncated SOCKS5 request");
    }

    #[tokio::test]
    async fn rfc1929_parses() {
        let mock = Builder::new()
            .read(&[1, 3])
            .read(b"bob")
            .read(&[2])
            .read(b"pw")
            .build();
        let mut r = BufReader::new(mock);
        let c = read_rfc1929(&mut r).await.unwrap();
        assert_eq!(c.username, "bob");
        assert_eq!(c.password.expose(), "pw");
    }

    /// The longest handshake message comes in one read of the handshake buffer, and what the
    /// client sent after it stays buffered for the tunnel.
    #[tokio::test]
    async fn the_longest_message_fits_the_handshake_buffer_and_what_follows_is_kept() {
        let mut bytes = vec![1, 255];
        bytes.extend([b'u'; 255]);
        bytes.push(255);
        bytes.extend([b'p'; 255]);
        bytes.extend(b"\x16\x03\x01 early");
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(&bytes).await.unwrap();
        let mut r = handshake_reader(Bytes::from_static(&[]), server);
        let c = read_rfc1929(&mut r).await.unwrap();
        assert_eq!((c.username.len(), c.password.expose().len()), (255, 255));
        assert_eq!(r.buffer(), b"\x16\x03\x01 early");
    }
}
