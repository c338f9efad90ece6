//! What the HTTP front end refuses before forwarding anything, beyond what hyper's parser
//! already refuses (bad chunk sizes, header folding, bare CR, NUL, invalid names, unknown
//! transfer codings, differing `Content-Length`s, `Transfer-Encoding` in HTTP/1.0).
//!
//! hyper settles two ambiguities itself before we see the request: with both
//! `Content-Length` and `Transfer-Encoding` it drops the length, reads the body as chunked and
//! closes the connection after the response (RFC 9112 §6.1), and equal duplicate lengths are
//! merged into one (RFC 9110 §8.6). The checks for those below are defence in depth should a
//! future hyper hand them through. What is left are the ambiguities hyper passes on: duplicate
//! `Host`, `_` lookalikes of framing headers, userinfo in the URI. Each is answered 400 with
//! `Proxy-Status` and the connection is closed, since the framing of what follows is in doubt.
//! Forwarding then re-serializes the request (one framing, `Host` rebuilt from the URI,
//! `Expect` answered here), so exactly one well-formed request reaches an upstream.

use http::header::{self, HeaderMap};
use http::{Request, Version};
use proxygate_core::ErrorKind;

use crate::GatewayError;

fn refuse(why: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorKind::ClientMalformed, why.into())
}

/// Header names that read as a framing or routing header once `_` is taken for `-`, as some
/// servers do (`Transfer_Encoding`): a back-door for a second framing.
const LOOKALIKE_OF: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Refuses requests whose framing or routing is ambiguous.
pub(crate) fn check<B>(req: &Request<B>) -> Result<(), GatewayError> {
    let h = req.headers();
    let count = |name: header::HeaderName| h.get_all(name).iter().count();
    let cl = count(header::CONTENT_LENGTH);
    let te = count(header::TRANSFER_ENCODING);
    if cl > 0 && te > 0 {
        return Err(refuse(
            "Content-Length and Transfer-Encoding together (a request smuggling pattern)",
        ));
    }
    if cl > 1 {
        return Err(refuse("more than one Content-Length"));
    }
    if te > 1 {
        return Err(refuse("more than one Transfer-Encoding"));
    }
    if te > 0 && req.version() == Version::HTTP_10 {
        return Err(refuse("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if count(header::HOST) > 1 {
        return Err(refuse("more than one Host"));
    }
    if let Some(name) = lookalike(h) {
        return Err(refuse(format!(
            "header {name:?} reads as {} where '_' is taken for '-'",
            name.replace('_', "-")
        )));
    }
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(refuse(
            "userinfo (user:password@) in the request URI; send credentials in headers",
        ));
    }
    Ok(())
}

fn lookalike(h: &HeaderMap) -> Option<String> {
    h.keys()
        .map(|k| k.as_str())
        .find(|k| k.contains('_') && LOOKALIKE_OF.contains(&k.replace('_', "-").as_str()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("http://a.example/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn framing_ambiguities_are_refused() {
        assert!(check(&req(&[("content-length", "5")])).is_ok());
        assert!(check(&req(&[("transfer-encoding", "chunked")])).is_ok());
        for bad in [
            vec![("content-length", "5"), ("transfer-encoding", "chunked")],
            vec![("content-length", "5"), ("content-length", "5")],
            vec![
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            vec![("host", "a"), ("host", "b")],
            vec![("content-length", "5"), ("transfer_encoding", "chunked")],
            vec![("content_length", "5")],
            vec![("host_", "x")],
        ] {
            if bad == [("host_", "x")] {
                assert!(check(&req(&bad)).is_ok(), "{bad:?} is just a header");
                continue;
            }
            let e = check(&req(&bad)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::ClientMalformed, "{bad:?}");
        }
        let mut r = req(&[("transfer-encoding", "chunked")]);
        *r.version_mut() = Version::HTTP_10;
        assert!(check(&r).is_err());
        let r = Request::get("http://u:p@a.example/").body(()).unwrap();
        assert!(check(&r).unwrap_err().detail.contains("userinfo"));
    }
}
