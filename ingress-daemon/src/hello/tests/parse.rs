//! The pure parser: captured hellos at every prefix, re-framed records, refusals.

use super::CAPTURED;
use crate::hello::{ClientHelloInfo, DEFAULT_MAX_HELLO_BYTES, ParseError, parse_client_hello};

/// The handshake message inside a single-record capture.
pub(crate) fn message_of(hello: &[u8]) -> &[u8] {
    assert_eq!(
        hello.len(),
        5 + usize::from(u16::from_be_bytes([hello[3], hello[4]]))
    );
    &hello[5..]
}

/// Frames `message` into handshake records cut at the message offsets `cuts`.
pub(crate) fn records(message: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&message.len())) {
        let fragment = &message[start..end];
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(
            &u16::try_from(fragment.len())
                .expect("fragment")
                .to_be_bytes(),
        );
        out.extend_from_slice(fragment);
        start = end;
    }
    out
}

/// A minimal ClientHello handshake message carrying `extensions` (type, data).
pub(crate) fn build_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (t, data) in extensions {
        ext.extend_from_slice(&t.to_be_bytes());
        ext.extend_from_slice(&u16::try_from(data.len()).expect("ext").to_be_bytes());
        ext.extend_from_slice(data);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&u16::try_from(ext.len()).expect("exts").to_be_bytes());
    body.extend_from_slice(&ext);
    let mut msg = vec![1];
    msg.extend_from_slice(&u32::try_from(body.len()).expect("body").to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    msg
}

pub(crate) fn sni_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for name in names {
        list.push(0);
        list.extend_from_slice(&u16::try_from(name.len()).expect("name").to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = u16::try_from(list.len())
        .expect("list")
        .to_be_bytes()
        .to_vec();
    data.extend_from_slice(&list);
    (0, data)
}

pub(crate) fn alpn_ext(protocols: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for p in protocols {
        list.push(u8::try_from(p.len()).expect("proto"));
        list.extend_from_slice(p);
    }
    let mut data = u16::try_from(list.len())
        .expect("list")
        .to_be_bytes()
        .to_vec();
    data.extend_from_slice(&list);
    (16, data)
}

fn parse(buf: &[u8]) -> Result<ClientHelloInfo, ParseError> {
    parse_client_hello(buf, DEFAULT_MAX_HELLO_BYTES)
}

fn parse_sni(names: &[&[u8]]) -> Result<Option<String>, ParseError> {
    parse(&records(&build_hello(&[sni_ext(names)]), &[])).map(|i| i.sni)
}

fn assert_every_prefix_incomplete(bytes: &[u8], what: &str) {
    for n in 0..bytes.len() {
        match parse(&bytes[..n]) {
            Err(ParseError::Incomplete { needed }) => {
                assert!(
                    needed > n && needed <= bytes.len(),
                    "{what}: prefix {n} needs {needed}"
                )
            }
            other => panic!("{what}: prefix {n} of {}: {other:?}", bytes.len()),
        }
    }
}

#[test]
fn captured_hellos_yield_their_sni_and_alpn() {
    for c in CAPTURED {
        let info = parse(c.bytes).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(info.sni.as_deref(), c.sni, "{}", c.name);
        let alpn: Vec<&[u8]> = info.alpn.iter().map(Vec::as_slice).collect();
        assert_eq!(alpn, c.alpn, "{}", c.name);
        assert_eq!(info.len, c.bytes.len(), "{}", c.name);
    }
}

#[test]
fn every_proper_prefix_of_a_captured_hello_is_incomplete() {
    for c in CAPTURED {
        assert_every_prefix_incomplete(c.bytes, c.name);
    }
}

#[test]
fn bytes_after_the_hello_are_ignored() {
    for c in CAPTURED {
        let mut bytes = c.bytes.to_vec();
        // A TLS 1.3 client may follow with change_cipher_spec and early data.
        bytes.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0x17, 0x03, 0x03]);
        let info = parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(info.len, c.bytes.len());
    }
}

#[test]
fn hello_split_across_two_records_parses_at_every_cut() {
    for c in CAPTURED {
        let message = message_of(c.bytes);
        let whole = parse(c.bytes).expect("whole");
        for cut in 1..message.len() {
            let bytes = records(message, &[cut]);
            let info = parse(&bytes).unwrap_or_else(|e| panic!("{} cut {cut}: {e}", c.name));
            assert_eq!(info.sni, whole.sni);
            assert_eq!(info.alpn, whole.alpn);
            assert_eq!(info.len, bytes.len());
        }
        for cut in [1, 2, 3, 4, 5, message.len() / 2, message.len() - 1] {
            assert_every_prefix_incomplete(&records(message, &[cut]), c.name);
        }
    }
}

#[test]
fn hello_in_one_byte_records_parses() {
    for c in CAPTURED {
        let message = message_of(c.bytes);
        let cuts: Vec<usize> = (1..message.len()).collect();
        let bytes = records(message, &cuts);
        let info = parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(info.sni.as_deref(), c.sni);
        assert_eq!(info.len, bytes.len());
    }
}

#[test]
fn pq_sized_hello_of_two_kilobytes_in_two_records_parses() {
    // A post-quantum key share (1216 bytes) plus padding to ~2 KB, as browsers send.
    let msg = build_hello(&[
        sni_ext(&[b"pg-7.example.com"]),
        alpn_ext(&[b"postgresql"]),
        (51, vec![0x11; 1216 + 4 + 2]),
        (21, vec![0; 700]),
    ]);
    assert!(msg.len() > 2000, "{}", msg.len());
    let bytes = records(&msg, &[1400]);
    assert_every_prefix_incomplete(&bytes, "pq");
    let info = parse(&bytes).expect("pq hello");
    assert_eq!(info.sni.as_deref(), Some("pg-7.example.com"));
    assert!(info.offers_alpn(b"postgresql"));
}

#[test]
fn sixteen_kib_hello_spans_two_full_records() {
    let msg = build_hello(&[sni_ext(&[b"big.example.test"]), (21, vec![0; 16 * 1024])]);
    let bytes = records(&msg, &[16 * 1024]);
    let info = parse(&bytes).expect("16 KiB hello under the default cap");
    assert_eq!(info.sni.as_deref(), Some("big.example.test"));
    assert_eq!(info.len, bytes.len());
}

#[test]
fn oversize_hello_is_refused_as_soon_as_its_length_is_known() {
    let msg = build_hello(&[sni_ext(&[b"big.example.test"]), (21, vec![0; 4000])]);
    let bytes = records(&msg, &[]);
    // Record header plus handshake header: 9 bytes suffice.
    let err = parse_client_hello(&bytes[..9], 2048).expect_err("too large");
    assert!(
        matches!(
            err,
            ParseError::TooLarge {
                max_hello_bytes: 2048,
                ..
            }
        ),
        "{err:?}"
    );
    // Many small records: refused once the record bytes pass the cap.
    let cuts: Vec<usize> = (1..msg.len()).step_by(10).collect();
    let bytes = records(&msg, &cuts);
    let err = parse_client_hello(&bytes, 2048).expect_err("too large");
    assert!(matches!(err, ParseError::TooLarge { .. }), "{err:?}");
    // Exactly at the cap is fine.
    let whole = records(&msg, &[]);
    assert!(parse_client_hello(&whole, whole.len()).is_ok());
    assert!(matches!(
        parse_client_hello(&whole, whole.len() - 1),
        Err(ParseError::TooLarge { .. })
    ));
}

#[test]
fn garbage_record_of_64_kib_is_refused_from_its_header() {
    let mut bytes = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    bytes.extend((0..65535u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    for n in [5, 6, bytes.len()] {
        assert_eq!(
            parse(&bytes[..n]),
            Err(ParseError::Invalid {
                reason: "record longer than 2^14 bytes"
            })
        );
    }
    // The same garbage without a handshake header is not TLS at all.
    assert_eq!(parse(&bytes[5..]), Err(ParseError::NotTls));
}

#[test]
fn plain_http_and_other_protocols_are_not_tls() {
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"G",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        &[0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f], // Postgres SSLRequest
        &[0x17, 0x03, 0x03, 0x00, 0x10],                   // application data
        &[0x80, 0x2e, 0x01, 0x03, 0x01],                   // SSLv2-compatible hello
        &[0x16, 0x02],
    ] {
        assert_eq!(parse(bytes), Err(ParseError::NotTls), "{bytes:?}");
    }
}

#[test]
fn malformed_framing_is_invalid() {
    let msg = message_of(CAPTURED[0].bytes);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty record", vec![0x16, 0x03, 0x01, 0x00, 0x00]),
        ("server hello", {
            let mut m = msg.to_vec();
            m[0] = 2;
            records(&m, &[])
        }),
        ("interleaved alert", {
            let mut b = records(&msg[..10], &[]);
            b.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
            b
        }),
        ("short hello", records(&[1, 0, 0, 3, 3, 3, 0], &[])),
        ("extensions length", {
            let mut m = msg.to_vec();
            m.push(0);
            let len = u32::try_from(m.len() - 4).expect("len").to_be_bytes();
            m[1..4].copy_from_slice(&len[1..]);
            records(&m, &[])
        }),
    ];
    for (what, bytes) in cases {
        assert!(
            matches!(parse(&bytes), Err(ParseError::Invalid { .. })),
            "{what}: {:?}",
            parse(&bytes)
        );
    }
}

#[test]
fn server_names_are_lower_cased_and_validated() {
    assert_eq!(
        parse_sni(&[b"Pg-7.Example.COM"]),
        Ok(Some("pg-7.example.com".into()))
    );
    assert_eq!(
        parse_sni(&[b"a.example.test."]),
        Ok(Some("a.example.test".into()))
    );
    // RFC 6066 forbids IP literals; they are ignored, not refused.
    assert_eq!(parse_sni(&[b"127.0.0.1"]), Ok(None));
    assert_eq!(parse_sni(&[]), Ok(None));
    for bad in [
        &b"a..b"[..],
        b"-a.example",
        b"a b.example",
        b"\xc3\xa9.example",
        b"",
        b"*.x.y",
    ] {
        assert!(
            matches!(parse_sni(&[bad]), Err(ParseError::Invalid { .. })),
            "{bad:?}"
        );
    }
    let long = [b'a'; 64];
    assert!(parse_sni(&[&long]).is_err());
    assert!(
        parse_sni(&[b"a.example", b"b.example"]).is_err(),
        "two host names"
    );
}

#[test]
fn duplicate_extensions_and_bad_alpn_are_invalid() {
    let dup = build_hello(&[sni_ext(&[b"a.example"]), sni_ext(&[b"b.example"])]);
    assert!(matches!(
        parse(&records(&dup, &[])),
        Err(ParseError::Invalid { .. })
    ));
    for alpn in [alpn_ext(&[]), alpn_ext(&[b""]), (16, vec![0, 5, 2, b'h'])] {
        let msg = build_hello(&[alpn]);
        assert!(matches!(
            parse(&records(&msg, &[])),
            Err(ParseError::Invalid { .. })
        ));
    }
}

#[test]
fn mutated_hellos_never_panic() {
    // A deterministic mutation loop; the fuzz target covers the rest.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for c in CAPTURED {
        for _ in 0..2000 {
            let mut bytes = c.bytes.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            let _ = parse_client_hello(&bytes[..cut], 1024);
            let _ = parse(&bytes);
        }
    }
}
