//! The short way through the upstream's reply to our CONNECT, the head every tunnel through an
//! HTTP upstream reads. It reads the reply only in its plainest form, the form proxies send
//! (CRLF line endings, token names, values of visible ASCII, spaces and tabs), and answers
//! exactly what httparse would; anything else, an incomplete head included, is `None`, and
//! httparse decides. Property tests below and the fuzz target hold both to httparse's reading,
//! byte for byte.
//!
//! httparse is general (obs-text, bare LF, leading empty lines): its status line reads byte by
//! byte, and each field passes through its SIMD dispatch. For a proxy's short reply the short
//! way takes half its time (`benches/head.rs`: tinyproxy's 35 -> 18 ns, squid's 27 -> 9 ns),
//! and less since values are read eight bytes at a time (15 and 7 ns, httparse 36 and 28 in
//! the same run).
//! The client's CONNECT head had a short way too, until that bench timed it: httparse's SIMD
//! read the same heads 8-24 % faster (most over a browser's long User-Agent), for all the
//! short way's fewer instructions.

/// A token character (RFC 9110 §5.6.2), as a method and a field name are made of.
const TOKEN: u8 = 1;
/// A character of a field value or a reason phrase, as the short way takes them: visible
/// ASCII, space and tab (no obs-text: httparse's to judge).
const VALUE: u8 = 2;

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
    let len = fields(buf, at, REPLY_FIELDS)?;
    Some((status, len))
}

/// The fields from `at` to the empty line that ends the head, each a token name, `:` and a
/// value of visible ASCII, spaces and tabs on a line of its own, at most `max` of them (`None`
/// if more): the head's length.
fn fields(buf: &[u8], mut at: usize, max: usize) -> Option<usize> {
    for n in 0..=max {
        if buf.get(at) == Some(&b'\r') {
            return crlf(buf, at);
        }
        if n == max {
            break;
        }
        let name_len = run(buf.get(at..)?, TOKEN);
        if name_len == 0 || buf.get(at + name_len) != Some(&b':') {
            return None;
        }
        at = line_end(buf, at + name_len + 1, VALUE)?;
    }
    None
}

/// How many bytes at the start of `buf` are of `class`. A run of [`VALUE`] bytes (a reason,
/// a field's value) is taken eight at a time while they are all printable, the common case.
fn run(buf: &[u8], class: u8) -> usize {
    let mut at = 0;
    if class == VALUE {
        while let Some(chunk) = buf.get(at..at + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if !all_printable(u64::from_le_bytes(word)) {
                break;
            }
            at += 8;
        }
    }
    at + buf[at..]
        .iter()
        .position(|&b| CLASSES[usize::from(b)] & class == 0)
        .unwrap_or(buf.len() - at)
}

/// Whether every byte of `x` is in `' '..='~'` (no control byte, no DEL, nothing past ASCII):
/// the classic tests for a byte below a bound and above one, on all eight at once.
fn all_printable(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte below 0x20 borrows into its high bit (`& !x` leaves out the bytes whose high bit
    // was set before: the next test takes those).
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
    // A byte of 0x7f carries into its high bit with 1 added; one of 0x80 or more has it set.
    let above_tilde = (x.wrapping_add(ONES) | x) & HIGHS;
    below_space | above_tilde == 0
}

/// The index after the CRLF that ends the line of `class` bytes starting at `from`.
fn line_end(buf: &[u8], from: usize, class: u8) -> Option<usize> {
    crlf(buf, from + run(buf.get(from..)?, class))
}

/// The index after a CRLF at `at`.
fn crlf(buf: &[u8], at: usize) -> Option<usize> {
    (buf.get(at..at + 2)? == b"\r\n").then_some(at + 2)
}

/// An upstream's CONNECT reply head as the dialer reads it: the short way, and httparse for
/// anything else. The status and the head's length once complete.
pub(crate) fn reply(buf: &[u8]) -> Result<httparse::Status<(u16, usize)>, httparse::Error> {
    match simple_reply(buf) {
        Some(reply) => Ok(httparse::Status::Complete(reply)),
        None => general_reply(buf),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Eight bytes at once read as one at a time would: every byte value in every place.
    #[test]
    fn all_printable_is_each_byte_printable() {
        for place in 0..8 {
            for b in 0..=255u8 {
                let mut word = *b"abcdefgh";
                word[place] = b;
                assert_eq!(
                    all_printable(u64::from_le_bytes(word)),
                    (b' '..=b'~').contains(&b),
                    "{b:#04x} at {place}"
                );
            }
        }
    }

    /// The eight-at-a-time run stops where the bytewise one does, from any length, at any
    /// byte.
    #[test]
    fn a_value_run_ends_where_each_byte_says() {
        for len in 0..40 {
            for stop in [b'\r', b'\t', 0, 0x7f, 0x80, 0xff, b'~'] {
                let mut buf = vec![b'x'; len];
                buf.push(stop);
                buf.extend_from_slice(b"yyyyyyyyyy");
                let bytewise = buf
                    .iter()
                    .position(|&b| CLASSES[usize::from(b)] & VALUE == 0)
                    .unwrap_or(buf.len());
                assert_eq!(run(&buf, VALUE), bytewise, "{len} then {stop:#04x}");
                assert_eq!(run(&buf[..len], VALUE), len);
            }
        }
    }

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
    }
}
