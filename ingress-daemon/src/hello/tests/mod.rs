//! Tests of the ClientHello parser and reader on hellos captured from real clients.

mod capture;
mod parse;
mod reader;

/// A ClientHello captured from a real client (see `capture.rs`), with what it must yield.
pub(super) struct Captured {
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub sni: Option<&'static str>,
    pub alpn: &'static [&'static [u8]],
}

macro_rules! hello {
    ($file:literal, $sni:expr, $alpn:expr) => {
        Captured {
            name: $file,
            bytes: include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/hellos/",
                $file
            )),
            sni: $sni,
            alpn: $alpn,
        }
    };
}

/// Every captured hello.
pub(super) const CAPTURED: &[Captured] = &[
    hello!("openssl-tls12-sni.bin", Some("a.example.test"), &[]),
    hello!(
        "openssl-tls13-sni-alpn.bin",
        Some("b.example.test"),
        &[b"h2", b"http/1.1"]
    ),
    hello!("openssl-no-sni.bin", None, &[]),
    hello!(
        "openssl-pg17-direct.bin",
        Some("db1.example.test"),
        &[b"postgresql"]
    ),
    hello!("curl.bin", Some("web.example.test"), &[b"h2", b"http/1.1"]),
    hello!(
        "rustls.bin",
        Some("rustls.example.test"),
        &[b"h2", b"http/1.1"]
    ),
    hello!(
        "openssl4-x25519mlkem768.bin",
        Some("pq.example.test"),
        &[b"h2", b"http/1.1"]
    ),
];
