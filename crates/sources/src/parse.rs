//! The list parsers: bytes in, [`Candidate`]s out, pure. One entry point, [`parse`], reads
//! whichever of its kind's formats a body holds (text or JSON, or HTML for the
//! free-proxy-list family), so an overridden `url` may point at any of the kind's APIs.
//!
//! What a broken source sends is a [`ParseError`], never an empty list: an empty body, an HTML
//! error page or Cloudflare interstitial where a list was expected, malformed JSON, JSON of
//! another shape (`null`, `{"data": {"unexpected": true}}`), an API's own error object, or a
//! body with no proxy in it at all (`NOTFOUND`). Single bad entries are skipped and counted.
//!
//! Facts about each format (and the samples the tests use) are in `SOURCES.md` of the team's
//! shared docs; the parsers are lenient where the facts disagree (CRLF or LF, a port as string
//! or number, `limit` as string or number).

use proxygate_core::{Scheme, Upstream};
use serde_json::Value;

use crate::candidate::{Anonymity, Candidate};
use crate::config::Kind;

/// Why a body is not a list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty body")]
    Empty,
    #[error("a Cloudflare challenge page, not a list (the site blocks bots)")]
    Cloudflare,
    #[error("an HTML page where a list was expected{0}")]
    Html(String),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("JSON of an unexpected shape: {0}")]
    Shape(String),
    #[error("the API answered an error: {0}")]
    ApiError(String),
    #[error("no proxy in the body ({0})")]
    NoProxies(String),
}

/// What one body held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub candidates: Vec<Candidate>,
    /// Entries that could not be read (skipped).
    pub invalid: usize,
    /// Entries the list itself marked dead (`alive: false`), skipped.
    pub dead: usize,
    /// Rows on this page, read or not: a paged fetch stops at a page without any.
    pub rows: usize,
}

/// What a parse needs to know besides the body.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub source: &'a str,
    /// The scheme of entries that name none (from the URL's `protocol=`/`type=`/`t=`, or a
    /// generic source's `scheme`).
    pub scheme: Scheme,
}

/// Reads `body` as a list of `kind`. A body without any entry is [`ParseError::NoProxies`]
/// unless `allow_empty` (a later page of a paged API, where an empty page ends the list).
pub fn parse(
    kind: Kind,
    body: &[u8],
    ctx: Ctx<'_>,
    allow_empty: bool,
) -> Result<Parsed, ParseError> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim_start_matches('\u{feff}').trim();
    if text.is_empty() {
        return Err(ParseError::Empty);
    }
    if is_cloudflare(text) {
        return Err(ParseError::Cloudflare);
    }
    let looks_html = text.starts_with('<');
    let looks_json = text.starts_with('{') || text.starts_with('[') || text == "null";
    let parsed = match kind {
        Kind::FreeProxyList if looks_html => free_proxy_list(text, ctx)?,
        Kind::FreeProxyList => lines(text, ctx),
        _ if looks_html => return Err(ParseError::Html(title(text))),
        Kind::Proxyscrape if looks_json => proxyscrape_json(&json(text)?, ctx)?,
        Kind::Geonode if looks_json => geonode_json(&json(text)?, ctx)?,
        Kind::Geonode => {
            return Err(ParseError::Shape(
                "Geonode answers JSON; this is text".into(),
            ));
        }
        Kind::ProxyListDownload if looks_json => proxy_list_download_json(&json(text)?, ctx)?,
        Kind::Generic if looks_json && text.starts_with('[') => json_array(&json(text)?, ctx)?,
        Kind::Generic if looks_json => json_lines(text, ctx)?,
        Kind::Proxyscrape | Kind::ProxyListDownload | Kind::Generic => lines(text, ctx),
    };
    if parsed.rows == 0 && !allow_empty {
        return Err(ParseError::NoProxies("not a single entry".into()));
    }
    if parsed.candidates.is_empty() && parsed.rows > 0 && parsed.dead < parsed.rows {
        return Err(ParseError::NoProxies(format!(
            "{} entries, none readable; starts with {:?}",
            parsed.rows,
            text.chars().take(40).collect::<String>()
        )));
    }
    Ok(parsed)
}

fn json(text: &str) -> Result<Value, ParseError> {
    serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))
}

fn is_cloudflare(text: &str) -> bool {
    let head: String = text
        .chars()
        .take(4096)
        .collect::<String>()
        .to_ascii_lowercase();
    head.contains("<title>just a moment...</title>")
        || head.contains("cf-browser-verification")
        || head.contains("challenges.cloudflare.com")
        || head.contains("attention required! | cloudflare")
}

/// `: "<title text>"` of an HTML page, for the error.
fn title(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    let Some(start) = lower.find("<title>") else {
        let snippet: String = html.chars().take(60).collect();
        return format!(": {snippet:?}");
    };
    let rest = &html[start + 7..];
    let end = rest
        .to_ascii_lowercase()
        .find("</title>")
        .unwrap_or(rest.len());
    // At most 120 characters (not bytes: a title may be any UTF-8).
    let title: String = rest[..end].trim().chars().take(120).collect();
    format!(": {title:?}")
}

/// A candidate from its parts; `None` when they do not make an upstream.
fn candidate(
    scheme: Scheme,
    host: &str,
    port: &str,
    country: Option<&str>,
    anonymity: Option<Anonymity>,
    ctx: Ctx<'_>,
) -> Option<Candidate> {
    let host = host.trim();
    let port = port.trim();
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut upstream = Upstream::parse(&format!("{scheme}://{host}:{port}")).ok()?;
    upstream.country = country.and_then(country_code);
    Some(Candidate {
        upstream,
        anonymity,
        source: ctx.source.to_owned(),
    })
}

/// An ISO 3166-1 alpha-2 code, upper case.
fn country_code(s: &str) -> Option<String> {
    let s = s.trim();
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic())).then(|| s.to_ascii_uppercase())
}

/// A port given as a number or a string.
fn port_of(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().map(|p| p.to_string()),
        Value::String(s) => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// A list's protocol name as our scheme: `https` in lists means an HTTP proxy that can
/// CONNECT, not TLS to the proxy.
fn list_scheme(s: &str) -> Option<Scheme> {
    match s.trim().to_ascii_lowercase().as_str() {
        "http" | "https" => Some(Scheme::Http),
        "socks4" => Some(Scheme::Socks4),
        "socks4a" => Some(Scheme::Socks4a),
        "socks5" => Some(Scheme::Socks5),
        "socks5h" => Some(Scheme::Socks5h),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Text

/// One entry per line: `scheme://[user:pass@]host:port`, `host:port`, `host port`, with
/// anything after the address ignored (`ip:port|Country|...`, `ip:port CC-H-S +`).
pub fn lines(text: &str, ctx: Ctx<'_>) -> Parsed {
    let mut out = Parsed::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        out.rows += 1;
        match line_candidate(line, ctx) {
            Some(c) => out.candidates.push(c),
            None => out.invalid += 1,
        }
    }
    out
}

fn line_candidate(line: &str, ctx: Ctx<'_>) -> Option<Candidate> {
    if line.contains("://") {
        let token = line.split_whitespace().next()?;
        let mut upstream = Upstream::parse(token).ok()?;
        upstream.country = upstream.country.take().and_then(|c| country_code(&c));
        return Some(Candidate {
            upstream,
            anonymity: None,
            source: ctx.source.to_owned(),
        });
    }
    let token = line.split(['|', ' ', '\t', ',', ';']).next()?;
    if let Some(rest) = token.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return candidate(ctx.scheme, host, port, None, None, ctx);
    }
    match token.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            candidate(ctx.scheme, host, port, None, None, ctx)
        }
        _ => {
            // `ip port`, as some lists print it.
            let mut words = line.split_whitespace();
            let (host, port) = (words.next()?, words.next()?);
            candidate(ctx.scheme, host, port, None, None, ctx)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON shapes

/// An API's own error object: `{"success": false}`, a non-empty `error`, `"status": 0`.
fn api_error(v: &Value) -> Option<String> {
    if v.get("success") == Some(&Value::Bool(false)) {
        return Some(
            v.get("message")
                .or_else(|| v.get("error"))
                .map_or_else(|| "success: false".into(), Value::to_string),
        );
    }
    match v.get("error") {
        Some(Value::String(e)) if !e.is_empty() => return Some(e.clone()),
        Some(Value::Object(_)) => return v.get("error").map(Value::to_string),
        _ => {}
    }
    (v.get("status") == Some(&serde_json::json!(0))).then(|| "status: 0".into())
}

/// ProxyScrape v3/v4: `{"shown_records", "total_records", "proxies": [...]}`.
pub fn proxyscrape_json(v: &Value, ctx: Ctx<'_>) -> Result<Parsed, ParseError> {
    if let Some(e) = api_error(v) {
        return Err(ParseError::ApiError(e));
    }
    let Some(items) = v.get("proxies").and_then(Value::as_array) else {
        return Err(ParseError::Shape(
            "expected an object with a \"proxies\" array".into(),
        ));
    };
    let mut out = Parsed {
        rows: items.len(),
        ..Parsed::default()
    };
    for item in items {
        if item.get("alive") == Some(&Value::Bool(false)) {
            out.dead += 1;
            continue;
        }
        let from_url = item
            .get("proxy")
            .and_then(Value::as_str)
            .and_then(|u| Upstream::parse(u).ok());
        let scheme = item
            .get("protocol")
            .and_then(Value::as_str)
            .and_then(list_scheme)
            .or(from_url.as_ref().map(|u| u.scheme))
            .unwrap_or(ctx.scheme);
        let ip = item.get("ip").and_then(Value::as_str);
        let port = item.get("port").and_then(port_of);
        let country = item
            .get("ip_data")
            .and_then(|d| d.get("countryCode"))
            .and_then(Value::as_str);
        let anonymity = item
            .get("anonymity")
            .and_then(Value::as_str)
            .and_then(Anonymity::from_list);
        let c = match (ip, port, from_url) {
            (Some(ip), Some(port), _) => candidate(scheme, ip, &port, country, anonymity, ctx),
            (_, _, Some(mut u)) => {
                u.country = country.and_then(country_code);
                Some(Candidate {
                    upstream: u,
                    anonymity,
                    source: ctx.source.to_owned(),
                })
            }
            _ => None,
        };
        match c {
            Some(c) => out.candidates.push(c),
            None => out.invalid += 1,
        }
    }
    Ok(out)
}

/// Geonode: `{"data": [...], "total", "page", "limit"}`; `port` a string, `protocols` an
/// array (one candidate per protocol).
pub fn geonode_json(v: &Value, ctx: Ctx<'_>) -> Result<Parsed, ParseError> {
    if let Some(e) = api_error(v) {
        return Err(ParseError::ApiError(e));
    }
    let Some(items) = v.get("data").and_then(Value::as_array) else {
        return Err(ParseError::Shape(
            "expected an object with a \"data\" array".into(),
        ));
    };
    let mut out = Parsed {
        rows: items.len(),
        ..Parsed::default()
    };
    for item in items {
        let ip = item.get("ip").and_then(Value::as_str).unwrap_or_default();
        let port = item.get("port").and_then(port_of).unwrap_or_default();
        let country = item.get("country").and_then(Value::as_str);
        let anonymity = item
            .get("anonymityLevel")
            .or_else(|| item.get("anonymity"))
            .and_then(Value::as_str)
            .and_then(Anonymity::from_list);
        let mut schemes: Vec<Scheme> = match item.get("protocols") {
            Some(Value::Array(ps)) => ps
                .iter()
                .filter_map(Value::as_str)
                .filter_map(list_scheme)
                .collect(),
            _ => item
                .get("protocol")
                .and_then(Value::as_str)
                .and_then(list_scheme)
                .into_iter()
                .collect(),
        };
        schemes.dedup();
        let before = out.candidates.len();
        for scheme in schemes {
            if let Some(c) = candidate(scheme, ip, &port, country, anonymity, ctx) {
                out.candidates.push(c);
            }
        }
        if out.candidates.len() == before {
            out.invalid += 1;
        }
    }
    Ok(out)
}

/// proxy-list.download v2: `{"LISTA": [{"IP", "PORT", "ANON", "ISO", ...}]}`, also wrapped
/// in a one-element array (v0).
pub fn proxy_list_download_json(v: &Value, ctx: Ctx<'_>) -> Result<Parsed, ParseError> {
    let v = match v {
        Value::Array(a) if a.len() == 1 => &a[0],
        other => other,
    };
    let Some(items) = v.get("LISTA").and_then(Value::as_array) else {
        return Err(ParseError::Shape(
            "expected an object with a \"LISTA\" array".into(),
        ));
    };
    let mut out = Parsed {
        rows: items.len(),
        ..Parsed::default()
    };
    for item in items {
        let ip = item.get("IP").and_then(Value::as_str).unwrap_or_default();
        let port = item.get("PORT").and_then(port_of).unwrap_or_default();
        let country = item.get("ISO").and_then(Value::as_str);
        let anonymity = item
            .get("ANON")
            .and_then(Value::as_str)
            .and_then(Anonymity::from_list);
        match candidate(ctx.scheme, ip, &port, country, anonymity, ctx) {
            Some(c) => out.candidates.push(c),
            None => out.invalid += 1,
        }
    }
    Ok(out)
}

/// One generic JSON entry: `{"url"|"proxy": "scheme://..."}` or `{"ip"|"host", "port",
/// "protocol"|"scheme"|"type"|"protocols", "username", "password", "country", "anonymity"}`.
fn generic_entry(item: &Value, ctx: Ctx<'_>) -> Option<Candidate> {
    let str_of = |k: &str| item.get(k).and_then(Value::as_str);
    let anonymity = str_of("anonymity")
        .or(str_of("anonymityLevel"))
        .and_then(Anonymity::from_list);
    let country = str_of("country")
        .or(str_of("country_code"))
        .or_else(|| item.get("geolocation")?.get("country")?.as_str());
    if let Some(url) = str_of("url").or(str_of("proxy")) {
        let mut upstream = Upstream::parse(url).ok()?;
        if upstream.country.is_none() {
            upstream.country = country.and_then(country_code);
        }
        return Some(Candidate {
            upstream,
            anonymity,
            source: ctx.source.to_owned(),
        });
    }
    let host = str_of("ip").or(str_of("host"))?;
    let port = item.get("port").and_then(port_of)?;
    let scheme = str_of("protocol")
        .or(str_of("scheme"))
        .or(str_of("type"))
        .and_then(list_scheme)
        .or_else(|| {
            item.get("protocols")?
                .as_array()?
                .iter()
                .find_map(|p| p.as_str().and_then(list_scheme))
        })
        .unwrap_or(ctx.scheme);
    let mut c = candidate(scheme, host, &port, country, anonymity, ctx)?;
    if let (Some(user), Some(pass)) = (str_of("username"), str_of("password")) {
        c.upstream.credentials = Some(proxygate_core::Credentials {
            username: proxygate_core::Secret::new(user),
            password: proxygate_core::Secret::new(pass),
        });
    }
    Some(c)
}

/// Generic JSON lines: one object per line. Not one line of JSON: invalid JSON.
pub fn json_lines(text: &str, ctx: Ctx<'_>) -> Result<Parsed, ParseError> {
    let mut out = Parsed::default();
    let mut first_error = None;
    let mut json_lines = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        out.rows += 1;
        let entry = match serde_json::from_str::<Value>(line) {
            Ok(v) => {
                json_lines += 1;
                generic_entry(&v, ctx)
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
                None
            }
        };
        match entry {
            Some(c) => out.candidates.push(c),
            None => out.invalid += 1,
        }
    }
    match first_error {
        Some(e) if json_lines == 0 => Err(ParseError::Json(e)),
        _ => Ok(out),
    }
}

/// Generic JSON array of entries (proxifly, jetkai, monosans' `proxies.json`).
pub fn json_array(v: &Value, ctx: Ctx<'_>) -> Result<Parsed, ParseError> {
    let Some(items) = v.as_array() else {
        return Err(ParseError::Shape("expected an array of entries".into()));
    };
    let mut out = Parsed {
        rows: items.len(),
        ..Parsed::default()
    };
    for item in items {
        match generic_entry(item, ctx) {
            Some(c) => out.candidates.push(c),
            None => out.invalid += 1,
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// HTML

/// free-proxy-list.net and its sister pages: the table's rows (columns found by their header:
/// `IP Address`, `Port`, `Code`, `Anonymity`, `Version`...), or else the raw list of the
/// page's `<textarea>`. A page where neither yields a proxy failed (the layout changed).
pub fn free_proxy_list(html: &str, ctx: Ctx<'_>) -> Result<Parsed, ParseError> {
    use scraper::{Html, Selector};
    let doc = Html::parse_document(html);
    let sel = |s: &str| Selector::parse(s).ok();
    let (Some(table_sel), Some(th_sel), Some(tr_sel), Some(td_sel), Some(textarea_sel)) = (
        sel("table"),
        sel("thead th, tr th"),
        sel("tbody tr, tr"),
        sel("td"),
        sel("textarea"),
    ) else {
        return Err(ParseError::Html(": selectors".into()));
    };
    let text_of = |e: scraper::ElementRef<'_>| e.text().collect::<String>().trim().to_owned();
    let mut out = Parsed::default();
    for table in doc.select(&table_sel) {
        let headers: Vec<String> = table
            .select(&th_sel)
            .map(|th| text_of(th).to_ascii_lowercase())
            .collect();
        let col = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
        let ip_col = col(&["ip address", "ip"]).unwrap_or(0);
        let port_col = col(&["port"]).unwrap_or(1);
        let code_col = col(&["code"]).or(Some(2).filter(|_| headers.is_empty()));
        let version_col = col(&["version"]);
        let anon_col = col(&["anonymity"]).or(Some(4).filter(|_| headers.is_empty()));
        let mut seen_rows = std::collections::HashSet::new();
        for tr in table.select(&tr_sel) {
            if !seen_rows.insert(tr.id()) {
                continue;
            }
            let cells: Vec<String> = tr.select(&td_sel).map(text_of).collect();
            // The <tfoot> search inputs and layout rows have no address.
            let Some(ip) = cells
                .get(ip_col)
                .filter(|ip| cells.len() >= 7 && ip.parse::<std::net::IpAddr>().is_ok())
            else {
                continue;
            };
            out.rows += 1;
            let get = |i: Option<usize>| i.and_then(|i| cells.get(i)).map(String::as_str);
            let scheme = match get(version_col) {
                Some(v) => match list_scheme(v) {
                    Some(s) => s,
                    None => {
                        out.invalid += 1;
                        continue;
                    }
                },
                None => ctx.scheme,
            };
            let anonymity = get(anon_col).and_then(Anonymity::from_list);
            match candidate(
                scheme,
                ip,
                get(Some(port_col)).unwrap_or_default(),
                get(code_col),
                anonymity,
                ctx,
            ) {
                Some(c) => out.candidates.push(c),
                None => out.invalid += 1,
            }
        }
    }
    if out.candidates.is_empty() {
        // The raw list: two header lines ("Free proxies from ...", "Updated at ..."), maybe a
        // blank line, then ip:port lines.
        for area in doc.select(&textarea_sel) {
            let raw = area.text().collect::<String>();
            let body: String = raw
                .lines()
                .filter(|l| {
                    let l = l.trim();
                    l.split(':')
                        .next()
                        .is_some_and(|h| h.parse::<std::net::IpAddr>().is_ok())
                })
                .map(|l| format!("{l}\n"))
                .collect();
            let more = lines(&body, ctx);
            out.rows += more.rows;
            out.invalid += more.invalid;
            out.candidates.extend(more.candidates);
        }
    }
    if out.rows == 0 {
        return Err(ParseError::NoProxies(format!(
            "no proxy table and no raw list in the page{}",
            title(html)
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(scheme: Scheme) -> Ctx<'static> {
        Ctx {
            source: "test",
            scheme,
        }
    }

    /// Fuzzing found it (list_parsers): an HTML page whose title has a multi-byte character
    /// across byte 120 panicked while the error message was cut to length.
    #[test]
    fn a_long_non_ascii_title_is_cut_on_a_character() {
        let title = format!("{}\u{2019}{}", "a".repeat(119), "é".repeat(200));
        let page = format!("<html><head><title>{title}</title></head><body>no list</body></html>");
        for kind in [Kind::FreeProxyList, Kind::Generic, Kind::Proxyscrape] {
            let e = parse(kind, page.as_bytes(), ctx(Scheme::Http), false).unwrap_err();
            let t = e.to_string();
            assert!(t.contains(&"a".repeat(119)), "{kind:?}: {t}");
            assert!(t.chars().count() < 200, "{kind:?}: {t}");
        }
    }

    fn urls(p: &Parsed) -> Vec<String> {
        p.candidates
            .iter()
            .map(|c| {
                let mut s = c.upstream.expose_url();
                if let Some(a) = c.anonymity {
                    s.push_str(&format!(" {a}"));
                }
                s
            })
            .collect()
    }

    #[test]
    fn proxyscrape_text_crlf_and_lf() {
        let crlf = b"45.167.124.5:999\r\n103.152.112.162:80\r\n20.206.106.192:80\r\n";
        let p = parse(Kind::Proxyscrape, crlf, ctx(Scheme::Http), false).unwrap();
        assert_eq!(
            urls(&p),
            [
                "http://45.167.124.5:999",
                "http://103.152.112.162:80",
                "http://20.206.106.192:80"
            ]
        );
        let lf = b"http://203.0.113.4:8080\nsocks5://198.51.100.7:1080\nsocks4://192.0.2.91:4145";
        let p = parse(Kind::Proxyscrape, lf, ctx(Scheme::Http), false).unwrap();
        assert_eq!(
            urls(&p),
            [
                "http://203.0.113.4:8080",
                "socks5://198.51.100.7:1080",
                "socks4://192.0.2.91:4145"
            ]
        );
    }

    #[test]
    fn proxyscrape_json_skips_dead_rows_and_reads_ip_data() {
        let body = r#"{"shown_records":3,"proxies":[
 {"alive":true,"anonymity":"elite","ip":"45.86.229.39","port":11000,"protocol":"socks5","ssl":true,"timeout":261.4,"uptime":13.79,"ip_data":{"countryCode":"ES","as":"AS62005 BlueVPS OU"}},
 {"alive":true,"anonymity":"elite","ip":"202.179.76.105","port":51951,"protocol":"socks4","ssl":true,"ip_data":{"countryCode":"IN"}},
 {"alive":true,"ip":"203.0.113.9","port":"8080","protocol":"http","ip_data":null},
 {"alive":false,"ip":"1.2.3.4","port":8080,"protocol":"http","ip_data":{}}]}"#;
        let p = parse(Kind::Proxyscrape, body.as_bytes(), ctx(Scheme::Http), false).unwrap();
        assert_eq!(
            urls(&p),
            [
                "socks5://45.86.229.39:11000?country=es elite",
                "socks4://202.179.76.105:51951?country=in elite",
                "http://203.0.113.9:8080",
            ]
        );
        assert_eq!((p.rows, p.dead, p.invalid), (4, 1, 0));
        let empty = br#"{"shown_records":0,"total_records":5,"limit":2000,"skip":4000,"nextpage":false,"proxies":[]}"#;
        assert_eq!(
            parse(Kind::Proxyscrape, empty, ctx(Scheme::Http), true)
                .unwrap()
                .rows,
            0
        );
        assert!(matches!(
            parse(Kind::Proxyscrape, empty, ctx(Scheme::Http), false),
            Err(ParseError::NoProxies(_))
        ));
        assert!(matches!(
            parse(
                Kind::Proxyscrape,
                br#"{"success":false,"message":"rate limited"}"#,
                ctx(Scheme::Http),
                false
            ),
            Err(ParseError::ApiError(_))
        ));
    }

    #[test]
    fn geonode_string_ports_protocol_arrays_and_both_limit_types() {
        let body = r#"{"data":[{"_id":"60d7aa86ce5b3bb0e9890cb4","ip":"147.135.255.62","port":"8123","anonymityLevel":"elite","asn":"AS16276","city":"Gravelines","country":"FR","created_at":"2021-06-26T22:30:30.754Z","google":false,"hostName":null,"isp":"OVH SAS","lastChecked":1624971607,"latency":143,"org":"OVH","protocols":["https"],"region":null,"responseTime":36,"speed":283,"updated_at":"2021-06-29T13:00:07.719Z","workingPercent":null,"upTime":100,"upTimeSuccessCount":61,"upTimeTryCount":61},{"_id":"x","ip":"116.100.220.220","anonymityLevel":"transparent","country":"VN","latency":184.703,"port":"1080","protocols":["socks4","socks5"]}],"total":1557,"page":1,"limit":"10"}"#;
        let p = parse(Kind::Geonode, body.as_bytes(), ctx(Scheme::Http), false).unwrap();
        assert_eq!(
            urls(&p),
            [
                "http://147.135.255.62:8123?country=fr elite",
                "socks4://116.100.220.220:1080?country=vn transparent",
                "socks5://116.100.220.220:1080?country=vn transparent",
            ]
        );
        for bad in [
            "null",
            r#"{"data": {"unexpected": true}}"#,
            r#"{"data": [}"#,
        ] {
            assert!(
                parse(Kind::Geonode, bad.as_bytes(), ctx(Scheme::Http), false).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn proxy_list_download_text_and_v2_json() {
        let v1 = b"185.26.197.13:8080\r\n138.118.104.166:999\r\n45.4.253.133:999\r\n";
        let p = parse(Kind::ProxyListDownload, v1, ctx(Scheme::Socks4), false).unwrap();
        assert_eq!(p.candidates.len(), 3);
        assert!(
            p.candidates
                .iter()
                .all(|c| c.upstream.scheme == Scheme::Socks4)
        );
        let v2 = br#"{"LISTA":[{"IP":"185.26.197.13","PORT":"8080","ANON":"Elite","COUNTRY":"Russian Federation","ISO":"RU","PING":"120"}]}"#;
        let p = parse(Kind::ProxyListDownload, v2, ctx(Scheme::Http), false).unwrap();
        assert_eq!(urls(&p), ["http://185.26.197.13:8080?country=ru elite"]);
        let v0 = br#"[{"LISTA":[{"IP":"185.26.197.13","PORT":8080}]}]"#;
        assert_eq!(
            parse(Kind::ProxyListDownload, v0, ctx(Scheme::Http), false)
                .unwrap()
                .candidates
                .len(),
            1
        );
    }

    const FPL: &str = r#"<!DOCTYPE html><html><head><title>Free Proxy List - Just Checked Proxy List</title></head><body>
<section id="list"><div class="container"><div class="table-responsive fpl-list">
<table class="table table-striped table-bordered"><thead><tr><th>IP Address</th><th>Port</th><th>Code</th><th class='hm'>Country</th><th>Anonymity</th><th class='hm'>Google</th><th class='hx'>Https</th><th class='hm'>Last Checked</th></tr></thead><tbody><tr><td>195.154.84.106</td><td>5566</td><td>FR</td><td class='hm'>France</td><td>elite proxy</td><td class='hm'>no</td><td class='hx'>yes</td><td class='hm'>1 minute ago</td></tr><tr><td>24.172.82.94</td><td>53281</td><td>US</td><td class='hm'>United States</td><td>transparent</td><td class='hm'></td><td class='hx'>no</td><td class='hm'>1 minute ago</td></tr></tbody><tfoot><tr><th class="input"><input type="text" /></th></tr></tfoot></table></div></div></section>
<div class="modal fade" id="raw"><div class="modal-dialog"><div class="modal-content"><div class="modal-body"><textarea class="form-control" readonly="readonly" rows="12" onclick="select(this)">Free proxies from free-proxy-list.net
Updated at 2021-08-14 04:32:18 UTC.

195.154.84.106:5566
24.172.82.94:53281
</textarea></div></div></div></div></body></html>"#;

    #[test]
    fn free_proxy_list_table_then_textarea() {
        let p = parse(
            Kind::FreeProxyList,
            FPL.as_bytes(),
            ctx(Scheme::Http),
            false,
        )
        .unwrap();
        assert_eq!(
            urls(&p),
            [
                "http://195.154.84.106:5566?country=fr elite",
                "http://24.172.82.94:53281?country=us transparent"
            ]
        );
        // The table gone (a layout change), the raw list still reads.
        let start = FPL.find("<section").unwrap();
        let end = FPL.find("</section>").unwrap() + "</section>".len();
        let no_table = format!("{}{}", &FPL[..start], &FPL[end..]);
        let p = parse(
            Kind::FreeProxyList,
            no_table.as_bytes(),
            ctx(Scheme::Http),
            false,
        )
        .unwrap();
        assert_eq!(
            urls(&p),
            ["http://195.154.84.106:5566", "http://24.172.82.94:53281"]
        );
        // Neither: a failed fetch, not an empty list.
        let nothing = "<html><head><title>Maintenance</title></head><body>back soon</body></html>";
        let e = parse(
            Kind::FreeProxyList,
            nothing.as_bytes(),
            ctx(Scheme::Http),
            false,
        )
        .unwrap_err();
        assert!(
            matches!(e, ParseError::NoProxies(ref m) if m.contains("Maintenance")),
            "{e}"
        );
    }

    #[test]
    fn socks_proxy_net_version_column() {
        let html = "<html><table><thead><tr><th>IP Address</th><th>Port</th><th>Code</th><th class='hm'>Country</th><th>Version</th><th>Anonymity</th><th class='hx'>Https</th><th class='hm'>Last Checked</th></tr></thead><tbody><tr><td>45.133.16.88</td><td>1080</td><td>CA</td><td class='hm'>Canada</td><td>Socks5</td><td>Anonymous</td><td class='hx'>Yes</td><td class='hm'>2 mins ago</td></tr><tr><td>98.1.2.3</td><td>4145</td><td>US</td><td class='hm'>United States</td><td>Socks4</td><td>Anonymous</td><td class='hx'>No</td><td class='hm'>1 min ago</td></tr></tbody></table></html>";
        let p = parse(
            Kind::FreeProxyList,
            html.as_bytes(),
            ctx(Scheme::Http),
            false,
        )
        .unwrap();
        assert_eq!(
            urls(&p),
            [
                "socks5://45.133.16.88:1080?country=ca anonymous",
                "socks4://98.1.2.3:4145?country=us anonymous"
            ]
        );
    }

    #[test]
    fn generic_lines_urls_and_json() {
        let text = "# my paid list\n\n1.2.3.4:8080\nsocks5h://user:p%40ss@proxy.example:1080\n[2001:db8::1]:3128\n5.6.7.8 3128\n54.228.159.165:3128|Ireland|Leinster|Dublin\n45.133.16.88:1080 CA-H +\nnot an entry\n";
        let p = parse(Kind::Generic, text.as_bytes(), ctx(Scheme::Socks5), false).unwrap();
        assert_eq!(
            urls(&p),
            [
                "socks5://1.2.3.4:8080",
                "socks5h://user:p%40ss@proxy.example:1080",
                "socks5://[2001:db8::1]:3128",
                "socks5://5.6.7.8:3128",
                "socks5://54.228.159.165:3128",
                "socks5://45.133.16.88:1080",
            ]
        );
        assert_eq!(p.invalid, 1);
        let jsonl = "{\"url\":\"http://u:p@9.9.9.9:80\",\"country\":\"de\"}\n{\"ip\":\"8.8.4.4\",\"port\":\"1080\",\"protocol\":\"socks4\",\"anonymity\":\"elite\"}\n{\"host\":\"7.7.7.7\",\"port\":3128,\"username\":\"a\",\"password\":\"b\"}\n";
        let p = parse(Kind::Generic, jsonl.as_bytes(), ctx(Scheme::Http), false).unwrap();
        assert_eq!(
            urls(&p),
            [
                "http://u:p@9.9.9.9:80?country=de",
                "socks4://8.8.4.4:1080 elite",
                "http://a:b@7.7.7.7:3128"
            ]
        );
        let arr = r#"[{"proxy":"socks5://208.102.51.6:58208","protocol":"socks5","ip":"208.102.51.6","port":58208,"https":false,"anonymity":"transparent","score":1,"geolocation":{"country":"US","city":"Alexandria"}}]"#;
        let p = parse(Kind::Generic, arr.as_bytes(), ctx(Scheme::Http), false).unwrap();
        assert_eq!(
            urls(&p),
            ["socks5://208.102.51.6:58208?country=us transparent"]
        );
    }

    #[test]
    fn every_failure_body_is_a_failure() {
        let cloudflare = "<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title></head><body><div id=\"challenge-platform\"></div></body></html>";
        let apache404 = "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\"><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>";
        for kind in [
            Kind::Proxyscrape,
            Kind::Geonode,
            Kind::ProxyListDownload,
            Kind::Generic,
        ] {
            for (body, want) in [
                ("", "empty body"),
                ("  \r\n ", "empty body"),
                ("<html>502 Bad Gateway</html>", "HTML page"),
                (apache404, "404 Not Found"),
                (cloudflare, "Cloudflare"),
                ("null", ""),
                ("{\"data\": {\"unexpected\": true}}", ""),
                ("{\"proxies\": [", "invalid JSON"),
                ("NOTFOUND", ""),
            ] {
                let r = parse(kind, body.as_bytes(), ctx(Scheme::Http), false);
                let e = r.expect_err(&format!("{kind:?} read {body:?} as a list"));
                assert!(e.to_string().contains(want), "{kind:?} {body:?}: {e}");
            }
        }
        assert_eq!(
            parse(
                Kind::FreeProxyList,
                cloudflare.as_bytes(),
                ctx(Scheme::Http),
                false
            ),
            Err(ParseError::Cloudflare)
        );
    }
}
