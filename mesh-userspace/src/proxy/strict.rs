//! HTTP/1 request framing as a strict origin accepts it (RFC 9112): what the engine refuses
//! with 400 instead of interpreting, because two parties could read it two ways — the way
//! requests are smuggled past a proxy.
//!
//! hyper already refuses malformed heads, and of a request with both `Content-Length` and
//! `Transfer-Encoding` it keeps only the latter and closes the connection after it; but by then
//! the request has been accepted and forwarded. The first head of every connection is therefore
//! read whole and checked here before hyper sees it: both length headers, several or
//! non-numeric `Content-Length`s, a transfer coding other than exactly `chunked`, obsolete line
//! folding, and a bare LF as a line end. Later requests on a kept-alive connection are checked
//! by hyper and [`super::http`]'s per-request framing check.
#![forbid(unsafe_code)]

/// The end of a head: its length including the empty line, if `buf` holds a whole one.
#[must_use]
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
}

/// Why the request head `head` (up to and including its empty line) is refused, if it is.
#[must_use]
pub fn head_problem(head: &[u8]) -> Option<&'static str> {
    // Every line ends with CRLF.
    for (i, b) in head.iter().enumerate() {
        if *b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            return Some("a line ends with a bare LF");
        }
    }
    let mut lines = head.split(|b| *b == b'\n').skip(1);
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    for line in &mut lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Some("obsolete line folding in a header");
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Some("a header line without a colon");
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings.push(value);
        }
    }
    if !lengths.is_empty() && !codings.is_empty() {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if lengths.len() > 1 {
        return Some("several Content-Length headers");
    }
    if lengths
        .iter()
        .any(|v| v.is_empty() || !v.iter().all(u8::is_ascii_digit))
    {
        return Some("invalid Content-Length");
    }
    match codings.as_slice() {
        [] => None,
        [one] if one.eq_ignore_ascii_case(b"chunked") => None,
        _ => Some("unsupported Transfer-Encoding (only chunked)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_origins_refuse_what_is_refused_here() {
        let ok = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
        ];
        for h in ok {
            assert_eq!(head_problem(h.as_bytes()), None, "{h:?}");
        }
        let bad = [
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                "several",
            ),
            ("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", "invalid"),
            ("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", "invalid"),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "unsupported",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "unsupported",
            ),
            ("GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", "folding"),
            ("GET / HTTP/1.1\nHost: a\n\n", "bare LF"),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", "bare LF"),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", "colon"),
        ];
        for (h, why) in bad {
            let problem = head_problem(h.as_bytes());
            assert!(
                problem.is_some_and(|p| p.contains(why)),
                "{h:?}: {problem:?}"
            );
        }
    }

    #[test]
    fn head_ends_are_found_with_either_line_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost"), None);
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the check.
        #[test]
        fn arbitrary_heads_are_judged_not_panicked(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = head_problem(&bytes);
            let _ = head_end(&bytes);
        }
    }
}
