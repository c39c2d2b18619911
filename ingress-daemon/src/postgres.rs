//! Postgres preamble: the 8-byte `SSLRequest` a libpq client sends before its ClientHello.
//!
//! A client with `sslmode=require` opens with `SSLRequest` and waits for a one-byte answer
//! (`S`) before it starts TLS; PG17's `sslnegotiation=direct` starts TLS at once with ALPN
//! `postgresql`. [`read_client_preamble`] tells the two apart by peeking one byte (a TLS
//! record starts with 0x16, a Postgres packet length with 0x00), then reads *exactly* the 8
//! bytes of a request, never more: what follows stays in the socket for the hello reader and
//! the splice engine. A `GSSENCRequest` is declined with `N`, as a server without GSSAPI does,
//! and the client goes on with `SSLRequest`. In passthrough mode [`start_backend_tls`] replays
//! the request to the instance and insists on `S`.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The `SSLRequest` packet: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// The ALPN protocol of PG17 direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Code of `SSLRequest`.
const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Code of `GSSENCRequest`.
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Code of `CancelRequest`.
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// How many `GSSENCRequest`s a client may send before it is refused.
const MAX_GSSENC_REQUESTS: usize = 1;

/// What a client's first 8 bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `SSLRequest`: answer `S`, then a ClientHello follows.
    Ssl,
    /// `GSSENCRequest`: answer `N`, then the client may send `SSLRequest`.
    GssEnc,
    /// `CancelRequest` in plaintext: it names no host, so it cannot be routed.
    Cancel,
    /// Anything else, e.g. a plaintext `StartupMessage` (`sslmode=disable`).
    Other,
}

/// Classifies an 8-byte Postgres request header.
pub fn classify(header: &[u8; 8]) -> Request {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    match (len, u32::from_be_bytes([c0, c1, c2, c3])) {
        (8, SSL_REQUEST_CODE) => Request::Ssl,
        (8, GSSENC_REQUEST_CODE) => Request::GssEnc,
        (16.., CANCEL_REQUEST_CODE) => Request::Cancel,
        _ => Request::Other,
    }
}

/// How a Postgres client starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPreamble {
    /// The client sent `SSLRequest` (now consumed); answer it with [`accept_ssl_request`].
    SslRequest {
        /// Bytes already followed the request when it was read. A standard client waits for
        /// the answer, so this is unusual; such a flow must not be handed to the kernel path,
        /// whose socket would hold a partly read segment.
        pipelined: bool,
    },
    /// The client starts TLS directly (PG17 `sslnegotiation=direct`): nothing was consumed.
    DirectTls,
}

/// Why a Postgres preamble failed; each variant has a stable [`PgError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The client neither asked for TLS nor started it.
    #[error("postgres client did not ask for tls")]
    NotTls,
    /// A plaintext `CancelRequest`, which carries no server name to route by.
    #[error("plaintext postgres cancel request cannot be routed")]
    CancelRequest,
    /// The deadline passed first.
    #[error("postgres preamble not complete before the deadline")]
    Timeout,
    /// The client closed or reset the connection.
    #[error("client closed the connection during the postgres preamble")]
    Closed,
    /// The backend answered the `SSLRequest` with something other than `S`.
    #[error("backend refused tls: answered {reply:#04x} to SSLRequest")]
    BackendRefusedTls {
        /// The byte it answered (`N` = no TLS, `E` = error packet).
        reply: u8,
    },
    /// The backend closed before answering, or its socket failed.
    #[error("backend closed before answering SSLRequest")]
    BackendClosed {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The backend did not answer before the deadline.
    #[error("backend did not answer SSLRequest before the deadline")]
    BackendTimeout,
    /// A local socket error on the client side.
    #[error("socket error during the postgres preamble")]
    Io {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl PgError {
    /// Stable snake_case reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PgError::NotTls => "not_tls",
            PgError::CancelRequest => "pg_cancel_request",
            PgError::Timeout => "hello_timeout",
            PgError::Closed => "closed",
            PgError::BackendRefusedTls { .. } | PgError::BackendClosed { .. } => {
                "backend_refused_tls"
            }
            PgError::BackendTimeout => "backend_timeout",
            PgError::Io { .. } => "io_error",
        }
    }

    fn client_io(source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => PgError::Closed,
            _ => PgError::Io { source },
        }
    }
}

/// Reads the client's preamble: consumes an `SSLRequest` (declining a `GSSENCRequest` on the
/// way) or recognises direct TLS without consuming anything.
pub async fn read_client_preamble(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<ClientPreamble, PgError> {
    tokio::time::timeout_at(deadline, preamble(stream))
        .await
        .unwrap_or(Err(PgError::Timeout))
}

async fn preamble(stream: &mut TcpStream) -> Result<ClientPreamble, PgError> {
    let mut gssenc_requests = 0;
    loop {
        // One byte decides; a ninth tells whether bytes were pipelined after the request.
        let mut peeked = [0u8; 9];
        let n = stream.peek(&mut peeked).await.map_err(PgError::client_io)?;
        match peeked.first() {
            _ if n == 0 => return Err(PgError::Closed),
            Some(&TLS_HANDSHAKE) => return Ok(ClientPreamble::DirectTls),
            Some(0) => {}
            _ => return Err(PgError::NotTls),
        }
        let mut header = [0u8; 8];
        stream
            .read_exact(&mut header)
            .await
            .map_err(PgError::client_io)?;
        match classify(&header) {
            Request::Ssl => return Ok(ClientPreamble::SslRequest { pipelined: n > 8 }),
            Request::GssEnc if gssenc_requests < MAX_GSSENC_REQUESTS => {
                gssenc_requests += 1;
                stream.write_all(b"N").await.map_err(PgError::client_io)?;
            }
            Request::Cancel => return Err(PgError::CancelRequest),
            Request::GssEnc | Request::Other => return Err(PgError::NotTls),
        }
    }
}

/// Answers a consumed `SSLRequest` with `S`: the client sends its ClientHello next.
pub async fn accept_ssl_request(stream: &mut TcpStream) -> Result<(), PgError> {
    stream.write_all(b"S").await.map_err(PgError::client_io)
}

/// Replays `SSLRequest` to a freshly connected backend and reads exactly its one-byte answer,
/// which must be `S`; afterwards the backend expects the client's ClientHello.
pub async fn start_backend_tls(backend: &mut TcpStream, deadline: Instant) -> Result<(), PgError> {
    let exchange = async {
        backend
            .write_all(&SSL_REQUEST)
            .await
            .map_err(|source| PgError::BackendClosed { source })?;
        let mut reply = [0u8; 1];
        backend
            .read_exact(&mut reply)
            .await
            .map_err(|source| PgError::BackendClosed { source })?;
        match reply {
            [b'S'] => Ok(()),
            [reply] => Err(PgError::BackendRefusedTls { reply }),
        }
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .unwrap_or(Err(PgError::BackendTimeout))
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;
