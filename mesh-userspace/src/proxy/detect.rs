//! Protocol detection on a connection's first bytes (client-first protocols). Pure and
//! allocation-free apart from the SNI string, so it is fuzzed directly.
//!
//! - `PRI * HTTP/2.0…` (the HTTP/2 connection preface): h2c with prior knowledge, gRPC included.
//! - a request line `TOKEN SP target SP HTTP/1.x CRLF`: HTTP/1.1.
//! - a TLS handshake record: TLS, passed through opaque; the `ClientHello`'s SNI is recorded.
//! - anything else: opaque TCP.
//!
//! A server-first protocol sends nothing: the caller's timeout ends detection as opaque.

/// What a connection speaks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "protocol")]
pub enum Protocol {
    Http1,
    H2,
    Tls { sni: Option<String> },
    Opaque,
}

impl Protocol {
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::Tls { .. } => "tls",
            Self::Opaque => "opaque",
        }
    }

    /// A Service port's `appProtocol` that decides the protocol without detection.
    #[must_use]
    pub fn from_app_protocol(app: &str) -> Option<Self> {
        match app.to_ascii_lowercase().as_str() {
            "http" | "http1" | "http/1.1" => Some(Self::Http1),
            "h2c" | "kubernetes.io/h2c" | "grpc" | "http2" => Some(Self::H2),
            "tcp" | "opaque" => Some(Self::Opaque),
            "tls" | "https" | "kubernetes.io/wss" => Some(Self::Tls { sni: None }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Done(Protocol),
    /// The bytes so far fit more than one protocol.
    NeedMore,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest prefix worth waiting for: an HTTP/1 request line longer than this is handed to the
/// HTTP parser anyway (which answers 414/400); a TLS record is at most 16 KiB + header.
pub const MAX_DETECT_BYTES: usize = 16 * 1024 + 5;
const MAX_METHOD: usize = 20;
const MAX_REQUEST_LINE: usize = 8 * 1024;

#[must_use]
pub fn detect(buf: &[u8]) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    // HTTP/2 prior knowledge.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detection::Done(Protocol::H2)
        } else {
            Detection::NeedMore
        };
    }
    if buf[0] == 0x16 {
        return detect_tls(buf);
    }
    detect_http1(buf)
}

/// What to conclude when the timeout ends detection with `buf` read so far: a partial request
/// line goes to the HTTP parser (so a slow client gets 408 from it, not a silent opaque pipe).
#[must_use]
pub fn on_timeout(buf: &[u8]) -> Protocol {
    match detect(buf) {
        Detection::Done(p) => p,
        Detection::NeedMore if looks_like_http1_start(buf) => Protocol::Http1,
        Detection::NeedMore if buf.first() == Some(&0x16) => Protocol::Tls { sni: None },
        Detection::NeedMore => Protocol::Opaque,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn looks_like_http1_start(buf: &[u8]) -> bool {
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    method_len > 0
        && method_len <= MAX_METHOD
        && buf[..method_len].iter().all(u8::is_ascii_uppercase)
        && (method_len == buf.len() || buf[method_len] == b' ')
}

fn detect_http1(buf: &[u8]) -> Detection {
    if !looks_like_http1_start(buf) {
        return Detection::Done(Protocol::Opaque);
    }
    // A request line holds no control bytes; CR is allowed only as the start of its CRLF.
    let line_end = buf.windows(2).position(|w| w == b"\r\n");
    let scanned = &buf[..line_end.unwrap_or(buf.len())];
    let last = scanned.len().saturating_sub(1);
    let bad_byte = scanned
        .iter()
        .enumerate()
        .any(|(i, b)| b.is_ascii_control() && !(line_end.is_none() && i == last && *b == b'\r'));
    if bad_byte {
        return Detection::Done(Protocol::Opaque);
    }
    let Some(end) = line_end else {
        if buf.len() >= MAX_REQUEST_LINE {
            return Detection::Done(Protocol::Http1); // let the parser answer 414
        }
        return Detection::NeedMore;
    };
    let line = &buf[..end];
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Detection::Done(Protocol::Http1)
    } else {
        Detection::Done(Protocol::Opaque)
    }
}

fn detect_tls(buf: &[u8]) -> Detection {
    if buf.len() < 3 {
        return Detection::NeedMore;
    }
    if buf[1] != 0x03 || buf[2] > 0x04 {
        return Detection::Done(Protocol::Opaque);
    }
    if buf.len() < 5 {
        return Detection::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return Detection::NeedMore;
    }
    Detection::Done(Protocol::Tls {
        sni: client_hello_sni(&buf[5..5 + record_len]),
    })
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The server name of a `ClientHello` handshake message (RFC 8446 §4.1.2, RFC 6066 §3).
fn client_hello_sni(handshake: &[u8]) -> Option<String> {
    let mut c = Cursor(handshake);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = c.u24()?;
    let mut c = Cursor(c.take(len.min(c.0.len()))?);
    c.take(2 + 32)?; // legacy_version, random
    c.vec8()?; // legacy_session_id
    c.vec16()?; // cipher_suites
    c.vec8()?; // legacy_compression_methods
    let mut exts = Cursor(c.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty != 0 {
            continue;
        }
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name)
                    .ok()
                    .filter(|n| !n.is_empty() && n.len() <= 253)
                    .map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(sni: &str) -> Vec<u8> {
        let name = sni.as_bytes();
        let mut sni_ext = Vec::new();
        let list_len = 3 + name.len();
        sni_ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_ext.extend_from_slice(name);
        let mut exts = Vec::new();
        exts.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni_ext);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn http1_request_line() {
        assert_eq!(
            detect(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Detection::Done(Protocol::Http1)
        );
        assert_eq!(detect(b"GET /x HT"), Detection::NeedMore);
        assert_eq!(detect(b"GE"), Detection::NeedMore);
        assert_eq!(
            detect(b"GET /x FTP/1\r\n"),
            Detection::Done(Protocol::Opaque)
        );
        assert_eq!(
            detect(b"get / HTTP/1.1\r\n"),
            Detection::Done(Protocol::Opaque)
        );
        assert_eq!(detect(b"\x00\x01binary"), Detection::Done(Protocol::Opaque));
        assert_eq!(detect(b"HELLO\n"), Detection::Done(Protocol::Opaque));
        // Found by cargo-fuzz: a control byte inside an otherwise valid request line.
        assert_eq!(
            detect(b"P \x00P\r\x00 * HTTP/1.0\r\n"),
            Detection::Done(Protocol::Opaque)
        );
        assert_eq!(detect(b"GET / HTTP/1.1\r"), Detection::NeedMore);
    }

    #[test]
    fn h2_preface_needs_all_24_bytes() {
        assert_eq!(detect(&H2_PREFACE[..10]), Detection::NeedMore);
        let mut full = H2_PREFACE.to_vec();
        full.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(detect(&full), Detection::Done(Protocol::H2));
        // "PRI" alone could still be an HTTP/1 method.
        assert_eq!(detect(b"PRI"), Detection::NeedMore);
    }

    #[test]
    fn tls_sni() {
        let hello = client_hello("db.prod.svc");
        assert_eq!(
            detect(&hello),
            Detection::Done(Protocol::Tls {
                sni: Some("db.prod.svc".into())
            })
        );
        assert_eq!(detect(&hello[..20]), Detection::NeedMore);
        assert_eq!(
            detect(&[0x16, 0x07, 0x01]),
            Detection::Done(Protocol::Opaque)
        );
    }

    #[test]
    fn timeout_decisions() {
        assert_eq!(on_timeout(b"GET / HTTP/1.1\r\nHost"), Protocol::Http1);
        assert_eq!(on_timeout(b"POS"), Protocol::Http1);
        assert_eq!(on_timeout(b""), Protocol::Opaque);
        assert_eq!(on_timeout(&[0x16, 0x03]), Protocol::Tls { sni: None });
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_prefixes_are_consistent(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let full = detect(&bytes);
            let _ = on_timeout(&bytes);
            // Once decided, more bytes never change the decision (except SNI, which needs the
            // whole record and is only set once complete).
            for cut in 0..bytes.len() {
                if let Detection::Done(p) = detect(&bytes[..cut])
                    && !matches!(p, Protocol::Tls { .. }) {
                        proptest::prop_assert_eq!(Detection::Done(p), full.clone());
                    }
            }
        }
    }
}
