//! Sockets, data patterns and checks shared by the splice engine tests.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::OwnedFd,
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use ingress_daemon::splice::{Engine, EngineConfig, FlowOptions, FlowOutcome, Offload};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// Shrinks the bulk tests: the size in MiB that the 1 GiB transfers move; every other bulk size
/// and the number of concurrent flows shrink in the same proportion. Unset means full size. The
/// kernel matrix sets it, because an emulated guest moves about 2 Gbit/s.
pub const SCALE_ENV: &str = "INGRESSD_TEST_SCALE_MIB";

fn scale_mib() -> u64 {
    static SCALE: OnceLock<u64> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var(SCALE_ENV) {
        Err(_) => 1024,
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|mib| (1..=1024).contains(mib))
            .unwrap_or_else(|| panic!("{SCALE_ENV} takes 1 to 1024 (MiB), not {v:?}")),
    })
}

/// `full` bytes, scaled by [`SCALE_ENV`]; never below 1 MiB (nor above `full`).
pub fn scaled_bytes(full: u64) -> u64 {
    (full * scale_mib() / 1024).max(1 << 20).min(full)
}

/// `full` items (flows), scaled by [`SCALE_ENV`]; never below 1.
pub fn scaled_count(full: u64) -> u64 {
    (full * scale_mib() / 1024).max(1)
}

/// Heavy tests take this lock so they do not compete for the two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The engine for `offload`, or `None` (test skipped, reason printed) when the kernel path
/// cannot run here. With `CI=true` a missing kernel path is a failure, never a skip.
pub fn engine(offload: Offload, tweak: impl FnOnce(&mut EngineConfig)) -> Option<Engine> {
    if offload == Offload::Required && !is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kernel-path tests must run as root in CI"
        );
        eprintln!("skipped: the kernel path needs root");
        return None;
    }
    // Why a flow was reset, for the failure's output (captured unless it fails).
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ingress_daemon::splice::flow=debug")
        .with_test_writer()
        .try_init();
    let mut config = EngineConfig {
        offload,
        ..EngineConfig::default()
    };
    tweak(&mut config);
    Some(Engine::start(config).expect("engine starts"))
}

/// A spliced connection: the test's client, the test's backend server, and the flow's end.
pub struct Spliced {
    pub client: TcpStream,
    pub server: TcpStream,
    pub id: u64,
    pub done: oneshot::Receiver<FlowOutcome>,
}

/// Two connected pairs; the proxy-side sockets are handed to the engine.
/// `before_splice` may write on the client or server before the hand-off.
pub fn spliced(
    engine: &Engine,
    before_splice: impl FnOnce(&mut TcpStream, &mut TcpStream),
) -> Spliced {
    spliced_with(engine, FlowOptions::default(), before_splice)
}

/// [`spliced`] with the flow's options.
pub fn spliced_with(
    engine: &Engine,
    options: FlowOptions,
    before_splice: impl FnOnce(&mut TcpStream, &mut TcpStream),
) -> Spliced {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_client, _) = front.accept().unwrap();
    let proxy_backend = TcpStream::connect(back.local_addr().unwrap()).unwrap();
    let (mut server, _) = back.accept().unwrap();
    before_splice(&mut client, &mut server);
    let (tx, done) = oneshot::channel();
    let id = engine
        .splice(
            OwnedFd::from(proxy_client),
            OwnedFd::from(proxy_backend),
            options,
            Some(Box::new(
                move |outcome: ingress_daemon::splice::FlowOutcome| {
                    let _ = tx.send(outcome);
                },
            )),
        )
        .unwrap()
        .id;
    Spliced {
        client,
        server,
        id,
        done,
    }
}

/// Deterministic data: 1 MiB blocks of a seeded pseudo-random pattern, each stamped with its
/// index, so a lost, duplicated or reordered block changes the digest.
pub struct Pattern {
    block: Vec<u8>,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        let mut x = seed | 1;
        let block = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Self { block }
    }

    /// Writes `total` bytes; returns their SHA-256.
    pub fn send(&self, out: &mut impl Write, total: u64) -> io::Result<[u8; 32]> {
        self.send_paced(out, total, |_| {})
    }

    /// Like `send`, calling `after_write(bytes_so_far)` after every write.
    pub fn send_paced(
        &self,
        out: &mut impl Write,
        total: u64,
        mut after_write: impl FnMut(u64),
    ) -> io::Result<[u8; 32]> {
        let mut hash = Sha256::new();
        let mut block = self.block.clone();
        let mut sent = 0u64;
        let mut index = 0u64;
        while sent < total {
            block[..8].copy_from_slice(&index.to_le_bytes());
            let n = (total - sent).min(block.len() as u64) as usize;
            let mut chunk = &block[..n];
            while !chunk.is_empty() {
                let w = out.write(&chunk[..chunk.len().min(256 << 10)])?;
                if w == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                hash.update(&chunk[..w]);
                chunk = &chunk[w..];
                sent += w as u64;
                after_write(sent);
            }
            index += 1;
        }
        Ok(hash.finalize().into())
    }
}

impl Pattern {
    /// Writes whole stamped blocks until `stop` is set; publishes the bytes written in `sent`.
    /// Returns the byte count and SHA-256.
    pub fn send_until(
        &self,
        out: &mut impl Write,
        stop: &std::sync::atomic::AtomicBool,
        sent: &std::sync::atomic::AtomicU64,
    ) -> io::Result<(u64, [u8; 32])> {
        use std::sync::atomic::Ordering;
        let mut hash = Sha256::new();
        let mut block = self.block.clone();
        let mut total = 0u64;
        let mut index = 0u64;
        while !stop.load(Ordering::Relaxed) {
            block[..8].copy_from_slice(&index.to_le_bytes());
            out.write_all(&block)?;
            hash.update(&block);
            total += block.len() as u64;
            sent.store(total, Ordering::Relaxed);
            index += 1;
        }
        Ok((total, hash.finalize().into()))
    }
}

/// Follows a received stream against the pattern it should carry and explains the first byte
/// that differs: where it is, and which stream and offset the bytes found there came from (a
/// duplicate, a skip, or bytes of another direction).
pub struct StreamCheck {
    seed: u64,
    blocks: Vec<(u64, Vec<u8>)>,
    pos: u64,
    first_difference: Option<String>,
}

impl StreamCheck {
    /// Checks a stream of pattern `seed`; `others` are the seeds of streams its bytes could be
    /// confused with (the other direction).
    pub fn new(seed: u64, others: &[u64]) -> Self {
        let blocks = std::iter::once(seed)
            .chain(others.iter().copied())
            .map(|s| (s, Pattern::new(s).block))
            .collect();
        Self {
            seed,
            blocks,
            pos: 0,
            first_difference: None,
        }
    }

    fn expected(&self, pos: u64) -> u8 {
        let (index, offset) = (pos >> 20, (pos & ((1 << 20) - 1)) as usize);
        match index.to_le_bytes().get(offset) {
            Some(b) => *b,
            None => self.blocks[0].1[offset],
        }
    }

    /// Feeds the next received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if self.first_difference.is_none()
            && let Some(i) =
                (0..data.len()).find(|&i| data[i] != self.expected(self.pos + i as u64))
        {
            let at = self.pos + i as u64;
            self.first_difference = Some(self.explain(at, &data[i..]));
        }
        self.pos += data.len() as u64;
    }

    fn explain(&self, at: u64, found: &[u8]) -> String {
        let mut text = format!(
            "first difference at byte {at} (block {}, offset {})",
            at >> 20,
            at & ((1 << 20) - 1)
        );
        // Block bodies are identical past their 8-byte stamp: locate the found bytes in each
        // pattern's block by their content.
        let probe = &found[..found.len().min(32)];
        if probe.len() < 16 {
            text.push_str(&format!(
                "; only {} bytes left in the read to identify",
                probe.len()
            ));
            return text;
        }
        for (seed, block) in &self.blocks {
            if let Some(off) = block.windows(probe.len()).position(|w| w == probe) {
                let same = (at & ((1 << 20) - 1)) as i64;
                text.push_str(&format!(
                    "; the bytes there are pattern {seed} offset {off} within a block ({}{} bytes from where stream {} was)",
                    if seed == &self.seed { "" } else { "other stream, " },
                    off as i64 - same,
                    self.seed
                ));
                return text;
            }
        }
        text.push_str("; the bytes there match no pattern");
        text
    }

    /// `None` when every byte so far was right.
    pub fn first_difference(&self) -> Option<&str> {
        self.first_difference.as_deref()
    }
}

/// Reads to end of stream, checking it against pattern `seed`; returns the byte count, the
/// SHA-256 and the first difference explained.
pub fn drain_checked(
    input: &mut impl Read,
    seed: u64,
    others: &[u64],
) -> io::Result<(u64, [u8; 32], Option<String>)> {
    let mut check = StreamCheck::new(seed, others);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            let found = check.first_difference().map(str::to_owned);
            return Ok((total, hash.finalize().into(), found));
        }
        hash.update(&buf[..n]);
        check.feed(&buf[..n]);
        total += n as u64;
    }
}

/// Reads to end of stream; returns the byte count and SHA-256.
pub fn drain(input: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    drain_paced(input, None, |_| {})
}

/// Reads to end of stream, at most `rate` bytes per second when given.
pub fn drain_paced(
    input: &mut impl Read,
    rate: Option<u64>,
    mut after_read: impl FnMut(u64),
) -> io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        let want = match rate {
            Some(rate) => {
                // Stay at or under `rate`: wait until the budget allows the next 16 KiB.
                let allowed = rate * start.elapsed().as_millis() as u64 / 1000 + (16 << 10);
                if allowed <= total {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                ((allowed - total) as usize).min(16 << 10)
            }
            None => buf.len(),
        };
        let n = input.read(&mut buf[..want])?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
        after_read(total);
    }
}

/// Sends `total` bytes one way, then `total` bytes the other way; asserts both arrive exactly.
pub fn bulk_one_way_then_other(s: &mut Spliced, total: u64) {
    let mut client_w = s.client.try_clone().unwrap();
    let mut server_r = s.server.try_clone().unwrap();
    let up = std::thread::spawn(move || {
        let h = Pattern::new(1).send(&mut client_w, total).unwrap();
        client_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let got_up = drain(&mut server_r).unwrap();
    assert_eq!(
        got_up,
        (total, up.join().unwrap()),
        "client → backend bytes differ"
    );
    let mut server_w = s.server.try_clone().unwrap();
    let mut client_r = s.client.try_clone().unwrap();
    let down = std::thread::spawn(move || {
        let h = Pattern::new(2).send(&mut server_w, total).unwrap();
        server_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let got_down = drain(&mut client_r).unwrap();
    assert_eq!(
        got_down,
        (total, down.join().unwrap()),
        "backend → client bytes differ"
    );
}

/// Sends `total` bytes each way at once through a spliced pair, then closes both write halves;
/// asserts both directions arrive exactly.
pub fn bulk_both_ways(s: &mut Spliced, total: u64) {
    let mut client_w = s.client.try_clone().unwrap();
    let mut server_w = s.server.try_clone().unwrap();
    let mut client_r = s.client.try_clone().unwrap();
    let mut server_r = s.server.try_clone().unwrap();
    let up = std::thread::spawn(move || {
        let h = Pattern::new(1).send(&mut client_w, total).unwrap();
        client_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let down = std::thread::spawn(move || {
        let h = Pattern::new(2).send(&mut server_w, total).unwrap();
        server_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let got_up = std::thread::spawn(move || drain(&mut server_r).unwrap());
    let got_down = drain(&mut client_r).unwrap();
    let sent_up = up.join().unwrap();
    let sent_down = down.join().unwrap();
    let got_up = got_up.join().unwrap();
    assert_eq!(got_up, (total, sent_up), "client → backend bytes differ");
    assert_eq!(
        got_down,
        (total, sent_down),
        "backend → client bytes differ"
    );
}

/// Waits for the flow's outcome.
pub async fn outcome(done: oneshot::Receiver<FlowOutcome>) -> FlowOutcome {
    tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .expect("flow ends within 60 s")
        .expect("outcome reported")
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Sends, from a raw socket, a TCP segment that looks like `client`'s retransmission of its
/// last `old.len()` bytes (`old` must be exactly those bytes) carrying `new` after them: what a
/// sender does when it resends a segment the receiver had partly received. The receiver queues
/// such a segment whole and must skip its repeated head. `client`'s own sequence numbers are read
/// in repair mode (`TCP_REPAIR`, root only); `client` itself must later send `new` normally,
/// which the receiver then drops as an old duplicate, so both ends stay in step.
pub fn inject_overlapping_retransmission(client: &TcpStream, old: &[u8], new: &[u8]) {
    use std::os::fd::AsRawFd;
    let fd = client.as_raw_fd();
    let set = |opt: libc::c_int, value: libc::c_int| {
        // SAFETY: a plain integer option on a socket this function borrows.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt {opt}: {}", io::Error::last_os_error());
    };
    let queue_seq = |queue: libc::c_int| -> u32 {
        set(libc::TCP_REPAIR_QUEUE, queue);
        let mut value: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: `value` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUEUE_SEQ,
                (&raw mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", io::Error::last_os_error());
        value
    };
    set(libc::TCP_REPAIR, 1);
    let snd_nxt = queue_seq(2); // TCP_SEND_QUEUE: the next sequence number to send
    let rcv_nxt = queue_seq(1); // TCP_RECV_QUEUE: the next sequence number expected
    set(libc::TCP_REPAIR, 0);

    let (src, dst) = match (client.local_addr().unwrap(), client.peer_addr().unwrap()) {
        (std::net::SocketAddr::V4(s), std::net::SocketAddr::V4(d)) => (s, d),
        other => panic!("IPv4 sockets only, not {other:?}"),
    };
    let mut segment = Vec::with_capacity(20 + old.len() + new.len());
    segment.extend_from_slice(&src.port().to_be_bytes());
    segment.extend_from_slice(&dst.port().to_be_bytes());
    let seq = snd_nxt.wrapping_sub(u32::try_from(old.len()).unwrap());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&rcv_nxt.to_be_bytes());
    segment.push(5 << 4); // data offset: 20 bytes, no options
    segment.push(0x18); // PSH | ACK
    segment.extend_from_slice(&u16::MAX.to_be_bytes()); // window
    segment.extend_from_slice(&[0, 0, 0, 0]); // checksum (below), urgent pointer
    segment.extend_from_slice(old);
    segment.extend_from_slice(new);
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&u16::try_from(segment.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&segment);
    let checksum = internet_checksum(&pseudo);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());

    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::TCP),
    )
    .expect("raw socket (root only)");
    let to = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(*dst.ip(), 0));
    raw.send_to(&segment, &to.into()).unwrap();
}

/// The ones' complement sum of RFC 1071.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
