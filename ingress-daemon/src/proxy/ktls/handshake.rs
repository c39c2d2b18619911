//! The rustls handshake for a flow that will continue on kTLS, then key installation.
//!
//! tokio-rustls reads whatever the socket holds, so a client that sends application data
//! right behind its `Finished` would leave records inside rustls that the kernel never sees.
//! Here rustls's unbuffered connection is fed exactly one TLS record at a time (the 5-byte
//! header, then exactly the body) and reading stops as soon as the handshake completes.
//! Everything rustls wants to send (TLS 1.3 `NewSessionTicket`s follow the handshake at once)
//! is written before the keys are taken, so the sequence numbers rustls hands over match what
//! went on the wire. What rustls keeps after that is a [`KernelConnection`]: the key schedule
//! that derives the next keys when a TLS 1.3 `KeyUpdate` comes (see `relay`).

use std::{io, os::fd::AsFd as _};

use rustls::{
    kernel::KernelConnection,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
};
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
    pub conn: UnbufferedServerConnection,
    /// Application data rustls decrypted during the handshake (none from a client that waits
    /// for its `Finished` to be read, as clients do; kept for one that does not).
    early: Vec<u8>,
}

/// What the socket must do before rustls can go on.
enum Next {
    /// Write `outgoing`.
    Transmit,
    /// Read the next record into `incoming`.
    Read,
    /// The handshake is complete and everything is sent.
    Done,
    /// rustls failed; `outgoing` holds its alert if it had one.
    Failed(rustls::Error),
    /// The client closed its TLS session during the handshake.
    Closed,
}

/// Runs the handshake on `sock`, one record at a time.
pub async fn handshake(
    mut sock: TcpStream,
    mut conn: UnbufferedServerConnection,
) -> Result<Handshaken, HandshakeError> {
    let mut incoming = Vec::with_capacity(HEADER_BYTES + 2048);
    let mut outgoing = Vec::new();
    let mut early = Vec::new();
    loop {
        match advance(&mut conn, &mut incoming, &mut outgoing, &mut early) {
            Next::Transmit => {
                sock.write_all(&outgoing).await?;
                outgoing.clear();
            }
            Next::Read => read_record(&mut sock, &mut incoming).await?,
            Next::Done => {
                return Ok(Handshaken { sock, conn, early });
            }
            Next::Failed(err) => {
                // Send the alert rustls queued, if the socket takes it.
                let _ = sock.write_all(&outgoing).await;
                return Err(err.into());
            }
            Next::Closed => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
        }
    }
}

/// Appends exactly one TLS record from `sock` to `incoming`.
async fn read_record(sock: &mut TcpStream, incoming: &mut Vec<u8>) -> Result<(), HandshakeError> {
    let at = incoming.len();
    incoming.resize(at + HEADER_BYTES, 0);
    sock.read_exact(incoming.get_mut(at..).unwrap_or_default())
        .await?;
    let header = incoming.get(at..).unwrap_or_default();
    let body = usize::from(u16::from_be_bytes([
        header.get(3).copied().unwrap_or_default(),
        header.get(4).copied().unwrap_or_default(),
    ]));
    if body > MAX_RECORD_BODY {
        return Err(HandshakeError::RecordTooLarge(body));
    }
    incoming.resize(at + HEADER_BYTES + body, 0);
    sock.read_exact(incoming.get_mut(at + HEADER_BYTES..).unwrap_or_default())
        .await?;
    Ok(())
}

/// Drives rustls over the records in `incoming` until the socket has to act.
fn advance(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    early: &mut Vec<u8>,
) -> Next {
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming);
        let next = match state {
            Err(err) => Some(Next::Failed(err)),
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(|buf| data.encode(buf), outgoing);
                None
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Some(Next::Transmit)
            }
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                while let Some(Ok(record)) = data.next_record() {
                    early.extend_from_slice(record.payload);
                }
                None
            }
            Ok(ConnectionState::ReadEarlyData(mut data)) => {
                while let Some(Ok(record)) = data.next_record() {
                    early.extend_from_slice(record.payload);
                }
                None
            }
            // The server may write once its `Finished` is out (TLS 1.3), before the client's
            // `Finished` has come: done only once rustls is no longer handshaking.
            Ok(ConnectionState::WriteTraffic(_)) => Some(Next::Done),
            Ok(ConnectionState::BlockedHandshake) => Some(Next::Read),
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Some(Next::Closed),
            Ok(_) => Some(Next::Failed(rustls::Error::General(
                "unexpected state during the handshake".into(),
            ))),
        };
        incoming.drain(..discard.min(incoming.len()));
        match next {
            Some(Next::Done) if conn.is_handshaking() => return Next::Read,
            Some(Next::Failed(err)) => {
                alerts(conn, outgoing);
                return Next::Failed(err);
            }
            Some(next) => return next,
            None => {}
        }
    }
}

/// Encodes what rustls queued after a failure (its alert) into `outgoing`.
fn alerts(conn: &mut UnbufferedServerConnection, outgoing: &mut Vec<u8>) {
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
        let Ok(ConnectionState::EncodeTlsData(mut data)) = state else {
            return;
        };
        encode(|buf| data.encode(buf), outgoing);
    }
}

/// Appends one encoded chunk to `outgoing`, growing it to what rustls asks for.
fn encode(mut into: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>, outgoing: &mut Vec<u8>) {
    let at = outgoing.len();
    let mut room = 2048;
    loop {
        outgoing.resize(at + room, 0);
        match into(outgoing.get_mut(at..).unwrap_or_default()) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return;
            }
            Err(EncodeError::InsufficientSize(need)) => room = need.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                outgoing.truncate(at);
                return;
            }
        }
    }
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
/// before anything else; empty unless the client sent data inside the handshake).
pub struct Installed {
    /// The client socket, now with kTLS in both directions.
    pub sock: TcpStream,
    /// Plaintext rustls held.
    pub early: Vec<u8>,
    /// The version and cipher installed.
    pub params: (Version, super::Cipher),
    /// rustls's key schedule, for the keys that follow a `KeyUpdate`.
    pub keys: KernelConnection<ServerConnectionData>,
    /// Records the daemon sends under one key before it updates its own (TLS 1.3 where the
    /// kernel rekeys, for suites with a usage limit: AES-GCM); `None`: never.
    pub records_per_key: Option<u64>,
}

/// Environment variable of a test-only hook: the records per key after which the daemon
/// updates its own keys (instead of half the suite's limit), so a test can see it happen.
pub const TEST_RECORDS_PER_KEY_ENV: &str = "INGRESSD_TEST_KTLS_RECORDS_PER_KEY";

/// When the daemon updates its own keys: at half the suite's usage limit (rustls counts 2^24
/// full records for AES-GCM, so every 2^23 records, about 137 GB), never for a suite without
/// one (ChaCha20-Poly1305: `u64::MAX`).
fn records_per_key(confidentiality_limit: u64) -> Option<u64> {
    static HOOK: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let hook = *HOOK.get_or_init(|| {
        std::env::var(TEST_RECORDS_PER_KEY_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0)
    });
    hook.or((confidentiality_limit != u64::MAX).then_some(confidentiality_limit / 2))
}

/// Moves the session's keys into the kernel, on a socket that has its TLS layer already (see
/// [`Handshaken::sock`]). Whether the suite is supported is decided before
/// the secrets are extracted (extraction consumes the session); a failure after that leaves a
/// socket that cannot carry the flow.
pub fn install(h: Handshaken, support: &Support) -> Result<Installed, InstallError> {
    let Handshaken { sock, conn, early } = h;
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
    let (secrets, keys) = conn
        .dangerous_into_kernel_connection()
        .map_err(InstallError::Extract)?;
    let tx = CryptoInfo::from_secrets(version, &secrets.tx.1, secrets.tx.0)?;
    let rx = CryptoInfo::from_secrets(version, &secrets.rx.1, secrets.rx.0)?;
    drop(secrets);
    let kernel = |what| move |source| InstallError::Kernel { what, source };
    sys::set_tls_crypto_info(sock.as_fd(), TlsDirection::Transmit, tx.as_bytes())
        .map_err(kernel("tx key"))?;
    sys::set_tls_crypto_info(sock.as_fd(), TlsDirection::Receive, rx.as_bytes())
        .map_err(kernel("rx key"))?;
    let records_per_key = (support.rekeys() && version == Version::Tls13)
        .then(|| keys.negotiated_cipher_suite().tls13())
        .flatten()
        .and_then(|suite| records_per_key(suite.common.confidentiality_limit));
    Ok(Installed {
        sock,
        early,
        params: (version, cipher),
        keys,
        records_per_key,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        sync::Arc,
    };

    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::net::TcpListener;

    use super::*;

    const NAME: &str = "kernel.tls.test";

    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec![NAME.to_owned()]).unwrap();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        let mut server = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The handshake, failing the test instead of hanging it.
    async fn bounded(
        handshake: impl Future<Output = Result<Handshaken, HandshakeError>>,
    ) -> Result<Handshaken, HandshakeError> {
        tokio::time::timeout(std::time::Duration::from_secs(10), handshake)
            .await
            .expect("the handshake ends in time")
    }

    /// A connected pair: the server's tokio socket and the client's std socket.
    async fn pair() -> (TcpStream, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    #[tokio::test]
    async fn the_handshake_reads_no_byte_past_the_clients_finished() {
        let (server_config, client_config) = configs();
        let (server, mut client) = pair().await;
        let talker = std::thread::spawn(move || {
            let mut conn =
                ClientConnection::new(client_config, ServerName::try_from(NAME).unwrap()).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut client).unwrap();
            }
            // Application data right behind the Finished, as an eager client sends it.
            conn.writer()
                .write_all(b"right behind the finished")
                .unwrap();
            conn.complete_io(&mut client).unwrap();
            (conn, client)
        });
        let conn = UnbufferedServerConnection::new(server_config).unwrap();
        let done = bounded(handshake(server, conn)).await.unwrap();
        let (_conn, _client) = talker.join().unwrap();
        assert!(done.early.is_empty());
        // The client's record is still in the socket, whole, for the kernel to decrypt.
        let mut sock = done.sock.into_std().unwrap();
        sock.set_nonblocking(false).unwrap();
        let mut header = [0u8; HEADER_BYTES];
        sock.read_exact(&mut header).unwrap();
        assert_eq!(
            &header[..3],
            &[23, 3, 3],
            "an application data record comes next"
        );
        let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
        assert_eq!(
            body,
            b"right behind the finished".len() + 1 + 16,
            "type byte and tag"
        );
        // Nothing is left to send and the key schedule can move on after a KeyUpdate.
        let (secrets, mut keys) = done.conn.dangerous_into_kernel_connection().unwrap();
        assert_eq!(
            secrets.rx.0, 0,
            "no record of the client's was decrypted by rustls"
        );
        let next = keys.update_rx_secret().unwrap();
        assert_eq!(next.0, 0, "new keys start at sequence 0");
    }

    #[tokio::test]
    async fn a_handshake_that_fails_sends_the_alert() {
        let (server_config, _) = configs();
        let (server, mut client) = pair().await;
        // A handshake record holding an empty ClientHello, which rustls cannot decode.
        client.write_all(&[22, 3, 1, 0, 4, 1, 0, 0, 0]).unwrap();
        let conn = UnbufferedServerConnection::new(server_config).unwrap();
        let err = bounded(handshake(server, conn)).await.err().unwrap();
        assert!(matches!(err, HandshakeError::Tls(_)), "{err}");
        let mut alert = [0u8; 7];
        client.read_exact(&mut alert).unwrap();
        assert_eq!(&alert[..5], &[21, 3, 3, 0, 2], "a plaintext alert record");
        assert_eq!(alert[5], 2, "fatal");
    }

    #[tokio::test]
    async fn a_record_larger_than_tls_allows_is_refused_before_it_is_read() {
        let (server_config, _) = configs();
        let (server, mut client) = pair().await;
        client.write_all(&[22, 3, 1, 0x48, 0x01]).unwrap();
        let conn = UnbufferedServerConnection::new(server_config).unwrap();
        let err = bounded(handshake(server, conn)).await.err().unwrap();
        assert!(
            matches!(err, HandshakeError::RecordTooLarge(0x4801)),
            "{err}"
        );
    }
}
