//! dnsmasq as the DNS server of the `dns` instance resolver: answers A queries for the names a
//! test gives it, on one loopback address and a leased port (UDP and TCP), and nothing else (no
//! upstream servers, no /etc/hosts).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use super::START_TIMEOUT;
use crate::{
    error::{Error, IoContext as _, Result},
    ports::PortLease,
    process::{ChildGuard, wait_until},
    tools::{self, is_root},
    workdir::WorkDir,
};

/// A running dnsmasq; stopped when dropped.
pub struct Dnsmasq {
    guard: ChildGuard,
    addr: SocketAddr,
    hosts: std::path::PathBuf,
    _lease: PortLease,
    _work: WorkDir,
}

impl Dnsmasq {
    /// Starts dnsmasq on `ip` answering each `(name, address)` in `records` (exact names) and
    /// waits until it answers queries.
    pub fn start(ip: Ipv4Addr, records: &[(&str, Ipv4Addr)]) -> Result<Self> {
        Self::start_with_ttl(ip, records, 0)
    }

    /// Like [`Dnsmasq::start`], answering with a TTL of `ttl_secs`; the records live in a hosts
    /// directory dnsmasq watches, so [`Dnsmasq::set_records`] changes them while it runs.
    pub fn start_with_ttl(
        ip: Ipv4Addr,
        records: &[(&str, Ipv4Addr)],
        ttl_secs: u32,
    ) -> Result<Self> {
        let dnsmasq = tools::find("dnsmasq")?;
        let work = WorkDir::new("ingt-dnsmasq-")?;
        let hosts = work.join("hosts.d");
        std::fs::create_dir_all(&hosts).ctx(|| format!("creating {}", hosts.display()))?;
        write_hosts(&hosts, records)?;
        let lease = PortLease::new()?;
        let addr = SocketAddr::new(IpAddr::V4(ip), lease.port());
        let mut cmd = Command::new(dnsmasq);
        cmd.args([
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
        ])
        .args([
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--pid-file=",
        ])
        .arg(format!("--listen-address={ip}"))
        .arg(format!("--port={}", addr.port()))
        .arg("--log-queries");
        if is_root() {
            // Otherwise it switches to a `dnsmasq` user that may not exist.
            cmd.arg("--user=root");
        }
        cmd.arg(format!("--hostsdir={}", hosts.display()))
            .arg(format!("--local-ttl={ttl_secs}"));
        let mut guard = ChildGuard::spawn("dnsmasq", &mut cmd, Some(&work.join("dnsmasq.log")))?;
        wait_until("dnsmasq to answer a query", START_TIMEOUT, || {
            guard.ensure_running()?;
            Ok(query_a(addr, "ready.invalid", Duration::from_millis(200))
                .ok()
                .map(drop))
        })?;
        Ok(Self {
            guard,
            addr,
            hosts,
            _lease: lease,
            _work: work,
        })
    }

    /// Replaces every record; dnsmasq picks the change up by itself (inotify), and this waits
    /// until it answers with the new records.
    pub fn set_records(&self, records: &[(&str, Ipv4Addr)]) -> Result<()> {
        write_hosts(&self.hosts, records)?;
        for (name, address) in records {
            wait_until("dnsmasq to serve the new records", START_TIMEOUT, || {
                Ok(self
                    .resolve(name)
                    .ok()
                    .filter(|a| a.contains(address))
                    .map(drop))
            })?;
        }
        Ok(())
    }

    /// Where dnsmasq answers (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process guard (PID, log).
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// The A records dnsmasq returns for `name`.
    pub fn resolve(&self, name: &str) -> Result<Vec<Ipv4Addr>> {
        query_a(self.addr, name, Duration::from_secs(5))
    }
}

/// Writes the records as an /etc/hosts-style file in `dir` (renamed into place, so dnsmasq
/// never reads half a file).
fn write_hosts(dir: &std::path::Path, records: &[(&str, Ipv4Addr)]) -> Result<()> {
    let text: String = records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect();
    let tmp = dir.with_extension("tmp");
    std::fs::write(&tmp, text).ctx(|| format!("writing {}", tmp.display()))?;
    let target = dir.join("records");
    std::fs::rename(&tmp, &target).ctx(|| format!("renaming to {}", target.display()))
}

/// Sends one A query for `name` to `server` over UDP and returns the addresses in the answer
/// (empty for NXDOMAIN or no records). Fails when no reply arrives within `timeout`.
pub fn query_a(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>> {
    let socket =
        UdpSocket::bind((server.ip(), 0)).ctx(|| "binding a DNS client socket".to_owned())?;
    socket
        .set_read_timeout(Some(timeout))
        .ctx(|| "setting a read timeout".to_owned())?;
    let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(1);
    socket
        .send_to(&encode_query(id, name), server)
        .ctx(|| format!("querying {server}"))?;
    let mut buf = [0_u8; 1500];
    let (n, _) = socket
        .recv_from(&mut buf)
        .ctx(|| format!("waiting for {server} to answer"))?;
    decode_a_answers(&buf[..n], id).ok_or_else(|| Error::Process {
        what: format!("DNS answer from {server}"),
        detail: "malformed".to_owned(),
    })
}

fn encode_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

fn decode_a_answers(msg: &[u8], id: u16) -> Option<Vec<Ipv4Addr>> {
    let u16_at = |i: usize| Some(u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]));
    if u16_at(0)? != id {
        return None;
    }
    let questions = u16_at(4)?;
    let answers = u16_at(6)?;
    let mut pos = 12;
    for _ in 0..questions {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        pos = skip_name(msg, pos)?;
        let (rtype, rdlen) = (u16_at(pos)?, usize::from(u16_at(pos + 8)?));
        let data = msg.get(pos + 10..pos + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        pos += 10 + rdlen;
    }
    Some(out)
}

/// The offset just past the (possibly compressed) name at `pos`.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            l if l & 0xc0 == 0xc0 => return Some(pos + 2),
            l => pos += 1 + usize::from(l),
        }
    }
}
