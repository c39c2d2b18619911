//! Minimal JSON value writers for the access log, tuned for the writer thread's cost.
//!
//! Strings are checked eight bytes at a time and copied whole when nothing needs escaping,
//! numbers are written two digits at a time, and a time stamp's date and time of day are
//! formatted once per second ([`Dates`]). The small writers are inlined into the line
//! writer (a call costs about as much as writing a short value); escaping is out of line.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
};

/// `00` to `99`.
const PAIRS: [[u8; 2]; 100] = {
    let mut table = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        table[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    table
};

/// The two digits of `n % 100`.
#[inline(always)]
fn pair(n: u64) -> [u8; 2] {
    PAIRS[(n % 100) as usize]
}

#[inline(always)]
fn digit(n: u64) -> u8 {
    b'0' + (n % 10) as u8
}

/// `n` (below 100,000) in decimal, as the first `len` of eight bytes. No loop and no branch:
/// the five digits are built in one word, then shifted past the leading zeros. For ports, which
/// mostly have five digits (a digit loop is cheaper for the short numbers of other fields).
#[inline(always)]
fn five(n: u64) -> ([u8; 8], usize) {
    let len = 1
        + usize::from(n >= 10)
        + usize::from(n >= 100)
        + usize::from(n >= 1000)
        + usize::from(n >= 10_000);
    let [h0, h1] = pair(n / 100);
    let [l0, l1] = pair(n);
    let word = u64::from_le_bytes([digit(n / 10_000), h0, h1, l0, l1, 0, 0, 0]);
    ((word >> (8 * (5 - len))).to_le_bytes(), len)
}

/// An unsigned integer in decimal. Up to five digits (ports, most byte counts and IDs) take
/// no loop and no variable-length copy.
#[inline(always)]
pub(super) fn uint(out: &mut Vec<u8>, n: u64) {
    match n {
        0..10 => out.push(digit(n)),
        10..100 => out.extend_from_slice(&pair(n)),
        100..1000 => {
            out.push(digit(n / 100));
            out.extend_from_slice(&pair(n));
        }
        1000..10_000 => {
            out.extend_from_slice(&pair(n / 100));
            out.extend_from_slice(&pair(n));
        }
        10_000..100_000 => {
            out.push(digit(n / 10_000));
            out.extend_from_slice(&pair(n / 100));
            out.extend_from_slice(&pair(n));
        }
        _ => {
            let mut digits = [0u8; 20];
            let mut i = digits.len();
            let mut n = n;
            while n > 0 {
                i -= 1;
                if let Some(d) = digits.get_mut(i) {
                    *d = digit(n);
                }
                n /= 10;
            }
            out.extend_from_slice(digits.get(i..).unwrap_or_default());
        }
    }
}

/// Whether `bytes` can be copied into a JSON string as they are: printable ASCII without `"`
/// and `\`. Checks a word at a time (the classic "has a byte below n" bit tricks; a false
/// alarm would only cost the slow path).
#[inline(always)]
fn is_plain(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = ONES * 0x80;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v;
    let special = |w: u64| {
        // Bytes below 0x20, bytes from 0x80 (not ASCII: checked on the slow path), `"`, `\`.
        ((w.wrapping_sub(ONES * 0x20) & !w)
            | w
            | has_zero(w ^ (ONES * u64::from(b'"')))
            | has_zero(w ^ (ONES * u64::from(b'\\'))))
            & HIGHS
    };
    let word = |chunk: &[u8]| u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
    if bytes.len() < 8 {
        if bytes.len() < 4 {
            return bytes
                .iter()
                .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\');
        }
        // Two overlapping four-byte reads cover 4 to 7 bytes.
        let half = |chunk: &[u8]| u64::from(u32::from_ne_bytes(chunk.try_into().unwrap_or([0; 4])));
        let head = half(bytes.get(..4).unwrap_or_default());
        let tail = half(bytes.get(bytes.len() - 4..).unwrap_or_default());
        return special(head | (tail << 32)) == 0;
    }
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0;
    for chunk in &mut chunks {
        found |= special(word(chunk));
    }
    if !chunks.remainder().is_empty() {
        // The last eight bytes, overlapping what was checked: no copy of the tail.
        found |= special(word(bytes.get(bytes.len() - 8..).unwrap_or_default()));
    }
    found == 0
}

/// A quoted string, escaped where JSON requires it; bytes that are not UTF-8 are replaced
/// (U+FFFD).
#[cfg(test)]
fn text(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    body(out, bytes);
    out.push(b'"');
}

/// A string's contents without the quotes, escaped like [`text`].
#[inline(always)]
pub(super) fn body(out: &mut Vec<u8>, bytes: &[u8]) {
    if is_plain(bytes) {
        out.extend_from_slice(bytes);
    } else {
        escaped(out, bytes);
    }
}

/// Appends the first `len` bytes of `buf`. The whole buffer is copied and the rest cut off
/// again: a copy of constant size is a few moves, one of variable size a call to `memcpy`.
#[inline(always)]
pub(super) fn put<const N: usize>(out: &mut Vec<u8>, buf: &[u8; N], len: usize) {
    out.extend_from_slice(buf);
    out.truncate(out.len() - (N - len.min(N)));
}

/// Writes `n` in decimal at `buf[at..]`, returning the end (digits beyond `buf` are lost).
#[inline(always)]
fn put_uint(buf: &mut [u8], at: usize, n: u64) -> usize {
    let mut len = 1;
    let mut rest = n;
    while rest >= 100 {
        rest /= 100;
        len += 2;
    }
    len += usize::from(rest >= 10);
    let end = at + len;
    let mut i = end;
    let mut rest = n;
    while rest >= 10 {
        i -= 2;
        if let Some(dst) = buf.get_mut(i..i + 2) {
            dst.copy_from_slice(&pair(rest));
        }
        rest /= 100;
    }
    if i > at
        && let Some(d) = buf.get_mut(at)
    {
        *d = digit(rest);
    }
    end
}

/// Bytes a [`Run`] holds in place: three vector moves.
const RUN_BYTES: usize = 96;

/// Bytes written as they are, built once and appended many times: the daemon's names after
/// their keys, and the runs built from an ingress's or a rule's name. A short run is appended
/// as one copy of constant size ([`put`]), which costs a few moves where a copy of variable
/// size costs a call to `memcpy`.
#[derive(Debug, Clone)]
pub(super) enum Run {
    /// Up to [`RUN_BYTES`], padded.
    Short {
        /// The bytes, then padding.
        bytes: [u8; RUN_BYTES],
        /// How many are the run's.
        len: usize,
    },
    /// Longer runs (long names).
    Long(Box<[u8]>),
}

impl Run {
    /// A run of `bytes`.
    pub(super) fn new(bytes: &[u8]) -> Self {
        let mut short = [0u8; RUN_BYTES];
        match short.get_mut(..bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                Self::Short {
                    bytes: short,
                    len: bytes.len(),
                }
            }
            None => Self::Long(bytes.into()),
        }
    }

    /// Appends the run to `out`.
    #[inline(always)]
    pub(super) fn append(&self, out: &mut Vec<u8>) {
        match self {
            Self::Short { bytes, len } => put(out, bytes, *len),
            Self::Long(bytes) => out.extend_from_slice(bytes),
        }
    }
}

#[cold]
#[inline(never)]
fn escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in String::from_utf8_lossy(bytes).as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 => {
                out.extend_from_slice(b"\\u00");
                let hex = b"0123456789abcdef";
                out.push(hex[usize::from(b >> 4)]);
                out.push(hex[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
}

/// A quoted string.
#[cfg(test)]
fn string(out: &mut Vec<u8>, s: &str) {
    text(out, s.as_bytes());
}

/// Each byte value in decimal: the number of digits, then the digits.
const OCTETS: [[u8; 4]; 256] = {
    let mut table = [[0u8; 4]; 256];
    let mut i = 0;
    while i < 256 {
        let (h, t, o) = (
            b'0' + (i / 100) as u8,
            b'0' + (i / 10 % 10) as u8,
            b'0' + (i % 10) as u8,
        );
        table[i] = if i >= 100 {
            [3, h, t, o]
        } else if i >= 10 {
            [2, t, o, 0]
        } else {
            [1, o, 0, 0]
        };
        i += 1;
    }
    table
};

/// `"1.2.3.4:`, the start of a quoted IPv4 socket address, in a buffer with room for the
/// port and the closing quote (`"255.255.255.255:65535"` is 23 bytes). Clients and backends
/// repeat, so the line writer keeps the last one built.
#[derive(Debug, Clone, Copy)]
pub(super) struct V4Head {
    /// Room for the head (at most 17 bytes), the port's eight-byte word and the quote.
    buf: [u8; 32],
    len: usize,
}

impl V4Head {
    /// The start of `ip`'s addresses: each octet writes three bytes and advances by its digits
    /// and a dot; the last dot becomes the colon.
    #[inline(always)]
    pub(super) fn new(ip: Ipv4Addr) -> Self {
        let mut buf = [0u8; 32];
        buf[0] = b'"';
        let mut at = 1;
        for o in ip.octets() {
            let [len, digits @ ..] = OCTETS[usize::from(o)];
            if let Some(dst) = buf.get_mut(at..at + 3) {
                dst.copy_from_slice(&digits);
            }
            at += usize::from(len);
            if let Some(dot) = buf.get_mut(at) {
                *dot = b'.';
            }
            at += 1;
        }
        if let Some(colon) = buf.get_mut(at - 1) {
            *colon = b':';
        }
        Self { buf, len: at }
    }

    /// Appends the quoted address with `port`, built on the stack and copied once.
    #[inline(always)]
    pub(super) fn write(&self, out: &mut Vec<u8>, port: u16) {
        let mut buf = self.buf;
        let (digits, len) = five(u64::from(port));
        let at = self.len;
        if let Some(dst) = buf.get_mut(at..at + 8) {
            dst.copy_from_slice(&digits);
        }
        if let Some(quote) = buf.get_mut(at + len) {
            *quote = b'"';
        }
        put(out, &buf, at + len + 1);
    }
}

/// A quoted socket address (`1.2.3.4:5`, `[::1]:5`) or `null`.
#[inline(always)]
pub(super) fn addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        Some(SocketAddr::V4(addr)) => V4Head::new(*addr.ip()).write(out, addr.port()),
        Some(addr @ SocketAddr::V6(_)) => {
            let _ = write!(out, "\"{addr}\"");
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Milliseconds with microsecond precision (`12.345`).
#[inline(always)]
pub(super) fn millis(out: &mut Vec<u8>, micros: u64) {
    // At most 17 digits, the point and three digits.
    let mut buf = [0u8; 24];
    let at = put_uint(&mut buf, 0, micros / 1000);
    let frac = micros % 1000;
    if let Some(dst) = buf.get_mut(at..at + 4) {
        let [t, h] = pair(frac);
        dst.copy_from_slice(&[b'.', digit(frac / 100), t, h]);
    }
    put(out, &buf, at + 4);
}

/// RFC 3339 UTC time stamps with microseconds (`2026-01-02T03:04:05.678901Z`), the part up to
/// the second formatted once per second.
#[derive(Debug, Default)]
pub(super) struct Dates {
    second: Option<u64>,
    /// `{"time":"` and the date and time of day of `second`.
    prefix: [u8; 29],
}

impl Dates {
    /// A line's start: `{"time":"` and the time `unix_micros` microseconds after the epoch,
    /// without the closing quote.
    #[inline(always)]
    pub(super) fn head(&mut self, unix_micros: u64) -> [u8; 36] {
        let secs = unix_micros / 1_000_000;
        if self.second != Some(secs) {
            let mut prefix = [0u8; 29];
            prefix[..9].copy_from_slice(b"{\"time\":\"");
            prefix[9..].copy_from_slice(&date_time(secs));
            self.prefix = prefix;
            self.second = Some(secs);
        }
        let micros = unix_micros % 1_000_000;
        let [a, b] = pair(micros / 10_000);
        let [c, d] = pair(micros / 100);
        let [e, f] = pair(micros);
        let mut head = [0u8; 36];
        head[..29].copy_from_slice(&self.prefix);
        head[29..].copy_from_slice(&[a, b, c, d, e, f, b'Z']);
        head
    }

    /// Writes the time `unix_micros` microseconds after the epoch, without quotes.
    #[cfg(test)]
    pub(super) fn rfc3339(&mut self, out: &mut Vec<u8>, unix_micros: u64) {
        out.extend_from_slice(&self.head(unix_micros)[9..]);
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` of a second since the epoch.
fn date_time(secs: u64) -> [u8; 20] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let [y0, y1] = pair(year / 100);
    let [y2, y3] = pair(year);
    let [m0, m1] = pair(month);
    let [d0, d1] = pair(day);
    let [h0, h1] = pair(rem / 3600);
    let [i0, i1] = pair(rem % 3600 / 60);
    let [s0, s1] = pair(rem % 60);
    [
        y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1, b'T', h0, h1, b':', i0, i1, b':', s0, s1, b'.',
    ]
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_and_addresses_match_display() {
        let mut n = 1u64;
        let mut numbers = vec![0, 9, 10, 99, 100, 999, 1000, u64::MAX, u64::MAX / 10];
        while let Some(next) = n.checked_mul(7) {
            numbers.extend([n, n - 1, n + 1]);
            n = next;
        }
        for n in numbers {
            assert_eq!(written(|o| uint(o, n)), n.to_string());
        }
        for ip in ["0.0.0.0", "1.20.255.9", "255.255.255.255", "10.100.99.101"] {
            for port in [0u16, 7, 10, 99, 80, 443, 1000, 5432, 9999, 10_000, 65_535] {
                let a = SocketAddr::new(ip.parse().unwrap(), port);
                assert_eq!(written(|o| addr(o, Some(a))), format!("\"{a}\""));
            }
        }
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(written(|o| addr(o, Some(v6))), format!("\"{v6}\""));
        assert_eq!(written(|o| addr(o, None)), "null");
        for micros in [
            0u64,
            1,
            999,
            1000,
            1_001,
            12_345_678,
            99_999_999,
            100_000_000,
            100_000_999,
            999_999_999,
            u64::MAX,
        ] {
            let expected = format!("{}.{:03}", micros / 1000, micros % 1000);
            assert_eq!(written(|o| millis(o, micros)), expected);
        }
    }

    #[test]
    fn strings_escape_like_serde_json_except_control_names() {
        let samples = [
            "",
            "a",
            "echo.cost.test",
            "exactly8",
            "sixteen-bytes-xx",
            "quote\"inside-a-long-enough-string",
            "back\\slash",
            "tab\there",
            "line\nbreak\r",
            "nul\u{0}and\u{1f}",
            "del\u{7f}",
            "é",
            "long ascii text with é at the end of a long string",
            "{name}.example.com",
        ];
        for s in samples {
            // serde_json writes \b and \f by name; there are none here.
            assert_eq!(
                written(|o| string(o, s)),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
        for plain in [
            "",
            "h2",
            "echo.cost.test",
            "exactly8",
            "{name}.example.com",
            "del\u{7f}",
        ] {
            assert!(is_plain(plain.as_bytes()), "{plain:?}");
        }
        for special in [
            "back\\slash",
            "0123456789\"",
            "é",
            "0123456789é",
            "\n234567",
            "a\"cd",
            "abcdef\n",
            "ab\u{1}",
        ] {
            assert!(!is_plain(special.as_bytes()), "{special:?}");
        }
        // Every length around the word copies' edges keeps its bytes.
        let long: String = ('a'..='z').cycle().take(70).collect();
        for len in 0..=long.len() {
            let s = long.get(..len).unwrap_or_default();
            assert_eq!(written(|o| body(o, s.as_bytes())), s, "{len}");
        }
        assert_eq!(written(|o| text(o, b"h2\xff")), "\"h2\u{fffd}\"");
        assert_eq!(written(|o| text(o, b"\x08\x0c")), "\"\\u0008\\u000c\"");
    }

    #[test]
    fn cached_dates_follow_the_clock() {
        let mut dates = Dates::default();
        let mut secs = 0u64;
        while secs < 253_402_300_799 {
            for (offset, nanos) in [(0, 0), (0, 999_999_999), (1, 5_000), (86_399, 123_456_789)] {
                let t = UNIX_EPOCH + Duration::new(secs + offset, nanos);
                let theirs = time::OffsetDateTime::from(t)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap();
                let theirs = match theirs.split_once('.') {
                    // The time crate drops trailing zeros; the access log always shows six digits.
                    Some((whole, frac)) => format!(
                        "{whole}.{:0<6}Z",
                        frac.trim_end_matches('Z')
                            .get(..6)
                            .unwrap_or(frac.trim_end_matches('Z'))
                    ),
                    None => theirs.replace('Z', ".000000Z"),
                };
                let micros = super::super::unix_micros(t);
                assert_eq!(written(|o| dates.rfc3339(o, micros)), theirs);
            }
            secs = secs * 3 + 86_400 * 17 + 3_601;
        }
    }
}
