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

fn is_root() -> bool {
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
            Some(Box::new(move |outcome| {
                let _ = tx.send(outcome);
            })),
        )
        .unwrap();
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
