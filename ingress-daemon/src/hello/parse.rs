//! Pure ClientHello parser: bytes peeked so far in, SNI and ALPN out.
//!
//! The caller hands over everything peeked from the start of the connection. The parser walks
//! the TLS records from offset 0, concatenates the fragments of consecutive handshake records
//! until the ClientHello handshake message is whole, then parses it with `tls-parser`. A proper
//! prefix of a valid hello is always `Incomplete` with the total length worth waiting for; the
//! verdicts `NotTls`, `Invalid` and `TooLarge` are given as early as the bytes allow, so a
//! garbage or oversized stream is refused after its first few bytes, not after the cap.
//!
//! Framing is strict (RFC 8446 §5.1: handshake records only, non-empty, at most 2^14 bytes,
//! no interleaving), contents are read only where routing needs them (SNI, ALPN): unknown or
//! odd extensions are the backend's business. Memory is bounded by `max_hello_bytes`: a hello
//! that fits in one record is borrowed, a fragmented one is copied once into a buffer no larger
//! than the cap.
//!
//! This file depends only on `tls-parser`, `rustls-pki-types` and `thiserror` so that the fuzz
//! crate can compile it on its own (`#[path]`), without the rest of the daemon.

use rustls_pki_types::ServerName;
use tls_parser::{
    SNIType, TlsExtension, parse_tls_extension_alpn_content, parse_tls_extension_sni_content,
    parse_tls_extension_unknown, parse_tls_handshake_client_hello,
};

/// Default cap on the bytes of the TLS records that carry one ClientHello.
///
/// Post-quantum hellos are ~1.7–2.1 KB and anything up to 16 KiB is legitimate; twice that
/// leaves room for a maximal hello split over several records.
pub const DEFAULT_MAX_HELLO_BYTES: usize = 32 * 1024;

/// Length of a TLS record header: type, version, length.
const RECORD_HEADER_LEN: usize = 5;
/// Largest plaintext record fragment (RFC 8446 §5.1).
const MAX_FRAGMENT_LEN: usize = 1 << 14;
/// Length of a handshake message header: type and 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
/// TLS `ContentType` of handshake records.
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
/// Major version byte of every SSL 3.0/TLS record.
const RECORD_VERSION_MAJOR: u8 = 0x03;
/// `HandshakeType` of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// Smallest ClientHello body: version, random, session id length, cipher suites length,
/// compression methods length.
const MIN_CLIENT_HELLO_BODY: usize = 2 + 32 + 1 + 2 + 1;
/// Extension type of `server_name` (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension type of `application_layer_protocol_negotiation` (RFC 7301).
const EXT_ALPN: u16 = 16;

/// What a complete ClientHello says about where the connection should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `server_name` host name, lower-cased and without a trailing dot; `None` when the
    /// client sent none or sent an IP literal (which RFC 6066 forbids, so it is ignored).
    pub sni: Option<String>,
    /// The ALPN protocol names the client offered, in its order of preference.
    pub alpn: Vec<Vec<u8>>,
    /// Bytes of the TLS records that hold the hello, headers included, from offset 0.
    pub len: usize,
}

impl ClientHelloInfo {
    /// Whether the client offered the ALPN protocol `protocol` (e.g. `b"postgresql"`).
    pub fn offers_alpn(&self, protocol: &[u8]) -> bool {
        self.alpn.iter().any(|p| p.as_slice() == protocol)
    }
}

/// Why the bytes so far are not (yet) a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes are a valid prefix: wait until at least `needed` bytes in total are there.
    #[error("incomplete client hello: need at least {needed} bytes")]
    Incomplete {
        /// Total length (from offset 0) worth waiting for before parsing again.
        needed: usize,
    },
    /// The stream does not start with a TLS handshake record.
    #[error("not a tls handshake")]
    NotTls,
    /// The stream starts like TLS but the records or the hello are malformed.
    #[error("malformed client hello: {reason}")]
    Invalid {
        /// What was wrong, as a fixed phrase.
        reason: &'static str,
    },
    /// The hello (or the records announced for it) would exceed the cap.
    #[error("client hello of at least {len} bytes exceeds the cap of {max_hello_bytes} bytes")]
    TooLarge {
        /// Record bytes the hello needs at least.
        len: usize,
        /// The configured cap.
        max_hello_bytes: usize,
    },
}

/// Shorthand for [`ParseError::Invalid`].
const fn invalid(reason: &'static str) -> ParseError {
    ParseError::Invalid { reason }
}

/// Parses the ClientHello at the start of `buf`, refusing one whose records exceed
/// `max_hello_bytes`.
///
/// Never panics and never allocates more than `max_hello_bytes` for the message (plus the
/// small SNI/ALPN results), whatever `buf` holds.
pub fn parse_client_hello(
    buf: &[u8],
    max_hello_bytes: usize,
) -> Result<ClientHelloInfo, ParseError> {
    let (message, len) = reassemble(buf, max_hello_bytes)?;
    let mut info = parse_message(message.as_slice(buf))?;
    info.len = len;
    Ok(info)
}

/// The handshake message bytes: borrowed from the one record that holds them all, or copied
/// from several records.
enum Message {
    /// `buf[start..end]`.
    Borrowed { start: usize, end: usize },
    /// Concatenated fragments.
    Owned(Vec<u8>),
}

impl Message {
    fn as_slice<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match self {
            Message::Borrowed { start, end } => buf.get(*start..*end).unwrap_or_default(),
            Message::Owned(v) => v,
        }
    }
}

/// Walks the handshake records at the start of `buf` and returns the whole ClientHello
/// handshake message (header included) and the record bytes that carried it.
fn reassemble(buf: &[u8], max_hello_bytes: usize) -> Result<(Message, usize), ParseError> {
    let mut pos = 0usize;
    // Fragments seen so far: the first record's range, or the concatenation once a second
    // record is needed.
    let mut first: Option<(usize, usize)> = None;
    let mut owned: Option<Vec<u8>> = None;
    // Total handshake message length (header included) once its header is known.
    let mut message_len: Option<usize> = None;

    loop {
        let header = match check_record_header(buf, pos) {
            Err(ParseError::Incomplete { needed }) if needed > max_hello_bytes => {
                return Err(ParseError::TooLarge {
                    len: needed,
                    max_hello_bytes,
                });
            }
            other => other?,
        };
        let fragment_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if fragment_len == 0 {
            return Err(invalid("empty handshake record"));
        }
        if fragment_len > MAX_FRAGMENT_LEN {
            return Err(invalid("record longer than 2^14 bytes"));
        }
        let start = pos + RECORD_HEADER_LEN;
        let record_end = start + fragment_len;
        if record_end > max_hello_bytes {
            return Err(ParseError::TooLarge {
                len: record_end,
                max_hello_bytes,
            });
        }
        let available_end = record_end.min(buf.len());
        let fragment = buf.get(start..available_end).unwrap_or_default();

        // Append this record's (possibly partial) fragment.
        let collected: &[u8] = match (first, owned.as_mut()) {
            (None, _) => {
                first = Some((start, available_end));
                fragment
            }
            (Some((s, e)), None) => {
                let mut v =
                    Vec::with_capacity(message_len.unwrap_or(max_hello_bytes).min(max_hello_bytes));
                v.extend_from_slice(buf.get(s..e).unwrap_or_default());
                v.extend_from_slice(fragment);
                owned.insert(v).as_slice()
            }
            (Some(_), Some(v)) => {
                v.extend_from_slice(fragment);
                v.as_slice()
            }
        };

        if message_len.is_none() {
            message_len = check_handshake_header(collected, max_hello_bytes)?;
        }
        if available_end < record_end {
            return Err(ParseError::Incomplete { needed: record_end });
        }
        pos = record_end;
        if let Some(total) = message_len
            && collected.len() >= total
        {
            let message = match owned {
                Some(mut v) => {
                    v.truncate(total);
                    Message::Owned(v)
                }
                None => {
                    let (s, _) = first.unwrap_or((0, 0));
                    Message::Borrowed {
                        start: s,
                        end: s + total,
                    }
                }
            };
            return Ok((message, record_end));
        }
    }
}

/// Checks the record header at `pos`, as far as it is present, and returns it once whole.
fn check_record_header(buf: &[u8], pos: usize) -> Result<[u8; RECORD_HEADER_LEN], ParseError> {
    let avail = buf.get(pos..).unwrap_or_default();
    let first_record = pos == 0;
    if let Some(&content_type) = avail.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        // SSLv2-compatible hellos (first byte 0x80) land here too: they cannot carry SNI.
        return Err(if first_record {
            ParseError::NotTls
        } else {
            invalid("record of another type inside the client hello")
        });
    }
    if let Some(&major) = avail.get(1)
        && major != RECORD_VERSION_MAJOR
    {
        return Err(if first_record {
            ParseError::NotTls
        } else {
            invalid("bad record version")
        });
    }
    match avail.get(..RECORD_HEADER_LEN) {
        Some(&[a, b, c, d, e]) => Ok([a, b, c, d, e]),
        _ => Err(ParseError::Incomplete {
            needed: pos + RECORD_HEADER_LEN,
        }),
    }
}

/// Checks the handshake header in the fragment bytes collected so far; returns the total
/// message length once the header is whole.
fn check_handshake_header(
    collected: &[u8],
    max_hello_bytes: usize,
) -> Result<Option<usize>, ParseError> {
    if let Some(&msg_type) = collected.first()
        && msg_type != HANDSHAKE_CLIENT_HELLO
    {
        return Err(invalid("first handshake message is not a client hello"));
    }
    let Some(&[_, a, b, c]) = collected.get(..HANDSHAKE_HEADER_LEN) else {
        return Ok(None);
    };
    let body_len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    if body_len < MIN_CLIENT_HELLO_BODY {
        return Err(invalid("client hello too short"));
    }
    let total = HANDSHAKE_HEADER_LEN + body_len;
    // At least one record header precedes it.
    if total + RECORD_HEADER_LEN > max_hello_bytes {
        return Err(ParseError::TooLarge {
            len: total + RECORD_HEADER_LEN,
            max_hello_bytes,
        });
    }
    Ok(Some(total))
}

/// Parses a whole ClientHello handshake message (header included). `len` is left at 0.
fn parse_message(message: &[u8]) -> Result<ClientHelloInfo, ParseError> {
    let body = message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
    let (rest, hello) = parse_tls_handshake_client_hello(body)
        .map_err(|_| invalid("malformed client hello body"))?;
    if !rest.is_empty() {
        return Err(invalid("bad extensions length"));
    }
    let mut info = ClientHelloInfo {
        sni: None,
        alpn: Vec::new(),
        len: 0,
    };
    let Some(mut extensions) = hello.ext else {
        return Ok(info);
    };
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let (rest, ext) =
            parse_tls_extension_unknown(extensions).map_err(|_| invalid("truncated extension"))?;
        extensions = rest;
        let TlsExtension::Unknown(ext_type, data) = ext else {
            return Err(invalid("truncated extension"));
        };
        seen.push(ext_type.0);
        match ext_type.0 {
            EXT_SERVER_NAME => info.sni = parse_sni(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    // RFC 8446 §4.2: no extension type may appear twice.
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid("duplicate extension"));
    }
    Ok(info)
}

/// Reads the `server_name` extension: at most one host name, a valid DNS name.
fn parse_sni(data: &[u8]) -> Result<Option<String>, ParseError> {
    let Ok((rest, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
        return Err(invalid("malformed server_name extension"));
    };
    if !rest.is_empty() {
        return Err(invalid("malformed server_name extension"));
    }
    let mut host_names = names.iter().filter(|(t, _)| *t == SNIType::HostName);
    let Some((_, name)) = host_names.next() else {
        return Ok(None);
    };
    if host_names.next().is_some() {
        return Err(invalid("several host names in server_name"));
    }
    match ServerName::try_from(*name) {
        Ok(ServerName::DnsName(dns)) => Ok(Some(dns.as_ref().to_ascii_lowercase())),
        // RFC 6066 §3 forbids IP literals; like rustls, treat them as absent.
        Ok(_) => Ok(None),
        Err(_) => Err(invalid("server name is not a valid dns name")),
    }
}

/// Reads the ALPN extension: a non-empty list of non-empty protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, ParseError> {
    let Ok((rest, TlsExtension::ALPN(protocols))) = parse_tls_extension_alpn_content(data) else {
        return Err(invalid("malformed alpn extension"));
    };
    if !rest.is_empty() || protocols.is_empty() || protocols.iter().any(|p| p.is_empty()) {
        return Err(invalid("malformed alpn extension"));
    }
    Ok(protocols.into_iter().map(<[u8]>::to_vec).collect())
}
