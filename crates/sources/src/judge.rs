//! Judges: pages that echo what they were sent, so a check through a proxy can tell what the
//! proxy revealed. Pure: [`JudgeUrl`] (where), [`read`] (what an answer says), [`classify`]
//! (the verdict).
//!
//! Two kinds of answer are understood: httpbin-style JSON (`/get?show_env=1`:
//! `{"origin": "a, b", "headers": {...}}`) and azenv-style pages (`KEY = value` lines inside
//! `<pre>`, request headers as `HTTP_X_FORWARDED_FOR`). The verdict, as the public checkers
//! reach it: our own address anywhere in the answer is **transparent**; otherwise a header
//! that gives a proxy away (`Via`, `X-Forwarded-For`, `Forwarded`...) that a direct request
//! to the same judge did not show is **anonymous**; otherwise **elite**.

use std::net::IpAddr;

use proxygate_core::{Host, Target};
use serde_json::Value;

use crate::candidate::Anonymity;

/// Headers that give a proxy (or its client) away, lower case, dashes.
pub const REVEALING: [&str; 16] = [
    "via",
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "client-ip",
    "x-client-ip",
    "forwarded-for",
    "forwarded-for-ip",
    "x-forwarded",
    "x-originating-ip",
    "x-cluster-client-ip",
    "x-proxy-id",
    "proxy-connection",
    "x-bluecoat-via",
    "x-fwd-ip-addr",
    "x-proxy-connection",
];

/// A judge's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgeUrl {
    pub url: String,
    pub tls: bool,
    pub host: Host,
    pub port: u16,
    /// `/path?query`.
    pub path: String,
}

impl JudgeUrl {
    pub fn parse(url: &str) -> Result<JudgeUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err("not http:// or https://".into());
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let default = if tls { 443 } else { 80 };
        let with_port = if authority.contains(']') || authority.matches(':').count() == 1 {
            authority.to_owned()
        } else {
            format!("{authority}:{default}")
        };
        let with_port = if with_port.ends_with(']') {
            format!("{with_port}:{default}")
        } else {
            with_port
        };
        let target = Target::parse_authority(&with_port).map_err(|e| e.to_string())?;
        if authority.is_empty() {
            return Err("no host".into());
        }
        Ok(JudgeUrl {
            url: url.to_owned(),
            tls,
            host: target.host,
            port: target.port,
            path,
        })
    }

    pub fn target(&self) -> Target {
        Target::new(self.host.clone(), self.port)
    }

    /// `Host:` header value.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        match (&self.host, self.port) {
            (h, p) if p == default => h.to_string(),
            (Host::Ip(IpAddr::V6(ip)), p) => format!("[{ip}]:{p}"),
            (h, p) => format!("{h}:{p}"),
        }
    }

    /// The absolute form, for a request through an HTTP proxy.
    pub fn absolute(&self) -> String {
        format!("http://{}{}", self.host_header(), self.path)
    }
}

/// What a judge echoed of the request it got: the address it came from and its headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Echo {
    /// The address the request came from, as the judge saw it.
    pub exit_ip: Option<IpAddr>,
    /// Where the judge says the request came from: httpbin's `origin` list, azenv's
    /// `REMOTE_ADDR`. A direct request's are our own addresses.
    pub origin: Vec<IpAddr>,
    /// Every address in the answer: the origin and the request headers' values (but `Host`,
    /// which names the judge).
    pub addresses: Vec<IpAddr>,
    /// The request headers the judge echoed, names lower case with dashes.
    pub headers: Vec<(String, String)>,
}

impl Echo {
    /// Revealing headers present in this echo.
    pub fn revealing(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .headers
            .iter()
            .filter(|(k, _)| REVEALING.contains(&k.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Every IP address in `s` (separated by anything that is not part of one).
fn addresses_in(s: &str) -> Vec<IpAddr> {
    s.split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
        .filter(|t| t.len() >= 2)
        .filter_map(|t| t.trim_matches(':').parse().ok())
        .collect()
}

/// Reads a judge's answer; `None` when it is neither kind (a proxy's own page, a block page).
pub fn read(body: &str) -> Option<Echo> {
    let body = body.trim();
    if body.starts_with('{') {
        let v: Value = serde_json::from_str(body).ok()?;
        let origin = v.get("origin")?.as_str()?;
        let origins = addresses_in(origin);
        let mut echo = Echo {
            exit_ip: origins.last().copied(),
            addresses: origins.clone(),
            origin: origins,
            headers: Vec::new(),
        };
        if let Some(Value::Object(h)) = v.get("headers") {
            for (k, val) in h {
                let val = match val {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let name = k.to_ascii_lowercase().replace('_', "-");
                if name != "host" {
                    echo.addresses.extend(addresses_in(&val));
                }
                echo.headers.push((name, val));
            }
        }
        return Some(echo);
    }
    // azenv: KEY = value lines.
    let mut echo = Echo::default();
    let mut remote = None;
    for line in body.lines() {
        let line = line
            .trim()
            .trim_start_matches("<pre>")
            .trim_end_matches("</pre>");
        let Some((k, v)) = line.split_once(" = ") else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k == "REMOTE_ADDR" {
            remote = v.parse::<IpAddr>().ok();
        }
        if let Some(h) = k.strip_prefix("HTTP_") {
            let name = h.to_ascii_lowercase().replace('_', "-");
            if name != "host" {
                echo.addresses.extend(addresses_in(v));
            }
            echo.headers.push((name, v.to_owned()));
        }
    }
    let remote = remote?;
    echo.exit_ip = Some(remote);
    echo.origin.push(remote);
    echo.addresses.push(remote);
    Some(echo)
}

/// The header a check through an HTTP proxy sends for the proxy alone: it is named in
/// `Connection`, so a proxy must remove it (RFC 9110, 7.6.1). A judge that sees it was sent a
/// client's hop-by-hop headers.
pub const CANARY: &str = "x-proxygate-canary";

/// What an echo through a proxy leaks that it must not: the gateway's own address (`ours`
/// anywhere in the answer), or, for a request the proxy forwarded itself (`forwarded`), the
/// client's hop-by-hop headers (the [`CANARY`]) or its `Proxy-Authorization`. `None`: nothing.
pub fn leak(echo: &Echo, ours: &[IpAddr], forwarded: bool) -> Option<String> {
    if echo.addresses.iter().any(|a| ours.contains(a)) {
        return Some("reveals the gateway's own address to the sites it reaches".into());
    }
    if !forwarded {
        return None;
    }
    let has = |name: &str| echo.headers.iter().any(|(k, _)| k == name);
    if has("proxy-authorization") {
        return Some("forwards the client's Proxy-Authorization to the sites it reaches".into());
    }
    if has(CANARY) {
        return Some(
            "forwards the client's hop-by-hop headers (one named in Connection reached the judge)"
                .into(),
        );
    }
    None
}

/// The verdict on an echo through a proxy, given our own addresses (as the judge saw a direct
/// request) and the revealing headers a direct request already showed (the judge's own
/// infrastructure may add `X-Forwarded-For` to everything).
pub fn classify(echo: &Echo, ours: &[IpAddr], baseline: &[String]) -> Anonymity {
    if echo.addresses.iter().any(|a| ours.contains(a)) {
        return Anonymity::Transparent;
    }
    if echo.revealing().iter().any(|h| !baseline.contains(h)) {
        return Anonymity::Anonymous;
    }
    Anonymity::Elite
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn judge_urls() {
        let j = JudgeUrl::parse("http://httpbin.org/get?show_env=1").unwrap();
        assert_eq!(
            (j.tls, j.port, j.path.as_str()),
            (false, 80, "/get?show_env=1")
        );
        assert_eq!(j.absolute(), "http://httpbin.org/get?show_env=1");
        let j = JudgeUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((j.tls, j.port, j.path.as_str()), (true, 8443, "/"));
        assert_eq!(j.host_header(), "127.0.0.1:8443");
        let j = JudgeUrl::parse("http://[::1]:81/azenv.php").unwrap();
        assert_eq!(j.host_header(), "[::1]:81");
        assert!(JudgeUrl::parse("ftp://x/").is_err());
        assert!(JudgeUrl::parse("http://").is_err());
        assert!(JudgeUrl::parse("http://h:99999/").is_err());
    }

    #[test]
    fn the_judges_own_address_is_not_ours() {
        // Judge and gateway on one host: the Host header names an address we also have.
        let ours = [ip("127.0.0.1")];
        let v = read(r#"{"headers":{"Host":"127.0.0.1:8000"},"origin":"127.0.0.7"}"#).unwrap();
        assert_eq!(v.origin, [ip("127.0.0.7")]);
        assert_eq!(classify(&v, &ours, &[]), Anonymity::Elite);
        let az =
            read("<pre>\nREMOTE_ADDR = 127.0.0.7\nHTTP_HOST = 127.0.0.1:8000\n</pre>").unwrap();
        assert_eq!(classify(&az, &ours, &[]), Anonymity::Elite);
    }

    #[test]
    fn httpbin_views_and_verdicts() {
        let ours = [ip("198.51.100.10")];
        let direct = read(r#"{"args":{},"headers":{"Host":"httpbin.org","X-Forwarded-For":"198.51.100.10"},"origin":"198.51.100.10","url":"http://httpbin.org/get?show_env=1"}"#).unwrap();
        let baseline = direct.revealing();
        assert_eq!(baseline, ["x-forwarded-for"]);
        let transparent = read(r#"{"headers":{"X-Forwarded-For":"198.51.100.10, 203.0.113.5"},"origin":"198.51.100.10, 203.0.113.5"}"#).unwrap();
        assert_eq!(transparent.exit_ip, Some(ip("203.0.113.5")));
        assert_eq!(
            classify(&transparent, &ours, &baseline),
            Anonymity::Transparent
        );
        let anonymous = read(r#"{"headers":{"Via":"1.1 squid","X-Forwarded-For":"203.0.113.5"},"origin":"203.0.113.5"}"#).unwrap();
        assert_eq!(classify(&anonymous, &ours, &baseline), Anonymity::Anonymous);
        let elite = read(r#"{"headers":{"X-Forwarded-For":"203.0.113.5"},"origin":"203.0.113.5"}"#)
            .unwrap();
        assert_eq!(classify(&elite, &ours, &baseline), Anonymity::Elite);
        assert_eq!(read("{\"unexpected\": true}"), None);
        assert_eq!(read("<html>Access denied</html>"), None);
    }

    #[test]
    fn leaks_are_named() {
        let ours = [ip("198.51.100.10")];
        let clean = read(r#"{"headers":{"Host":"j"},"origin":"203.0.113.5"}"#).unwrap();
        assert_eq!(leak(&clean, &ours, true), None);
        let transparent =
            read(r#"{"headers":{"X-Forwarded-For":"198.51.100.10"},"origin":"203.0.113.5"}"#)
                .unwrap();
        assert!(
            leak(&transparent, &ours, false)
                .unwrap()
                .contains("own address")
        );
        let canary =
            read(r#"{"headers":{"X-Proxygate-Canary":"1"},"origin":"203.0.113.5"}"#).unwrap();
        assert!(leak(&canary, &ours, true).unwrap().contains("hop-by-hop"));
        // Through a tunnel the request is the client's own: nothing to strip.
        assert_eq!(leak(&canary, &ours, false), None);
        let auth =
            "<pre>\nREMOTE_ADDR = 203.0.113.5\nHTTP_PROXY_AUTHORIZATION = Basic eDp5\n</pre>";
        assert!(
            leak(&read(auth).unwrap(), &ours, true)
                .unwrap()
                .contains("Proxy-Authorization")
        );
    }

    #[test]
    fn azenv_views_and_verdicts() {
        let page = "<html><head><title>AZ Environment variables 1.04</title></head><body><pre>\nREMOTE_ADDR = 203.0.113.5\nREMOTE_PORT = 51234\nREQUEST_METHOD = GET\nHTTP_HOST = azenv.net\nHTTP_USER_AGENT = Mozilla/5.0\nHTTP_VIA = 1.1 squid\nHTTP_X_FORWARDED_FOR = 198.51.100.10\n</pre></body></html>";
        let v = read(page).unwrap();
        assert_eq!(v.exit_ip, Some(ip("203.0.113.5")));
        assert_eq!(v.revealing(), ["via", "x-forwarded-for"]);
        assert_eq!(
            classify(&v, &[ip("198.51.100.10")], &[]),
            Anonymity::Transparent
        );
        let via_only = "<pre>\nREMOTE_ADDR = 203.0.113.5\nHTTP_VIA = 1.1 proxy\n</pre>";
        assert_eq!(
            classify(&read(via_only).unwrap(), &[ip("198.51.100.10")], &[]),
            Anonymity::Anonymous
        );
        let clean = "<pre>\nREMOTE_ADDR = 203.0.113.5\nHTTP_HOST = azenv.net\n</pre>";
        assert_eq!(
            classify(&read(clean).unwrap(), &[ip("198.51.100.10")], &[]),
            Anonymity::Elite
        );
    }
}
