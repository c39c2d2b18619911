//! PROXY protocol v1 and v2 headers, so an instance sees the real client address.
//!
//! The header is the first thing written to the backend, before any client byte (in
//! passthrough, before the spliced ClientHello). It is built into a fixed array — no
//! allocation per connection — following haproxy's `proxy-protocol.txt`: v1 is the text line
//! `PROXY TCP4|TCP6 src dst sport dport\r\n`, v2 the 12-byte signature, `0x21` (version 2,
//! PROXY), the family byte (`0x11` TCP over IPv4, `0x21` TCP over IPv6), the address block
//! length, then source address, destination address, source port and destination port.
//! IPv4-mapped IPv6 addresses (what a dual-stack listener reports for IPv4 clients) are sent
//! as IPv4; if the two ends still differ in family, both are sent as IPv6.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];

/// Largest v1 line: `PROXY TCP6 ` + two full IPv6 addresses + two ports + separators + CRLF.
const V1_MAX_LEN: usize = 107;
/// v2 version 2, command PROXY.
const V2_VERSION_PROXY: u8 = 0x21;
/// v2 family byte: AF_INET, SOCK_STREAM.
const V2_TCP4: u8 = 0x11;
/// v2 family byte: AF_INET6, SOCK_STREAM.
const V2_TCP6: u8 = 0x21;

/// Which PROXY protocol version a rule asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The human-readable text header.
    V1,
    /// The binary header.
    V2,
}

/// An encoded PROXY header, ready to be written to the backend.
#[derive(Clone, Copy)]
pub struct ProxyHeader {
    buf: [u8; V1_MAX_LEN],
    len: usize,
}

impl ProxyHeader {
    /// The header bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for ProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ProxyHeader")
            .field(&self.as_bytes().escape_ascii().to_string())
            .finish()
    }
}

/// Encodes a header saying the connection came from `source` (the client) to `destination`
/// (the address the client connected to, i.e. the listener's local address).
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> ProxyHeader {
    match version {
        Version::V1 => encode_v1(source, destination),
        Version::V2 => encode_v2(source, destination),
    }
}

/// `addr` with an IPv4-mapped IPv6 address (a dual-stack listener's IPv4 peer) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Brings both ends to one family: IPv4-mapped addresses become IPv4, and if the families
/// still differ the IPv4 end becomes IPv4-mapped IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(source), canonical(destination));
    let widen = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        (widen(s), widen(d))
    }
}

/// Encodes a v1 (text) header.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> ProxyHeader {
    let (s, d) = same_family(source, destination);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    let mut header = ProxyHeader {
        buf: [0; V1_MAX_LEN],
        len: 0,
    };
    let mut cursor: &mut [u8] = &mut header.buf;
    let written = write!(
        cursor,
        "PROXY {proto} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    );
    header.len = V1_MAX_LEN - cursor.len();
    if written.is_err() {
        // Cannot happen (the buffer fits the longest line); the spec's fallback is valid.
        let unknown = b"PROXY UNKNOWN\r\n";
        header.buf[..unknown.len()].copy_from_slice(unknown);
        header.len = unknown.len();
    }
    header
}

/// Encodes a v2 (binary) header with the PROXY command.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> ProxyHeader {
    let (s, d) = same_family(source, destination);
    let mut header = ProxyHeader {
        buf: [0; V1_MAX_LEN],
        len: 0,
    };
    let mut put = |bytes: &[u8]| {
        let end = header.len + bytes.len();
        if let Some(dst) = header.buf.get_mut(header.len..end) {
            dst.copy_from_slice(bytes);
            header.len = end;
        }
    };
    put(&V2_SIGNATURE);
    match (s.ip(), d.ip()) {
        (IpAddr::V4(sa), IpAddr::V4(da)) => {
            put(&[V2_VERSION_PROXY, V2_TCP4]);
            put(&12u16.to_be_bytes());
            put(&sa.octets());
            put(&da.octets());
        }
        (sa, da) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            put(&[V2_VERSION_PROXY, V2_TCP6]);
            put(&36u16.to_be_bytes());
            put(&v6(sa).octets());
            put(&v6(da).octets());
        }
    }
    put(&s.port().to_be_bytes());
    put(&d.port().to_be_bytes());
    header
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;
