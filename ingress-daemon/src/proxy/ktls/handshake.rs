//! The rustls handshake for a flow that will continue on kTLS, then key installation.
//!
//! tokio-rustls reads whatever the socket holds, so a client that sends application data
//! right behind its `Finished` would leave records inside rustls that the kernel never sees.
//! Here rustls is fed exactly one TLS record at a time (the 5-byte header, then exactly the
//! body) and reading stops as soon as the handshake completes. Everything rustls wants to
//! send (TLS 1.3 `NewSessionTicket`s follow the handshake at once) is written before the
//! secrets are extracted, so the sequence numbers rustls hands over match what went on the
//! wire.

use std::{
    io::{self, Read as _},
    os::fd::AsFd as _,
};

use rustls::ServerConnection;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{CryptoInfo, CryptoInfoError, Support, Version, suite_params};
use crate::sys::{self, TlsDirection};

/// TLS record header: type, legacy version, length.
const HEADER_BYTES: usize = 5;

/// Largest record body a peer may send: 2^14 plaintext plus expansion (RFC 8446 §5.2 allows
/// 2^14 + 256 in TLS 1.3; TLS 1.2 allows 2^14 + 2048).
const MAX_RECORD_BODY: usize = (1 << 14) + 2048;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed mid-handshake.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// rustls refused the client's messages (an alert was sent where possible).
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// A record header announced more than a TLS record can hold.
    #[error("record of {0} bytes")]
    RecordTooLarge(usize),
}

/// A finished handshake, before the keys go to the kernel.
pub struct Handshaken {
    /// The client socket, with the kernel's TLS layer on (no keys yet: bytes pass through
    /// unchanged); nothing past the handshake has been read from it.
    pub sock: TcpStream,
    /// The rustls session; nothing is left to send.
    pub conn: ServerConnection,
}

/// Runs the handshake on `sock`, one record at a time.
pub async fn handshake(
    mut sock: TcpStream,
    mut conn: ServerConnection,
) -> Result<Handshaken, HandshakeError> {
    let mut record = Vec::with_capacity(HEADER_BYTES + 2048);
    loop {
        flush(&mut sock, &mut conn).await?;
        if !conn.is_handshaking() {
            return Ok(Handshaken { sock, conn });
        }
        record.resize(HEADER_BYTES, 0);
        sock.read_exact(&mut record).await?;
        let body = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if body > MAX_RECORD_BODY {
            return Err(HandshakeError::RecordTooLarge(body));
        }
        record.resize(HEADER_BYTES + body, 0);
        sock.read_exact(record.get_mut(HEADER_BYTES..).unwrap_or_default())
            .await?;
        let mut rest = record.as_slice();
        while !rest.is_empty() {
            if conn.read_tls(&mut rest)? == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
        }
        if let Err(err) = conn.process_new_packets() {
            // Send the alert rustls queued, if the socket takes it.
            let _ = flush(&mut sock, &mut conn).await;
            return Err(err.into());
        }
    }
}

/// Writes everything rustls has queued.
async fn flush(sock: &mut TcpStream, conn: &mut ServerConnection) -> io::Result<()> {
    if !conn.wants_write() {
        return Ok(());
    }
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    sock.write_all(&out).await
}

/// Why the keys could not go to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The negotiated version or cipher suite is not one the kernel took at start-up.
    #[error("the negotiated suite is not one the kernel takes")]
    Unsupported,
    /// rustls would not hand over the secrets.
    #[error("extracting secrets: {0}")]
    Extract(#[source] rustls::Error),
    /// The secrets did not fit the kernel's structure.
    #[error(transparent)]
    CryptoInfo(#[from] CryptoInfoError),
    /// The kernel refused the upper layer or a key.
    #[error("kernel refused {what}: {source}")]
    Kernel {
        /// `tx key` or `rx key`.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// A kTLS socket and the plaintext rustls had already decrypted (to be written to the backend
/// before anything else; empty unless the client sent data inside the handshake's last read).
pub struct Installed {
    /// The client socket, now with kTLS in both directions.
    pub sock: TcpStream,
    /// Plaintext rustls held.
    pub early: Vec<u8>,
    /// The version and cipher installed.
    pub params: (Version, super::Cipher),
}

/// Moves the session's keys into the kernel, on a socket that has its TLS layer already (see
/// [`Handshaken::sock`]). Whether the suite is supported is decided before
/// the secrets are extracted (extraction consumes the session); a failure after that leaves a
/// socket that cannot carry the flow.
pub fn install(h: Handshaken, support: &Support) -> Result<Installed, InstallError> {
    let Handshaken { sock, mut conn } = h;
    let version = conn.protocol_version().and_then(Version::from_rustls);
    let params = conn
        .negotiated_cipher_suite()
        .and_then(|s| suite_params(s.suite()));
    let (Some(version), Some((suite_version, cipher))) = (version, params) else {
        return Err(InstallError::Unsupported);
    };
    if suite_version != version || !support.supports(version, cipher) {
        return Err(InstallError::Unsupported);
    }
    let mut early = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => early.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(InstallError::Extract)?;
    let tx = CryptoInfo::from_secrets(version, &secrets.tx.1, secrets.tx.0)?;
    let rx = CryptoInfo::from_secrets(version, &secrets.rx.1, secrets.rx.0)?;
    drop(secrets);
    let kernel = |what| move |source| InstallError::Kernel { what, source };
    sys::set_tls_crypto_info(sock.as_fd(), TlsDirection::Transmit, tx.as_bytes())
        .map_err(kernel("tx key"))?;
    sys::set_tls_crypto_info(sock.as_fd(), TlsDirection::Receive, rx.as_bytes())
        .map_err(kernel("rx key"))?;
    Ok(Installed {
        sock,
        early,
        params: (version, cipher),
    })
}
