//! The short way through the two HTTP heads of every tunnel through an HTTP upstream: the
//! client's CONNECT request and the upstream's reply to ours. Each reads a head only in its
//! plainest form, the form clients and proxies send (CRLF line endings, token names, values of
//! visible ASCII, spaces and tabs), and answers exactly what httparse would; anything else,
//! an incomplete head included, is `None`, and httparse decides. Property tests below and the
//! fuzz targets hold both to httparse's reading, byte for byte.
//!
//! httparse is general (obs-text, bare LF, leading empty lines, folding where allowed): its
//! status line reads byte by byte, and each field passes through its SIMD dispatch. For the
//! two short heads of a tunnel the short way runs about half its instructions (a tinyproxy
//! reply ~960 -> ~450; curl's CONNECT ~900 -> ~670, fields filled in).

/// A token character (RFC 9110 §5.6.2), as a method and a field name are made of.
const TOKEN: u8 = 1;
/// A character of a field value or a reason phrase, as the short way takes them: visible
/// ASCII, space and tab (no obs-text: httparse's to judge).
const VALUE: u8 = 2;
/// A character of a request target as the short way takes it: visible ASCII.
const TARGET: u8 = 4;

/// Each byte's classes: one lookup per byte.
static CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
        {
            t[b] |= TOKEN;
        }
        if c == b'\t' || (c >= b' ' && c <= b'~') {
            t[b] |= VALUE;
        }
        if c > b' ' && c <= b'~' {
            t[b] |= TARGET;
        }
        b += 1;
    }
    t
};

/// Fields a CONNECT reply may have: the room the dialer gives httparse, and so the most the
/// short way reads (with more, both refuse the reply).
pub(crate) const REPLY_FIELDS: usize = 64;

/// The status and length of a complete CONNECT reply head in its plainest form: `HTTP/1.0`
/// or `HTTP/1.1`, a status of three digits, a reason (if any) of visible ASCII, spaces and
/// tabs, at most [`REPLY_FIELDS`] fields.
pub(crate) fn simple_reply(buf: &[u8]) -> Option<(u16, usize)> {
    let rest = buf
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let (code, rest) = rest.split_first_chunk::<3>()?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    // The reason, if any, up to the status line's end.
    let at = buf.len() - rest.len();
    let at = match rest.first()? {
        b' ' => line_end(buf, at + 1, VALUE)?,
        b'\r' => crlf(buf, at)?,
        _ => return None,
    };
    let (_, len) = fields(buf, at, REPLY_FIELDS, |_, _, _| Some(()))?;
    Some((status, len))
}

/// A CONNECT request head as the short way read it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Connect<'h> {
    /// The request target, as sent.
    pub(crate) target: &'h str,
    /// `HTTP/1.0` (not `HTTP/1.1`).
    pub(crate) http10: bool,
    /// How many fields it filled in.
    pub(crate) fields: usize,
    /// The head's length.
    pub(crate) len: usize,
}

/// A complete CONNECT request head in its plainest form: `CONNECT`, a target of visible ASCII,
/// `HTTP/1.0` or `HTTP/1.1`, and at most `out.len()` fields, which it fills in as httparse
/// would (names as sent, values without the spaces and tabs around them).
pub(crate) fn simple_connect<'h>(
    buf: &'h [u8],
    out: &mut [httparse::Header<'h>],
) -> Option<Connect<'h>> {
    let rest = buf.strip_prefix(b"CONNECT ")?;
    let target_len = run(rest, TARGET);
    if target_len == 0 {
        return None;
    }
    let (target, rest) = rest.split_at(target_len);
    let http10 = match rest.get(..11)? {
        b" HTTP/1.1\r\n" => false,
        b" HTTP/1.0\r\n" => true,
        _ => return None,
    };
    // Visible ASCII: UTF-8 as it is (the check is a formality the compiler cannot skip).
    let target = std::str::from_utf8(target).ok()?;
    let at = buf.len() - rest.len() + 11;
    let (n, len) = fields(buf, at, out.len(), |i, name, value| {
        // A token: ASCII, UTF-8 as it is.
        let name = std::str::from_utf8(name).ok()?;
        out[i] = httparse::Header {
            name,
            value: trim(value),
        };
        Some(())
    })?;
    Some(Connect {
        target,
        http10,
        fields: n,
        len,
    })
}

/// The fields from `at` to the empty line that ends the head, each a token name, `:` and a
/// value of visible ASCII, spaces and tabs on a line of its own, at most `max` of them (`None`
/// if more): each passed to `field` (its index, name and raw value) as it is read, which may
/// refuse it. How many, and the head's length.
fn fields<'h>(
    buf: &'h [u8],
    mut at: usize,
    max: usize,
    mut field: impl FnMut(usize, &'h [u8], &'h [u8]) -> Option<()>,
) -> Option<(usize, usize)> {
    for n in 0..=max {
        if buf.get(at) == Some(&b'\r') {
            return Some((n, crlf(buf, at)?));
        }
        if n == max {
            break;
        }
        let name_len = run(buf.get(at..)?, TOKEN);
        if name_len == 0 || buf.get(at + name_len) != Some(&b':') {
            return None;
        }
        let from = at + name_len + 1;
        let end = line_end(buf, from, VALUE)?;
        field(n, &buf[at..at + name_len], &buf[from..end - 2])?;
        at = end;
    }
    None
}

/// A field's value as httparse gives it: without the spaces and tabs around it.
fn trim(value: &[u8]) -> &[u8] {
    let value = value.trim_ascii_start();
    let trailing = value
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &value[..value.len() - trailing]
}

/// How many bytes at the start of `buf` are of `class`.
fn run(buf: &[u8], class: u8) -> usize {
    buf.iter()
        .position(|&b| CLASSES[usize::from(b)] & class == 0)
        .unwrap_or(buf.len())
}

/// The index after the CRLF that ends the line of `class` bytes starting at `from`.
fn line_end(buf: &[u8], from: usize, class: u8) -> Option<usize> {
    crlf(buf, from + run(buf.get(from..)?, class))
}

/// The index after a CRLF at `at`.
fn crlf(buf: &[u8], at: usize) -> Option<usize> {
    (buf.get(at..at + 2)? == b"\r\n").then_some(at + 2)
}

/// A CONNECT reply head the general way, by httparse, with room for [`REPLY_FIELDS`] fields:
/// what the dialer falls back on where [`simple_reply`] answers `None`, and what that must
/// agree with. The status and the head's length.
pub(crate) fn general_reply(buf: &[u8]) -> Result<httparse::Status<(u16, usize)>, httparse::Error> {
    // Left uninitialised: zeroing 64 header slots (2 KiB) per reply cost more than parsing a
    // short one.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; REPLY_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    )?;
    Ok(match parsed {
        httparse::Status::Complete(n) => httparse::Status::Complete((resp.code.unwrap_or(0), n)),
        httparse::Status::Partial => httparse::Status::Partial,
    })
}

/// A complete reply head as [`general_reply`] reads it (`None`: incomplete or invalid).
pub(crate) fn httparse_reply(buf: &[u8]) -> Option<(u16, usize)> {
    match general_reply(buf) {
        Ok(httparse::Status::Complete(reply)) => Some(reply),
        _ => None,
    }
}

/// Whether httparse reads `buf` as [`simple_connect`] did (`got`, with `fields` filled in):
/// method, target, version, every field and the length.
pub(crate) fn httparse_agrees(
    buf: &[u8],
    got: &Connect<'_>,
    fields: &[httparse::Header<'_>],
) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            req.method == Some("CONNECT")
                && req.path == Some(got.target)
                && req.version == Some(u8::from(!got.http10))
                && n == got.len
                && req.headers.len() == got.fields
                && req
                    .headers
                    .iter()
                    .zip(&fields[..got.fields])
                    .all(|(a, b)| a.name == b.name && a.value == b.value)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_replies_take_the_short_way() {
        for (reply, status) in [
            (&b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n"[..], 200),
            (b"HTTP/1.1 200 Connection established\r\n\r\n", 200),
            (b"HTTP/1.1 200 OK\r\nVia: 1.1 squid\r\nX-Empty:\r\nX:\t tab and space \r\n\r\n", 200),
            (b"HTTP/1.1 200\r\n\r\n", 200),
            (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n", 407),
        ] {
            let got = simple_reply(reply);
            assert_eq!(got, Some((status, reply.len())), "{}", String::from_utf8_lossy(reply));
            assert_eq!(got, httparse_reply(reply));
            // What follows the head is the tunnel's, not the head's.
            let mut more = reply.to_vec();
            more.extend_from_slice(b"\x16\x03\x01 hello");
            assert_eq!(simple_reply(&more), got);
        }
    }

    #[test]
    fn anything_unusual_is_left_to_httparse() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\n"[..],                // incomplete
            b"HTTP/1.1 200 OK\r\nVia: x\r\n",           // incomplete
            b"HTTP/1.1 200 OK\n\n",                     // bare LF
            b"HTTP/1.1 200 OK\r\nVia : x\r\n\r\n",      // space before the colon
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",      // a continuation line
            b"HTTP/1.1 200 D\xc3\xa9j\xc3\xa0\r\n\r\n", // obs-text reason
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(
                simple_reply(reply),
                None,
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
        let many: String = (0..65).map(|i| format!("X-{i}: v\r\n")).collect();
        let reply = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(simple_reply(reply.as_bytes()), None);
        assert_eq!(
            httparse_reply(reply.as_bytes()),
            None,
            "httparse's 64 fields"
        );
        let sixty_four: String = (0..64).map(|i| format!("X-{i}: v\r\n")).collect();
        let reply = format!("HTTP/1.1 200 OK\r\n{sixty_four}\r\n");
        assert_eq!(simple_reply(reply.as_bytes()), Some((200, reply.len())));
    }

    #[test]
    fn every_byte_in_every_place_agrees_with_httparse() {
        let mut short = 0;
        for b in 0..=255u8 {
            for (before, after) in [
                (&b"HTTP/1.1 200 O"[..], &b"K\r\n\r\n"[..]),
                (b"HTTP/1.1 200 OK\r\nX", b"Y: v\r\n\r\n"),
                (b"HTTP/1.1 200 OK\r\nX: v", b"w\r\n\r\n"),
            ] {
                let reply = [before, &[b], after].concat();
                if let Some(got) = simple_reply(&reply) {
                    short += 1;
                    assert_eq!(Some(got), httparse_reply(&reply), "byte {b:#04x}");
                }
            }
        }
        // The 77 token characters in names (and `:`, which ends the name early), visible
        // ASCII, space and tab in reasons and values.
        assert_eq!(short, 78 + 2 * 96, "bytes read the short way");
    }

    /// Pieces any head is made of, well formed and not: line ends, separators, text, bytes.
    fn common_piece() -> BoxedStrategy<Vec<u8>> {
        prop_oneof![
            Just(b"\r\n".to_vec()),
            Just(b"\r\n\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b":".to_vec()),
            Just(b" ".to_vec()),
            Just(b"\t".to_vec()),
            "[ -~]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..4),
        ]
        .boxed()
    }

    /// Pieces of reply heads, for the properties below.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            1 => Just(b"HTTP/1.1 ".to_vec()),
            1 => Just(b"HTTP/1.0 ".to_vec()),
            1 => Just(b"HTTP/1.1 200 OK".to_vec()),
            1 => Just(b"Proxy-agent: x".to_vec()),
            1 => "[0-9]{1,4}".prop_map(String::into_bytes),
            9 => common_piece(),
        ]
    }

    proptest! {
        /// Whatever the short way reads, httparse reads the same: status and length.
        #[test]
        fn the_short_way_reads_replies_as_httparse(pieces in proptest::collection::vec(piece(), 0..24)) {
            let buf = pieces.concat();
            if let Some(short) = simple_reply(&buf) {
                prop_assert_eq!(Some(short), httparse_reply(&buf));
            }
        }
    }

    /// A field's name and value, owned.
    type Field = (String, Vec<u8>);

    /// [`simple_connect`] with room for 24 fields, checked against httparse when it answers.
    fn connect(head: &[u8]) -> Option<(Connect<'_>, Vec<Field>)> {
        let mut fields = [httparse::EMPTY_HEADER; 24];
        let c = simple_connect(head, &mut fields)?;
        assert!(
            httparse_agrees(head, &c, &fields),
            "{}",
            String::from_utf8_lossy(head)
        );
        let f = fields[..c.fields]
            .iter()
            .map(|f| (f.name.to_owned(), f.value.to_vec()))
            .collect();
        Some((c, f))
    }

    #[test]
    fn plain_connects_take_the_short_way() {
        let curl = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n";
        let (c, f) = connect(curl).unwrap();
        assert_eq!(
            (c.target, c.http10, c.fields, c.len),
            ("example.com:443", false, 3, curl.len())
        );
        assert_eq!(f[1], ("User-Agent".to_owned(), b"curl/7.88.1".to_vec()));
        let mut early = curl.to_vec();
        early.extend_from_slice(b"\x16\x03\x01\x02\x00");
        assert_eq!(connect(&early).unwrap().0.len, curl.len());
        // Values lose the spaces and tabs around them, as httparse trims them.
        let (c, f) = connect(b"CONNECT [::1]:8443 HTTP/1.0\r\nProxy-Authorization: \t Basic YTpi \t\r\nX-Empty:\r\n\r\n").unwrap();
        assert_eq!((c.target, c.http10), ("[::1]:8443", true));
        assert_eq!(f[0].1, b"Basic YTpi");
        assert_eq!(f[1].1, b"");
        let (c, _) = connect(b"CONNECT a:1 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(c.fields, 0);
    }

    #[test]
    fn unusual_connects_are_left_to_httparse() {
        for head in [
            &b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n"[..], // incomplete
            b"CONNECT a:1 HTTP/1.1\nHost: a:1\n\n",        // bare LF
            b"CONNECT a:1 HTTP/1.1\r\nHost : a:1\r\n\r\n", // space before the colon
            b"CONNECT a:1 HTTP/1.1\r\nX: a\r\n b\r\n\r\n", // folded
            b"CONNECT a:1 HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n", // obs-text
            b"CONNECT  a:1 HTTP/1.1\r\n\r\n",              // two spaces
            b"CONNECT a:1  HTTP/1.1\r\n\r\n",
            b"CONNECT a:1 HTTP/1.2\r\n\r\n",
            b"connect a:1 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"\r\nCONNECT a:1 HTTP/1.1\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\n:x\r\n\r\n",
        ] {
            let mut fields = [httparse::EMPTY_HEADER; 24];
            assert_eq!(
                simple_connect(head, &mut fields),
                None,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // More fields than room: httparse (with more room) decides.
        let many: String = (0..3).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n");
        let mut two = [httparse::EMPTY_HEADER; 2];
        assert_eq!(simple_connect(head.as_bytes(), &mut two), None);
        let mut three = [httparse::EMPTY_HEADER; 3];
        assert_eq!(
            simple_connect(head.as_bytes(), &mut three).map(|c| c.fields),
            Some(3)
        );
    }

    #[test]
    fn every_byte_in_every_place_of_a_connect_agrees_with_httparse() {
        let mut short = 0;
        for b in 0..=255u8 {
            for (before, after) in [
                (&b"CONNECT a"[..], &b":1 HTTP/1.1\r\n\r\n"[..]),
                (b"CONNECT a:1 HTTP/1.1\r\nX", b"Y: v\r\n\r\n"),
                (b"CONNECT a:1 HTTP/1.1\r\nX: v", b"w\r\n\r\n"),
                (b"CONNECT a:1 HTTP/1.1\r\nX:", b"\r\n\r\n"),
            ] {
                let head = [before, &[b], after].concat();
                if connect(&head).is_some() {
                    short += 1;
                }
            }
        }
        // Visible ASCII in targets; the 77 token characters in names (and `:`, which ends
        // the name early); visible ASCII, space and tab in values, twice.
        assert_eq!(short, 94 + 78 + 2 * 96, "bytes read the short way");
    }

    /// Pieces of CONNECT heads, for the properties below.
    fn connect_piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            1 => Just(b"CONNECT ".to_vec()),
            1 => Just(b"CONNECT a.example:443 HTTP/1.1\r\n".to_vec()),
            1 => Just(b" HTTP/1.1".to_vec()),
            1 => Just(b" HTTP/1.0".to_vec()),
            1 => Just(b"Proxy-Authorization: Basic YTpi".to_vec()),
            9 => common_piece(),
        ]
    }

    proptest! {
        /// Whatever the short way reads of a CONNECT head, httparse reads the same: target,
        /// version, each field, length.
        #[test]
        fn the_short_way_reads_connects_as_httparse(
            pieces in proptest::collection::vec(connect_piece(), 0..24)
        ) {
            let buf = pieces.concat();
            let mut fields = [httparse::EMPTY_HEADER; 24];
            if let Some(c) = simple_connect(&buf, &mut fields) {
                prop_assert!(httparse_agrees(&buf, &c, &fields), "{:?}", c);
            }
        }
    }

    /// A head's shape: `start`, some lines (mostly well-formed fields), mostly CRLF after
    /// each, mostly an empty line at the end, perhaps bytes after it.
    fn shaped(start: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
        let eol = || {
            prop_oneof![
                8 => Just(b"\r\n".to_vec()),
                1 => Just(b"\n".to_vec()),
                1 => Just(b"\r".to_vec()),
                1 => Just(Vec::new()),
            ]
        };
        let line = prop_oneof![
            6 => ("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,8}", "[ \t]{0,2}", "[ -~\t]{0,12}")
                .prop_map(|(n, ws, v)| format!("{n}:{ws}{v}").into_bytes()),
            1 => piece(),
            1 => connect_piece(),
        ];
        (
            start,
            eol(),
            proptest::collection::vec((line, eol()), 0..6),
            eol(),
            proptest::collection::vec(any::<u8>(), 0..3),
        )
            .prop_map(|(start, e, lines, end, after)| {
                let mut head = [start, e].concat();
                for (l, e) in lines {
                    head.extend(l);
                    head.extend(e);
                }
                head.extend(end);
                head.extend(after);
                head
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Replies of a head's shape: the short way reads most, as httparse does.
        #[test]
        fn shaped_replies_read_as_httparse(head in shaped(prop_oneof![
            4 => "HTTP/1\\.[01] [0-9]{3}( [ -~]{0,10})?".prop_map(String::into_bytes),
            1 => piece(),
        ])) {
            if let Some(short) = simple_reply(&head) {
                prop_assert_eq!(Some(short), httparse_reply(&head));
            }
        }

        /// CONNECT heads of a head's shape: the short way reads most, as httparse does.
        #[test]
        fn shaped_connects_read_as_httparse(head in shaped(prop_oneof![
            4 => "CONNECT [!-~]{1,12} HTTP/1\\.[01]".prop_map(String::into_bytes),
            1 => connect_piece(),
        ])) {
            let mut fields = [httparse::EMPTY_HEADER; 24];
            if let Some(c) = simple_connect(&head, &mut fields) {
                prop_assert!(httparse_agrees(&head, &c, &fields), "{:?}", c);
            }
        }
    }
}
