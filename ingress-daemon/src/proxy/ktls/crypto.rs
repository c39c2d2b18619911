//! The kernel's `tls12_crypto_info_*` structures, built from the traffic secrets rustls
//! extracts after a handshake.
//!
//! Layout (`include/uapi/linux/tls.h`, the same for TLS 1.2 and 1.3): `version: u16`,
//! `cipher_type: u16` (host byte order), then byte arrays `iv`, `key`, `salt`, `rec_seq`; no
//! padding, so the bytes are written in order. rustls hands over a 12-byte IV per direction:
//! - TLS 1.3 and ChaCha20-Poly1305 (both versions) form each nonce as IV XOR sequence number.
//!   AES-GCM splits the IV as `salt` (4) + `iv` (8); ChaCha20 has no salt and a 12-byte `iv`.
//! - TLS 1.2 AES-GCM sends an 8-byte explicit nonce in each record. Only the first 4 bytes of
//!   rustls's IV (the implicit salt from the key block) matter; the kernel sends `iv` as the
//!   explicit part and increments it per record, so it starts at the sequence number (as
//!   OpenSSL does), never at a value rustls already used. A receiver reads the explicit nonce
//!   from the record.
//!
//! `rec_seq` is the big-endian sequence number of the next record, as rustls counted it.

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// A kTLS AEAD cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM (`TLS_CIPHER_AES_GCM_128`, Linux 4.13).
    Aes128Gcm,
    /// AES-256-GCM (`TLS_CIPHER_AES_GCM_256`, Linux 5.1).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (`TLS_CIPHER_CHACHA20_POLY1305`, Linux 5.11).
    Chacha20Poly1305,
}

impl Cipher {
    /// Every cipher the daemon can hand to the kernel.
    pub const ALL: [Cipher; 3] = [Self::Aes128Gcm, Self::Aes256Gcm, Self::Chacha20Poly1305];

    fn code(self) -> u16 {
        match self {
            Self::Aes128Gcm => libc::TLS_CIPHER_AES_GCM_128,
            Self::Aes256Gcm => libc::TLS_CIPHER_AES_GCM_256,
            Self::Chacha20Poly1305 => libc::TLS_CIPHER_CHACHA20_POLY1305,
        }
    }

    fn key_bytes(self) -> usize {
        match self {
            Self::Aes128Gcm => 16,
            Self::Aes256Gcm | Self::Chacha20Poly1305 => 32,
        }
    }

    /// Stable lower-case name (logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes128Gcm => "aes_128_gcm",
            Self::Aes256Gcm => "aes_256_gcm",
            Self::Chacha20Poly1305 => "chacha20_poly1305",
        }
    }
}

/// A TLS version kTLS handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// TLS 1.2 (Linux 4.13).
    Tls12,
    /// TLS 1.3 (Linux 5.1 for transmit, 5.2 for receive).
    Tls13,
}

impl Version {
    /// Both versions.
    pub const ALL: [Version; 2] = [Self::Tls12, Self::Tls13];

    /// The version rustls negotiated, if kTLS handles it.
    pub fn from_rustls(version: ProtocolVersion) -> Option<Self> {
        match version {
            ProtocolVersion::TLSv1_2 => Some(Self::Tls12),
            ProtocolVersion::TLSv1_3 => Some(Self::Tls13),
            _ => None,
        }
    }

    fn code(self) -> u16 {
        match self {
            Self::Tls12 => libc::TLS_1_2_VERSION,
            Self::Tls13 => libc::TLS_1_3_VERSION,
        }
    }

    /// Stable name (logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "tls1.2",
            Self::Tls13 => "tls1.3",
        }
    }
}

/// Why secrets cannot become a crypto-info structure.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoInfoError {
    /// rustls extracted secrets of an AEAD this build does not map to a kernel cipher.
    #[error("no kernel cipher for the negotiated aead")]
    UnknownAead,
    /// A key or IV had the wrong length for its cipher.
    #[error("{what} is {got} bytes, {cipher} needs {want}")]
    BadLength {
        /// `key` or `iv`.
        what: &'static str,
        /// The cipher.
        cipher: &'static str,
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
}

/// Largest structure: ChaCha20-Poly1305 and AES-256-GCM, 4 + 12 + 32 + 0 + 8 = 4 + 8 + 32 + 4 + 8.
const MAX_BYTES: usize = 56;

/// One direction's `tls12_crypto_info_*`, ready for `setsockopt`; zeroed when dropped.
pub struct CryptoInfo {
    bytes: [u8; MAX_BYTES],
    len: usize,
    cipher: Cipher,
}

impl std::fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CryptoInfo")
            .field("cipher", &self.cipher)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

impl CryptoInfo {
    /// The structure for one direction of a session rustls negotiated at `version`, whose next
    /// record carries sequence number `seq`.
    pub fn from_secrets(
        version: Version,
        secrets: &ConnectionTrafficSecrets,
        seq: u64,
    ) -> Result<Self, CryptoInfoError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            #[allow(unreachable_patterns, reason = "the enum may grow")]
            _ => return Err(CryptoInfoError::UnknownAead),
        };
        Self::new(version, cipher, key.as_ref(), iv.as_ref(), seq)
    }

    /// The structure for `cipher` at `version` from a key, rustls's 12-byte IV and the next
    /// record's sequence number.
    pub fn new(
        version: Version,
        cipher: Cipher,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<Self, CryptoInfoError> {
        let bad = |what, got, want| CryptoInfoError::BadLength {
            what,
            cipher: cipher.as_str(),
            got,
            want,
        };
        if key.len() != cipher.key_bytes() {
            return Err(bad("key", key.len(), cipher.key_bytes()));
        }
        let iv: &[u8; 12] = iv.try_into().map_err(|_| bad("iv", iv.len(), 12))?;
        let seq = seq.to_be_bytes();
        let (salt, explicit): (&[u8], &[u8]) = match (cipher, version) {
            (Cipher::Chacha20Poly1305, _) => (&[], iv),
            (_, Version::Tls13) => (&iv[..4], &iv[4..]),
            (_, Version::Tls12) => (&iv[..4], &seq),
        };
        let mut info = Self {
            bytes: [0; MAX_BYTES],
            len: 0,
            cipher,
        };
        for part in [
            &version.code().to_ne_bytes()[..],
            &cipher.code().to_ne_bytes(),
            explicit,
            key,
            salt,
            &seq,
        ] {
            let end = info.len + part.len();
            if let Some(dst) = info.bytes.get_mut(info.len..end) {
                dst.copy_from_slice(part);
            }
            info.len = end.min(MAX_BYTES);
        }
        Ok(info)
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The bytes `setsockopt` takes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::*;

    const IV: [u8; 12] = [
        0xa0, 0xa1, 0xa2, 0xa3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb,
    ];
    const SEQ: u64 = 0x0102_0304_0506_0708;

    fn header(bytes: &[u8]) -> (u16, u16) {
        let word = |i: usize| u16::from_ne_bytes([bytes[i], bytes[i + 1]]);
        (word(0), word(2))
    }

    #[test]
    fn tls13_aes_gcm_128_splits_the_iv_into_salt_and_iv() {
        let key = [7u8; 16];
        let info = CryptoInfo::new(Version::Tls13, Cipher::Aes128Gcm, &key, &IV, SEQ).unwrap();
        let b = info.as_bytes();
        assert_eq!(b.len(), size_of::<libc::tls12_crypto_info_aes_gcm_128>());
        assert_eq!(
            header(b),
            (libc::TLS_1_3_VERSION, libc::TLS_CIPHER_AES_GCM_128)
        );
        assert_eq!(&b[4..12], &IV[4..], "iv: the last 8 bytes");
        assert_eq!(&b[12..28], &key, "key");
        assert_eq!(&b[28..32], &IV[..4], "salt: the first 4 bytes");
        assert_eq!(&b[32..40], &SEQ.to_be_bytes(), "rec_seq, big-endian");
    }

    #[test]
    fn tls12_aes_gcm_explicit_nonce_starts_at_the_sequence_number() {
        let key = [9u8; 32];
        let info = CryptoInfo::new(Version::Tls12, Cipher::Aes256Gcm, &key, &IV, SEQ).unwrap();
        let b = info.as_bytes();
        assert_eq!(b.len(), size_of::<libc::tls12_crypto_info_aes_gcm_256>());
        assert_eq!(
            header(b),
            (libc::TLS_1_2_VERSION, libc::TLS_CIPHER_AES_GCM_256)
        );
        assert_eq!(
            &b[4..12],
            &SEQ.to_be_bytes(),
            "explicit nonce = sequence number"
        );
        assert_eq!(&b[12..44], &key);
        assert_eq!(
            &b[44..48],
            &IV[..4],
            "salt: the implicit part of rustls's iv"
        );
        assert_eq!(&b[48..56], &SEQ.to_be_bytes());
    }

    #[test]
    fn chacha20_uses_the_whole_iv_and_no_salt_in_both_versions() {
        let key = [3u8; 32];
        for version in Version::ALL {
            let info = CryptoInfo::new(version, Cipher::Chacha20Poly1305, &key, &IV, SEQ).unwrap();
            let b = info.as_bytes();
            assert_eq!(
                b.len(),
                size_of::<libc::tls12_crypto_info_chacha20_poly1305>()
            );
            assert_eq!(header(b).1, libc::TLS_CIPHER_CHACHA20_POLY1305);
            assert_eq!(header(b).0, version.code());
            assert_eq!(&b[4..16], &IV, "iv: all 12 bytes");
            assert_eq!(&b[16..48], &key);
            assert_eq!(&b[48..56], &SEQ.to_be_bytes());
        }
    }

    #[test]
    fn secrets_from_rustls_map_to_their_cipher() {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([5u8; 32]),
            iv: Iv::new(IV),
        };
        let info = CryptoInfo::from_secrets(Version::Tls13, &secrets, 3).unwrap();
        assert_eq!(info.cipher(), Cipher::Aes256Gcm);
        assert_eq!(&info.as_bytes()[12..44], &[5u8; 32]);
        assert_eq!(&info.as_bytes()[44..48], &IV[..4]);
        assert_eq!(&info.as_bytes()[48..56], &3u64.to_be_bytes());
        let secrets = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([6u8; 32]),
            iv: Iv::new(IV),
        };
        let info = CryptoInfo::from_secrets(Version::Tls12, &secrets, 0).unwrap();
        assert_eq!(info.cipher(), Cipher::Chacha20Poly1305);
    }

    #[test]
    fn wrong_key_or_iv_lengths_are_refused() {
        assert!(matches!(
            CryptoInfo::new(Version::Tls13, Cipher::Aes128Gcm, &[0; 32], &IV, 0),
            Err(CryptoInfoError::BadLength { what: "key", .. })
        ));
        assert!(matches!(
            CryptoInfo::new(Version::Tls13, Cipher::Aes256Gcm, &[0; 32], &IV[..8], 0),
            Err(CryptoInfoError::BadLength { what: "iv", .. })
        ));
    }

    #[test]
    fn the_debug_form_never_shows_the_key() {
        let info = CryptoInfo::new(Version::Tls13, Cipher::Aes128Gcm, &[0x42; 16], &IV, 0).unwrap();
        let shown = format!("{info:?}");
        assert!(!shown.contains("66"), "{shown}");
    }
}
