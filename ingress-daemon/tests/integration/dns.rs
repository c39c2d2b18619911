//! Instances resolved through DNS (`{instance}.<dns_suffix>`) at create time.
use std::net::{Ipv4Addr, UdpSocket};

use serde_json::json;

use crate::common::{Server, TempDir, assert_error, free_port, test_config};

/// A minimal authoritative DNS server on 127.0.0.1 for `vms.test`: A records only.
fn dns_server(records: &'static [(&'static str, Ipv4Addr)]) -> std::net::SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            let q = &buf[..n];
            // Question name: labels from offset 12 to the zero byte.
            let mut i = 12;
            let mut labels = Vec::new();
            while i < n && q[i] != 0 {
                let len = q[i] as usize;
                labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + len]).to_ascii_lowercase());
                i += 1 + len;
            }
            let qend = i + 5; // zero byte, qtype, qclass
            let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
            let name = labels.join(".");
            let found = records.iter().find(|(n, _)| *n == name).map(|(_, ip)| *ip);
            let rcode: u8 = if found.is_some() { 0 } else { 3 };
            let answer = found.filter(|_| qtype == 1);
            let mut r = Vec::new();
            r.extend_from_slice(&q[..2]);
            r.extend_from_slice(&[0x85, 0x80 | rcode]);
            r.extend_from_slice(&[0, 1, 0, u8::from(answer.is_some()), 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..qend]);
            if let Some(ip) = answer {
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                r.extend_from_slice(&ip.octets());
            }
            let _ = sock.send_to(&r, peer);
        }
    });
    addr
}

#[test]
fn literal_targets_resolve_through_dns_and_pass_the_policy() {
    static RECORDS: [(&str, Ipv4Addr); 2] = [
        ("pg-7.vms.test", Ipv4Addr::new(127, 0, 0, 7)),
        ("meta.vms.test", Ipv4Addr::new(169, 254, 169, 254)),
    ];
    let dns = dns_server(&RECORDS);
    let dir = TempDir::new("dns");
    let mut config = test_config(dir.path());
    config.dns_server = Some(dns);
    config.dns_suffix = Some("vms.test".to_owned());
    let s = Server::start(config);
    let spec = |instance: &str| {
        json!({"name": "pg", "listen_port": free_port(),
            "default_target": {"instance": instance, "port": 5432}})
    };
    let r = s.req("POST", "/tcp-ingresses", Some(spec("meta")));
    assert_error(
        &r,
        400,
        "backend_not_allowed",
        "default_target: instance \"meta\" at 169.254.169.254 is link-local, which is never allowed",
    );
    let r = s.req("POST", "/tcp-ingresses", Some(spec("ghost")));
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("instance_not_found")),
        "{}",
        r.text()
    );
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with(
            "default_target.instance: instance \"ghost\" does not exist (DNS ghost.vms.test.: "
        ),
        "{message}"
    );
    let r = s.req("POST", "/tcp-ingresses", Some(spec("pg-7")));
    assert_eq!(r.status, 201, "{}", r.text());
}
