//! Peeks a ClientHello off a live socket until it is whole, within a cap and a deadline.
//!
//! `MSG_PEEK` returns as soon as any byte is queued and returns the same bytes again, so a
//! naive `readable().await; peek()` loop spins at 100 % CPU while a slow client is between
//! segments: tokio keeps the socket marked readable until an operation reports `WouldBlock`,
//! and a peek on a non-empty queue never does. The loop here therefore (1) waits for
//! readiness, (2) peeks inside [`TcpStream::try_io`] and reports `WouldBlock` itself when the
//! queue did not grow, which makes tokio clear the readiness it captured *before* the peek —
//! an edge that arrived during the peek survives, so no wake-up is lost — and (3) parks until
//! the kernel signals the next segment (epoll is edge-triggered: one event per arrival).
//! A client that sends one byte per segment costs one wake-up and one peek per segment, all
//! bounded by the cap and the deadline. `SO_RCVLOWAT` could batch those wake-ups, but it must
//! be restored before the socket is spliced, and a value larger than the receive buffer can
//! hold makes the kernel grow the buffer and clamp the TCP window for the life of the flow;
//! it is not worth it here.
//!
//! tokio offers no readiness-free peek, so the slow path peeks through a duplicate of the
//! descriptor (`dup(2)`, same open file, so the same non-blocking queue). The common case — the
//! whole hello in the first peek — needs neither the duplicate nor a second peek.
//!
//! A FIN ends the wait (`closed`) rather than the deadline: a peek on a queue that holds data
//! and a FIN returns the data, so the end of the stream is read from the readiness flags
//! (`EPOLLRDHUP`), checked only after a peek that found nothing new.

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::parse::{ClientHelloInfo, ParseError, parse_client_hello};

/// First peek buffer: enough for classic hellos (~250–600 bytes) and most post-quantum ones.
const INITIAL_PEEK_BYTES: usize = 2048;

/// First peek buffers kept for reuse on each thread. A fresh zeroed 2 KiB allocation per
/// connection cost about 2,700 instructions in glibc (callgrind, ~5 % of a passthrough flow);
/// a reused one costs a few dozen. A reused buffer holds an earlier hello's bytes, but only
/// what the current peek returned is ever parsed.
const POOLED_BUFFERS: usize = 16;

thread_local! {
    static PEEK_BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Peek buffers waiting for reuse on this thread.
#[cfg(test)]
pub(crate) fn pooled_buffers() -> usize {
    PEEK_BUFFERS.with(|pool| pool.borrow().len())
}

/// A peek buffer; one of the first size goes back to its thread's pool when dropped (a task
/// may end on another thread than it began: the pools stay bounded either way).
struct PeekBuffer(Vec<u8>);

impl PeekBuffer {
    fn new(len: usize) -> Self {
        let pooled = || {
            PEEK_BUFFERS
                .try_with(|pool| pool.try_borrow_mut().ok()?.pop())
                .ok()?
        };
        match (len == INITIAL_PEEK_BYTES).then(pooled).flatten() {
            Some(buf) => Self(buf),
            None => Self(vec![0; len]),
        }
    }
}

impl Drop for PeekBuffer {
    fn drop(&mut self) {
        if self.0.len() != INITIAL_PEEK_BYTES {
            return;
        }
        let buf = std::mem::take(&mut self.0);
        let _ = PEEK_BUFFERS.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut()
                && pool.len() < POOLED_BUFFERS
            {
                pool.push(buf);
            }
        });
    }
}

#[cfg(test)]
thread_local! {
    /// Peeks done by the slow path on this thread, so tests can prove it does not spin.
    pub(crate) static PEEKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Why no ClientHello could be read; each variant has a stable [`HelloError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The client's first bytes are not a TLS handshake record.
    #[error("client did not start a tls handshake")]
    NotTls,
    /// The records or the hello are malformed.
    #[error("malformed client hello: {reason}")]
    BadHello {
        /// What was wrong, as a fixed phrase.
        reason: &'static str,
    },
    /// The hello would exceed the configured cap.
    #[error("client hello of at least {len} bytes exceeds the cap of {max_hello_bytes} bytes")]
    TooLarge {
        /// Record bytes the hello needs at least.
        len: usize,
        /// The configured cap.
        max_hello_bytes: usize,
    },
    /// The deadline passed before the hello was whole.
    #[error("client hello not complete before the handshake deadline")]
    Timeout,
    /// The client closed or reset the connection before the hello was whole.
    #[error("client closed the connection after {received} bytes of its hello")]
    Closed {
        /// Bytes that had arrived.
        received: usize,
    },
    /// A local socket error.
    #[error("socket error while reading the client hello")]
    Io {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl HelloError {
    /// Stable snake_case reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::BadHello { .. } => "bad_hello",
            HelloError::TooLarge { .. } => "hello_too_large",
            HelloError::Timeout => "hello_timeout",
            HelloError::Closed { .. } => "closed",
            HelloError::Io { .. } => "io_error",
        }
    }

    fn from_io(source: io::Error, received: usize) -> Self {
        match source.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => HelloError::Closed { received },
            _ => HelloError::Io { source },
        }
    }
}

impl From<ParseError> for HelloError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::NotTls => HelloError::NotTls,
            ParseError::Invalid { reason } => HelloError::BadHello { reason },
            ParseError::TooLarge {
                len,
                max_hello_bytes,
            } => HelloError::TooLarge {
                len,
                max_hello_bytes,
            },
            // Only reached if a caller converts an intermediate state; treat it as malformed.
            ParseError::Incomplete { .. } => HelloError::BadHello {
                reason: "incomplete",
            },
        }
    }
}

/// Peeks the ClientHello at the head of `stream`'s receive queue without consuming it.
///
/// Returns once the hello is whole, or fails with a [`HelloError`] when the bytes are not TLS,
/// malformed, over `max_hello_bytes`, the client closes, or `deadline` passes. On success every
/// byte is still queued on the socket.
pub async fn read_client_hello(
    stream: &TcpStream,
    max_hello_bytes: usize,
    deadline: Instant,
) -> Result<ClientHelloInfo, HelloError> {
    tokio::time::timeout_at(deadline, peek_hello(stream, max_hello_bytes))
        .await
        .unwrap_or(Err(HelloError::Timeout))
}

async fn peek_hello(
    stream: &TcpStream,
    max_hello_bytes: usize,
) -> Result<ClientHelloInfo, HelloError> {
    let mut buffer = PeekBuffer::new(INITIAL_PEEK_BYTES.min(max_hello_bytes).max(1));
    let buf = &mut buffer.0;
    let mut len = stream
        .peek(buf)
        .await
        .map_err(|e| HelloError::from_io(e, 0))?;
    let mut peeker: Option<std::net::TcpStream> = None;
    loop {
        if len == 0 {
            return Err(HelloError::Closed { received: 0 });
        }
        match parse_client_hello(buf.get(..len).unwrap_or_default(), max_hello_bytes) {
            Ok(info) => return Ok(info),
            Err(ParseError::Incomplete { needed }) => {
                if needed > buf.len() {
                    // The parser refuses anything beyond the cap, so this stays bounded.
                    let grown = needed.max(buf.len().saturating_mul(2)).min(max_hello_bytes);
                    buf.resize(grown, 0);
                }
            }
            Err(e) => return Err(e.into()),
        }
        let peeker = match &peeker {
            Some(p) => p,
            None => peeker.insert(duplicate(stream).map_err(|e| HelloError::from_io(e, len))?),
        };
        len = wait_for_more(stream, peeker, buf, len).await?;
    }
}

/// A second descriptor for the same socket, for peeking outside tokio's readiness tracking.
fn duplicate(stream: &TcpStream) -> io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd;
    Ok(std::net::TcpStream::from(
        stream.as_fd().try_clone_to_owned()?,
    ))
}

/// Waits until the queue holds more than `prev` bytes and returns the new peeked length
/// (0 means the client closed an empty queue).
async fn wait_for_more(
    stream: &TcpStream,
    peeker: &std::net::TcpStream,
    buf: &mut [u8],
    prev: usize,
) -> Result<usize, HelloError> {
    loop {
        let ready = stream
            .ready(Interest::READABLE)
            .await
            .map_err(|e| HelloError::from_io(e, prev))?;
        #[cfg(test)]
        PEEKS.with(|p| p.set(p.get() + 1));
        let peeked = stream.try_io(Interest::READABLE, || match peeker.peek(buf) {
            // Nothing new: report WouldBlock so tokio clears the readiness it saw before
            // this peek, and the next `ready()` parks until the next segment.
            Ok(n) if n != 0 && n <= prev && n < buf.len() => Err(io::ErrorKind::WouldBlock.into()),
            other => other,
        });
        match peeked {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return Err(HelloError::Closed { received: prev });
                }
            }
            Err(e) => return Err(HelloError::from_io(e, prev)),
        }
    }
}
