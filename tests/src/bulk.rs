//! Checksummed bulk transfers: a server that sinks and sources seeded streams, the client side
//! that drives it, and a 64-byte ping-pong latency sampler.
//!
//! The client opens with an optional preamble (e.g. a TLS ClientHello, so the daemon can route
//! the connection; the server skips it), then a 48-byte header saying what each side sends:
//! `b"INGBULK1"`, then big-endian u64s `up_seed`, `up_bytes`, `down_seed`, `down_bytes`,
//! `server_read_rate` (bytes/s, 0 = as fast as possible). Both directions then run at once; each
//! side half-closes (FIN) after its last byte and verifies what it receives until the peer's FIN.
use std::{
    io::{ErrorKind, Read, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use crate::{
    acceptor::{Acceptor, CONN_STACK_BYTES},
    error::{Error, IoContext as _, Result},
    pattern::{Digest, RateLimit, Source, Verified, Verifier},
};

const MAGIC: &[u8; 8] = b"INGBULK1";
const HEADER_BYTES: usize = 48;
const CHUNK_BYTES: usize = 256 * 1024;

/// What a bulk exchange sends each way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkSpec {
    /// Seed of the client → server stream.
    pub up_seed: u64,
    /// Bytes the client sends.
    pub up_bytes: u64,
    /// Seed of the server → client stream.
    pub down_seed: u64,
    /// Bytes the server sends.
    pub down_bytes: u64,
    /// The server reads at most this many bytes a second (a slow backend).
    pub server_read_rate: Option<u64>,
    /// The client reads at most this many bytes a second (a slow client).
    pub client_read_rate: Option<u64>,
    /// A side that neither reads nor writes a byte for this long fails the exchange.
    pub idle_timeout: Duration,
}

impl BulkSpec {
    /// `bytes` each way, both sides as fast as they can; seeds derived from `seed`.
    pub fn both_ways(bytes: u64, seed: u64) -> Self {
        Self {
            up_seed: seed,
            up_bytes: bytes,
            down_seed: seed ^ 0x5eed_d0e5_0000_0001,
            down_bytes: bytes,
            server_read_rate: None,
            client_read_rate: None,
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// `bytes` from client to server only.
    pub fn upload(bytes: u64, seed: u64) -> Self {
        Self {
            down_bytes: 0,
            ..Self::both_ways(bytes, seed)
        }
    }

    /// `bytes` from server to client only.
    pub fn download(bytes: u64, seed: u64) -> Self {
        Self {
            up_bytes: 0,
            ..Self::both_ways(bytes, seed)
        }
    }

    /// The 48-byte header that opens an exchange (sent by clients that drive the exchange
    /// themselves, e.g. through TLS).
    pub fn header(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0_u8; HEADER_BYTES];
        h[..8].copy_from_slice(MAGIC);
        let fields = [
            self.up_seed,
            self.up_bytes,
            self.down_seed,
            self.down_bytes,
            self.server_read_rate.unwrap_or(0),
        ];
        for (i, v) in fields.iter().enumerate() {
            h[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_be_bytes());
        }
        h
    }

    fn parse(h: &[u8; HEADER_BYTES]) -> Option<Self> {
        if &h[..8] != MAGIC {
            return None;
        }
        let field = |i: usize| {
            let mut b = [0_u8; 8];
            b.copy_from_slice(&h[8 + i * 8..16 + i * 8]);
            u64::from_be_bytes(b)
        };
        Some(Self {
            up_seed: field(0),
            up_bytes: field(1),
            down_seed: field(2),
            down_bytes: field(3),
            server_read_rate: Some(field(4)).filter(|r| *r > 0),
            client_read_rate: None,
            idle_timeout: Duration::from_secs(60),
        })
    }
}

/// The outcome of one side of an exchange.
#[derive(Clone, Debug)]
pub struct SideReport {
    /// Bytes this side wrote.
    pub sent: u64,
    /// SHA-256 of the bytes written.
    pub sent_sha256: Digest,
    /// What this side received, verified.
    pub received: Verified,
    /// From the start of the exchange to the peer's FIN and our last write, whichever is later.
    pub elapsed: Duration,
    /// An I/O error that ended the exchange early.
    pub error: Option<String>,
}

impl SideReport {
    /// Fails unless this side sent everything and received exactly what it expected.
    pub fn check(&self, sent_expected: u64) -> Result<()> {
        if let Some(e) = &self.error {
            return Err(Error::Mismatch(format!("exchange failed: {e}")));
        }
        if self.sent != sent_expected {
            return Err(Error::Mismatch(format!(
                "sent {} of {sent_expected} bytes",
                self.sent
            )));
        }
        match self.received.problem() {
            Some(p) => Err(Error::Mismatch(p)),
            None => Ok(()),
        }
    }
}

/// Runs the client side of an exchange on `stream`: writes `preamble`, the header and the up
/// stream (then FIN) while reading and verifying the down stream until the server's FIN.
pub fn exchange(stream: TcpStream, preamble: &[u8], spec: &BulkSpec) -> Result<SideReport> {
    let mut head = preamble.to_vec();
    head.extend_from_slice(&spec.header());
    run_side(
        stream,
        head,
        (spec.up_seed, spec.up_bytes),
        (spec.down_seed, spec.down_bytes),
        spec.client_read_rate,
        spec.idle_timeout,
    )
}

/// Connects to `addr` and runs [`exchange`] with no preamble.
pub fn exchange_with(addr: SocketAddr, spec: &BulkSpec) -> Result<SideReport> {
    let stream = TcpStream::connect(addr).ctx(|| format!("connecting to {addr}"))?;
    exchange(stream, &[], spec)
}

fn run_side(
    stream: TcpStream,
    head: Vec<u8>,
    (send_seed, send_bytes): (u64, u64),
    (recv_seed, recv_bytes): (u64, u64),
    read_rate: Option<u64>,
    idle: Duration,
) -> Result<SideReport> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(idle))
        .ctx(|| "setting a read timeout".to_owned())?;
    stream
        .set_write_timeout(Some(idle))
        .ctx(|| "setting a write timeout".to_owned())?;
    let mut writer = stream.try_clone().ctx(|| "cloning the stream".to_owned())?;
    let sender = thread::Builder::new()
        .name("bulk-send".to_owned())
        .stack_size(CONN_STACK_BYTES)
        .spawn(move || -> (u64, Digest, Option<String>) {
            let mut source = Source::new(send_seed, send_bytes);
            let mut buf = vec![0_u8; CHUNK_BYTES];
            let mut written = 0_u64;
            let mut error = writer
                .write_all(&head)
                .err()
                .map(|e| format!("writing the header: {e}"));
            while error.is_none() {
                let chunk = source.next_chunk(&mut buf);
                if chunk.is_empty() {
                    break;
                }
                match writer.write_all(chunk) {
                    Ok(()) => written += chunk.len() as u64,
                    Err(e) => error = Some(format!("writing at offset {written}: {e}")),
                }
            }
            if error.is_none() {
                let _ = writer.shutdown(Shutdown::Write);
            }
            (written, source.digest(), error)
        })
        .ctx(|| "spawning the sender thread".to_owned())?;

    let (received, recv_error) = receive(&stream, Verifier::new(recv_seed, recv_bytes), read_rate);
    let (sent, sent_sha256, send_error) = sender.join().map_err(|_| Error::Process {
        what: "bulk sender thread".to_owned(),
        detail: "panicked".to_owned(),
    })?;
    Ok(SideReport {
        sent,
        sent_sha256,
        received,
        elapsed: started.elapsed(),
        error: send_error.or(recv_error),
    })
}

/// Reads until EOF (or an error), feeding `verifier`, at most `rate` bytes a second.
fn receive(
    mut stream: &TcpStream,
    mut verifier: Verifier,
    rate: Option<u64>,
) -> (Verified, Option<String>) {
    let mut limit = rate.map(RateLimit::new);
    let mut buf = vec![0_u8; CHUNK_BYTES];
    let error = loop {
        let want = match limit.as_mut() {
            Some(l) => l.next_read(buf.len()),
            None => buf.len(),
        };
        match stream.read(&mut buf[..want]) {
            Ok(0) => break None,
            Ok(n) => {
                verifier.update(&buf[..n]);
                if let Some(l) = limit.as_mut() {
                    l.consumed(n);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(format!("reading: {e}")),
        }
    };
    (verifier.finish(), error)
}

/// The server's view of one exchange.
#[derive(Clone, Debug)]
pub struct ServerReport {
    /// The client's address as the server saw it (the daemon's, behind the ingress).
    pub peer: SocketAddr,
    /// The header the client sent, or `None` when it sent something else.
    pub spec: Option<BulkSpec>,
    /// The server's side of the exchange.
    pub side: Option<SideReport>,
    /// Why the exchange did not start (bad preamble or header).
    pub error: Option<String>,
}

/// What a [`BulkServer`] expects before the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preamble {
    /// The header comes first.
    None,
    /// One TLS record (a ClientHello) comes first and is skipped.
    TlsRecord,
}

/// A server for [`exchange`]: sinks and verifies the up stream, sources the down stream.
pub struct BulkServer {
    acceptor: Acceptor,
    reports: Receiver<ServerReport>,
}

impl BulkServer {
    /// Starts on `ip`, on a port the kernel picks.
    pub fn start(ip: impl Into<IpAddr>, preamble: Preamble) -> Result<Self> {
        let ip = ip.into();
        let listener =
            TcpListener::bind((ip, 0)).ctx(|| format!("binding a bulk server on {ip}"))?;
        Self::on(listener, preamble)
    }

    /// Starts on an already bound listener.
    pub fn on(listener: TcpListener, preamble: Preamble) -> Result<Self> {
        let (tx, reports) = mpsc::channel();
        let acceptor = Acceptor::spawn("bulk", listener, move |stream, peer| {
            let _ = tx.send(serve(stream, peer, preamble));
        })?;
        Ok(Self { acceptor, reports })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// The report of the next exchange to finish, waiting up to `timeout`.
    pub fn next_report(&self, timeout: Duration) -> Result<ServerReport> {
        self.reports
            .recv_timeout(timeout)
            .map_err(|_| Error::Timeout {
                what: "a bulk exchange to finish on the server".to_owned(),
                waited: timeout,
            })
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr, preamble: Preamble) -> ServerReport {
    let failed = |error: String| ServerReport {
        peer,
        spec: None,
        side: None,
        error: Some(error),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    if preamble == Preamble::TlsRecord {
        let mut record_header = [0_u8; 5];
        if let Err(e) = stream.read_exact(&mut record_header) {
            return failed(format!("reading the TLS record header: {e}"));
        }
        let len = u64::from(u16::from_be_bytes([record_header[3], record_header[4]]));
        match std::io::copy(&mut (&stream).take(len), &mut std::io::sink()) {
            Ok(n) if n == len => {}
            Ok(n) => return failed(format!("TLS record cut short: {n} of {len} bytes")),
            Err(e) => return failed(format!("skipping the TLS record: {e}")),
        }
    }
    let mut header = [0_u8; HEADER_BYTES];
    if let Err(e) = stream.read_exact(&mut header) {
        return failed(format!("reading the bulk header: {e}"));
    }
    let Some(spec) = BulkSpec::parse(&header) else {
        return failed("not a bulk header".to_owned());
    };
    let side = run_side(
        stream,
        Vec::new(),
        (spec.down_seed, spec.down_bytes),
        (spec.up_seed, spec.up_bytes),
        spec.server_read_rate,
        spec.idle_timeout,
    );
    match side {
        Ok(side) => ServerReport {
            peer,
            spec: Some(spec),
            side: Some(side),
            error: None,
        },
        Err(e) => ServerReport {
            peer,
            spec: Some(spec),
            side: None,
            error: Some(format!("{e:?}")),
        },
    }
}

/// Latency percentiles of a ping-pong run.
#[derive(Clone, Debug)]
pub struct LatencyStats {
    /// Round trips measured.
    pub samples: usize,
    /// Median round-trip time.
    pub p50: Duration,
    /// 99th percentile round-trip time.
    pub p99: Duration,
    /// Slowest round trip.
    pub max: Duration,
    /// Mean round-trip time.
    pub mean: Duration,
}

/// Sends `size`-byte messages to an echo peer and waits for each to come back, `rounds` times
/// (after a few unmeasured warm-up rounds); returns the round-trip percentiles.
pub fn ping_pong(stream: &mut TcpStream, rounds: usize, size: usize) -> Result<LatencyStats> {
    stream
        .set_nodelay(true)
        .ctx(|| "setting TCP_NODELAY".to_owned())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ctx(|| "setting a read timeout".to_owned())?;
    let msg = vec![0x5a_u8; size];
    let mut back = vec![0_u8; size];
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds + 10 {
        let t = Instant::now();
        stream.write_all(&msg).ctx(|| format!("ping {round}"))?;
        stream
            .read_exact(&mut back)
            .ctx(|| format!("pong {round}"))?;
        if round >= 10 {
            samples.push(t.elapsed());
        }
        if back != msg {
            return Err(Error::Mismatch(format!(
                "pong {round} differs from its ping"
            )));
        }
    }
    Ok(LatencyStats::from_samples(samples))
}

impl LatencyStats {
    /// Percentiles of `samples` (nearest rank).
    pub fn from_samples(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| {
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n.max(1));
            samples.get(rank - 1).copied().unwrap_or_default()
        };
        let total: Duration = samples.iter().sum();
        Self {
            samples: n,
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
            mean: total
                .checked_div(u32::try_from(n).unwrap_or(u32::MAX))
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut spec = BulkSpec::both_ways(1 << 30, 42);
        spec.server_read_rate = Some(1 << 20);
        let parsed = BulkSpec::parse(&spec.header()).unwrap();
        assert_eq!(parsed, spec);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let stats = LatencyStats::from_samples(samples);
        assert_eq!(stats.p50, Duration::from_millis(50));
        assert_eq!(stats.p99, Duration::from_millis(99));
        assert_eq!(stats.max, Duration::from_millis(100));
    }
}
