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

use http::header;
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
    check_head(
        req.version() == Version::HTTP_10,
        req.headers().iter().map(|(name, _)| name.as_str()),
        req.uri().authority().map(|a| a.as_str()),
    )
}

/// [`check`] over a head's parts: whether it is HTTP/1.0, every header field's name (one per
/// field, repeats included; any case) and the target's authority.
pub(crate) fn check_head<'a>(
    http10: bool,
    names: impl Iterator<Item = &'a str>,
    authority: Option<&str>,
) -> Result<(), GatewayError> {
    let (mut cl, mut te, mut host) = (0usize, 0usize, 0usize);
    let mut lookalike = None;
    for name in names {
        if name.eq_ignore_ascii_case(header::CONTENT_LENGTH.as_str()) {
            cl += 1;
        } else if name.eq_ignore_ascii_case(header::TRANSFER_ENCODING.as_str()) {
            te += 1;
        } else if name.eq_ignore_ascii_case(header::HOST.as_str()) {
            host += 1;
        } else if lookalike.is_none() && name.contains('_') {
            let dashed = name.replace('_', "-").to_ascii_lowercase();
            if LOOKALIKE_OF.contains(&dashed.as_str()) {
                lookalike = Some((name.to_ascii_lowercase(), dashed));
            }
        }
    }
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
    if te > 0 && http10 {
        return Err(refuse("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if host > 1 {
        return Err(refuse("more than one Host"));
    }
    if let Some((name, dashed)) = lookalike {
        return Err(refuse(format!(
            "header {name:?} reads as {dashed} where '_' is taken for '-'"
        )));
    }
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(refuse(
            "userinfo (user:password@) in the request URI; send credentials in headers",
        ));
    }
    Ok(())
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

    /// A raw head's names come in any case: the CONNECT path checks them unparsed.
    #[test]
    fn raw_names_are_compared_without_case() {
        let check = |names: &[&str]| check_head(false, names.iter().copied(), Some("a:443"));
        assert!(check(&["Host", "Proxy-Authorization", "User-Agent"]).is_ok());
        for bad in [
            &["Host", "HOST"][..],
            &["Content-Length", "transfer-ENCODING"],
            &["Content-Length", "content-length"],
            &["Transfer_Encoding"],
            &["CONTENT_length"],
        ] {
            let e = check(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::ClientMalformed, "{bad:?}");
        }
        assert!(check(&["X_Forwarded_For", "host_"]).is_ok());
        let e = check_head(true, ["Transfer-Encoding"].into_iter(), None).unwrap_err();
        assert!(e.detail.contains("HTTP/1.0"), "{e}");
        let e = check_head(false, std::iter::empty(), Some("u:p@a:443")).unwrap_err();
        assert!(e.detail.contains("userinfo"), "{e}");
    }
}
