//! PROXY headers against the spec's byte layouts, and against haproxy when it is installed.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::testing::{require_tool, wait_for_tcp};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn v1_tcp4_line_matches_the_spec() {
    let h = encode_v1(addr("192.0.2.10:51000"), addr("198.51.100.1:443"));
    assert_eq!(
        h.as_bytes(),
        b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n"
    );
}

#[test]
fn v1_tcp6_line_matches_the_spec_and_fits_the_longest_addresses() {
    let h = encode_v1(addr("[2001:db8::1]:1"), addr("[::1]:5432"));
    assert_eq!(h.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 1 5432\r\n");
    let longest = addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535");
    let h = encode_v1(longest, longest);
    assert_eq!(h.as_bytes().len(), 104);
    assert!(h.as_bytes().starts_with(b"PROXY TCP6 ffff:") && h.as_bytes().ends_with(b" 65535\r\n"));
}

#[test]
fn mapped_addresses_are_sent_as_ipv4_and_mixed_families_as_ipv6() {
    let h = encode_v1(
        addr("[::ffff:192.0.2.10]:1000"),
        addr("[::ffff:127.0.0.1]:443"),
    );
    assert_eq!(
        h.as_bytes(),
        b"PROXY TCP4 192.0.2.10 127.0.0.1 1000 443\r\n"
    );
    let h = encode_v1(addr("192.0.2.10:1000"), addr("[::1]:443"));
    assert_eq!(
        h.as_bytes(),
        b"PROXY TCP6 ::ffff:192.0.2.10 ::1 1000 443\r\n"
    );
}

#[test]
fn v2_tcp4_bytes_match_the_spec() {
    let h = encode_v2(addr("192.0.2.10:51000"), addr("198.51.100.1:443"));
    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    expected.extend_from_slice(&[192, 0, 2, 10, 198, 51, 100, 1]);
    expected.extend_from_slice(&[0xc7, 0x38, 0x01, 0xbb]);
    assert_eq!(h.as_bytes(), expected.as_slice());
    assert_eq!(h.as_bytes().len(), 16 + 12);
}

#[test]
fn v2_tcp6_bytes_match_the_spec() {
    let h = encode(
        Version::V2,
        addr("[2001:db8::1]:1"),
        addr("[::ffff:127.0.0.1]:5432"),
    );
    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
    expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
    expected.extend_from_slice(&[0x00, 0x01, 0x15, 0x38]);
    assert_eq!(h.as_bytes(), expected.as_slice());
}

/// haproxy with an `accept-proxy` HTTP frontend that echoes the addresses it decoded.
struct Haproxy {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: crate::testing::TempDir,
}

async fn start_haproxy() -> Option<Haproxy> {
    require_tool("haproxy", "checking PROXY headers with haproxy's parser")?;
    for _attempt in 0..5 {
        let dir = crate::testing::TempDir::new("haproxy");
        let port = crate::testing::free_tcp_port("127.0.0.1");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
                 frontend echo\n  bind 127.0.0.1:{port} accept-proxy\n  \
                 http-request return status 200 content-type text/plain lf-string \"%[src] %[src_port] %[dst] %[dst_port]\"\n"
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if wait_for_tcp(addr, Duration::from_secs(10)).await {
            return Some(Haproxy {
                child,
                addr,
                _dir: dir,
            });
        }
        // The port was taken meanwhile: try another.
        let _ = child.kill().await;
    }
    panic!("haproxy did not start");
}

async fn haproxy_decodes(h: &Haproxy, header: ProxyHeader) -> String {
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(header.as_bytes()).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    response
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn haproxy_decodes_our_v1_and_v2_headers() {
    let Some(mut h) = start_haproxy().await else {
        return;
    };
    let cases = [
        (
            "192.0.2.10:51000",
            "198.51.100.1:443",
            "192.0.2.10 51000 198.51.100.1 443",
        ),
        (
            "[2001:db8::7]:1234",
            "[2001:db8::1]:5432",
            "2001:db8::7 1234 2001:db8::1 5432",
        ),
        (
            "[::ffff:192.0.2.9]:7",
            "[::ffff:127.0.0.1]:8443",
            "192.0.2.9 7 127.0.0.1 8443",
        ),
    ];
    for (src, dst, expected) in cases {
        for version in [Version::V1, Version::V2] {
            let got = haproxy_decodes(&h, encode(version, addr(src), addr(dst))).await;
            assert_eq!(got, expected, "{version:?} {src} {dst}");
        }
    }
    h.child.kill().await.unwrap();
}
