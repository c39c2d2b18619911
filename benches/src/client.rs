//! The load generator: blocking client sessions (TLS end to end, or plaintext) and the
//! measurements made with them — bulk transfers, ping-pong, connection rate, idle connections.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

use crate::backend::{CHUNK_BYTES, Op, fill};

/// Where and how clients connect.
#[derive(Clone)]
pub struct Dialer {
    /// The address of the target (proxy, relay or backend).
    pub addr: SocketAddr,
    /// TLS settings and server name; `None` for plaintext sessions.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Limit for connecting and for each read.
    pub timeout: Duration,
}

/// One client session.
pub enum Session {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS (boxed: the connection state is large).
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

impl Session {
    /// Ends the session cleanly: close_notify for TLS, then a FIN.
    pub fn close(mut self) {
        if let Self::Tls(s) = &mut self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let sock = match &self {
            Self::Plain(s) => s,
            Self::Tls(s) => &s.sock,
        };
        let _ = sock.shutdown(Shutdown::Write);
    }
}

impl Dialer {
    /// Connects and, for TLS, completes the handshake.
    pub fn connect(&self) -> Result<Session> {
        let sock = TcpStream::connect_timeout(&self.addr, self.timeout)
            .with_context(|| format!("connecting to {}", self.addr))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(self.timeout))?;
        sock.set_write_timeout(Some(self.timeout))?;
        match &self.tls {
            None => Ok(Session::Plain(sock)),
            Some((config, name)) => {
                let conn = ClientConnection::new(config.clone(), name.clone())?;
                let mut tls = StreamOwned::new(conn, sock);
                while tls.conn.is_handshaking() {
                    tls.conn
                        .complete_io(&mut tls.sock)
                        .context("TLS handshake")?;
                }
                Ok(Session::Tls(Box::new(tls)))
            }
        }
    }

    /// Connects and sends `op`.
    pub fn request(&self, op: Op) -> Result<Session> {
        let mut s = self.connect()?;
        s.write_all(&op.encode())?;
        s.flush()?;
        Ok(s)
    }

    /// Sends `bytes` to the backend's sink; the time from the first byte to the backend's
    /// acknowledgement of the last.
    pub fn upload(&self, bytes: u64) -> Result<Duration> {
        let mut s = self.connect()?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        fill(&mut buf);
        let started = Instant::now();
        s.write_all(&Op::Sink(bytes).encode())?;
        let mut left = bytes;
        while left > 0 {
            let len = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            s.write_all(&buf[..len])?;
            left -= len as u64;
        }
        s.flush()?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack)
            .context("waiting for the sink's acknowledgement")?;
        let took = started.elapsed();
        s.close();
        Ok(took)
    }

    /// Reads `bytes` from the backend's source; the time from the request to the last byte.
    pub fn download(&self, bytes: u64) -> Result<Duration> {
        let mut s = self.connect()?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        let started = Instant::now();
        s.write_all(&Op::Source(bytes).encode())?;
        s.flush()?;
        let mut left = bytes;
        while left > 0 {
            let got = s.read(&mut buf)?;
            if got == 0 {
                bail!("end of stream with {left} of {bytes} bytes to go");
            }
            left = left.saturating_sub(got as u64);
        }
        let took = started.elapsed();
        s.close();
        Ok(took)
    }

    /// Round trips of `size`-byte messages through the echo: `warmup` unrecorded, then
    /// `count` recorded.
    pub fn ping_pong(&self, size: usize, warmup: usize, count: usize) -> Result<Vec<Duration>> {
        let mut s = self.request(Op::Echo)?;
        let msg = vec![0x5au8; size];
        let mut back = vec![0u8; size];
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let started = Instant::now();
            s.write_all(&msg)?;
            s.flush()?;
            s.read_exact(&mut back).context("reading the echo")?;
            if i >= warmup {
                samples.push(started.elapsed());
            }
        }
        s.close();
        Ok(samples)
    }

    /// One short session: connect, handshake, request a byte, read it, close. Returns the time
    /// from the start of the connect to the first byte.
    pub fn first_byte(&self) -> Result<Duration> {
        let started = Instant::now();
        let mut s = self.request(Op::Ping)?;
        let mut one = [0u8; 1];
        s.read_exact(&mut one).context("reading the first byte")?;
        let took = started.elapsed();
        s.close();
        Ok(took)
    }

    /// `loops` threads open short sessions back to back for `duration`.
    pub fn connection_rate(&self, loops: usize, duration: Duration) -> Result<ConnectionRate> {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let handles: Vec<_> = (0..loops)
            .map(|_| {
                let dialer = self.clone();
                let stop = stop.clone();
                let errors = errors.clone();
                thread::spawn(move || {
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match dialer.first_byte() {
                            Ok(t) => samples.push(t),
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                // A refusing target must not turn into a busy loop.
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    samples
                })
            })
            .collect();
        thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        let mut ttfb = Vec::new();
        for h in handles {
            ttfb.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a client loop panicked"))?,
            );
        }
        let elapsed = started.elapsed();
        Ok(ConnectionRate {
            per_second: ttfb.len() as f64 / elapsed.as_secs_f64(),
            errors: errors.load(Ordering::Relaxed),
            ttfb,
        })
    }

    /// Opens `count` sessions, each answered once end to end, and keeps them open.
    pub fn hold_idle(&self, count: usize) -> Result<Vec<Session>> {
        let mut held = Vec::with_capacity(count);
        for i in 0..count {
            let mut s = self
                .request(Op::Ping)
                .with_context(|| format!("opening idle connection {i}"))?;
            let mut one = [0u8; 1];
            s.read_exact(&mut one)
                .with_context(|| format!("idle connection {i}: first byte"))?;
            held.push(s);
        }
        Ok(held)
    }
}

/// Result of [`Dialer::connection_rate`].
pub struct ConnectionRate {
    /// Completed sessions per second.
    pub per_second: f64,
    /// Sessions that failed.
    pub errors: u64,
    /// Time to first byte of every completed session.
    pub ttfb: Vec<Duration>,
}
