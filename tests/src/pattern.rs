//! Deterministic test data and its verification: a seeded byte stream both ends can generate,
//! a verifier that finds the first byte that differs (loss, duplication and reordering all show
//! up as one), SHA-256 digests of both sides, and a rate limiter for slow readers.
use std::{
    fmt, thread,
    time::{Duration, Instant},
};

use rand_chacha::{
    ChaCha8Rng,
    rand_core::{RngCore as _, SeedableRng as _},
};
use sha2::{Digest as _, Sha256};

/// Bytes generated per ChaCha refill; a multiple of 4, because the generator hands out whole
/// 32-bit words and drops the rest of a word a shorter request leaves over.
const BLOCK_BYTES: usize = 64 * 1024;

/// An endless pseudo-random byte stream determined by its seed (ChaCha8: fast, never periodic
/// within a test's reach, so a duplicated or reordered block never matches by accident). The
/// stream is the same however it is cut into [`fill`](Self::fill) calls.
pub struct Pattern {
    rng: ChaCha8Rng,
    block: Vec<u8>,
    pos: usize,
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            block: vec![0; BLOCK_BYTES],
            pos: BLOCK_BYTES,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, mut buf: &mut [u8]) {
        while !buf.is_empty() {
            if self.pos == self.block.len() {
                self.rng.fill_bytes(&mut self.block);
                self.pos = 0;
            }
            let n = buf.len().min(self.block.len() - self.pos);
            let (head, rest) = buf.split_at_mut(n);
            head.copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            buf = rest;
        }
    }
}

/// A SHA-256 digest, printed as hex.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Generates the stream for a seed chunk by chunk, hashing what it hands out (the sender side).
pub struct Source {
    pattern: Pattern,
    remaining: u64,
    sent: u64,
    sha: Sha256,
}

impl Source {
    /// `total` bytes of the stream for `seed`.
    pub fn new(seed: u64, total: u64) -> Self {
        Self {
            pattern: Pattern::new(seed),
            remaining: total,
            sent: 0,
            sha: Sha256::new(),
        }
    }

    /// The next chunk (at most `buf.len()` bytes) in `buf`, or an empty slice at the end.
    pub fn next_chunk<'b>(&mut self, buf: &'b mut [u8]) -> &'b [u8] {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let chunk = &mut buf[..n];
        self.pattern.fill(chunk);
        self.sha.update(&*chunk);
        self.remaining -= n as u64;
        self.sent += n as u64;
        chunk
    }

    /// Bytes handed out so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The digest of everything handed out.
    pub fn digest(self) -> Digest {
        Digest(self.sha.finalize().into())
    }
}

/// Checks received bytes against the stream for a seed as they arrive (the receiver side).
pub struct Verifier {
    pattern: Pattern,
    expected_total: u64,
    received: u64,
    first_mismatch: Option<u64>,
    sha: Sha256,
    scratch: Vec<u8>,
}

impl Verifier {
    /// Expects exactly `total` bytes of the stream for `seed`.
    pub fn new(seed: u64, total: u64) -> Self {
        Self {
            pattern: Pattern::new(seed),
            expected_total: total,
            received: 0,
            first_mismatch: None,
            sha: Sha256::new(),
            scratch: Vec::new(),
        }
    }

    /// Feeds the next received bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        if self.first_mismatch.is_none() {
            let expected_left = self.expected_total.saturating_sub(self.received);
            let comparable = usize::try_from(expected_left)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.scratch.resize(comparable, 0);
            self.pattern.fill(&mut self.scratch);
            if self.scratch[..] != data[..comparable] {
                let at = self
                    .scratch
                    .iter()
                    .zip(data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.first_mismatch = Some(self.received + at as u64);
            } else if comparable < data.len() {
                // More than expected: the first extra byte is the mismatch.
                self.first_mismatch = Some(self.expected_total);
            }
        }
        self.received += data.len() as u64;
    }

    /// The verdict on everything fed so far.
    pub fn finish(self) -> Verified {
        Verified {
            expected: self.expected_total,
            received: self.received,
            first_mismatch: self.first_mismatch,
            sha256: Digest(self.sha.finalize().into()),
        }
    }
}

/// What a receiver got, compared with what it expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Bytes expected.
    pub expected: u64,
    /// Bytes received.
    pub received: u64,
    /// Offset of the first byte that differs from the expected stream (a byte past the expected
    /// end counts), if any.
    pub first_mismatch: Option<u64>,
    /// SHA-256 of the bytes received.
    pub sha256: Digest,
}

impl Verified {
    /// Whether exactly the expected bytes arrived, in order.
    pub fn is_exact(&self) -> bool {
        self.first_mismatch.is_none() && self.received == self.expected
    }

    /// Describes how the bytes differ, or `None` when they are exact.
    pub fn problem(&self) -> Option<String> {
        match self.first_mismatch {
            Some(at) => Some(format!(
                "first wrong byte at offset {at} (received {} of {} bytes)",
                self.received, self.expected
            )),
            None if self.received < self.expected => Some(format!(
                "truncated: received {} of {} bytes",
                self.received, self.expected
            )),
            None => None,
        }
    }
}

/// Paces a reader to about `bytes_per_sec` (a slow peer). Sleeping is the point here: this
/// models a slow consumer, it does not wait for anything to start.
pub struct RateLimit {
    bytes_per_sec: u64,
    started: Instant,
    consumed: u64,
}

impl RateLimit {
    /// A limiter for `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            started: Instant::now(),
            consumed: 0,
        }
    }

    /// How many bytes to read next: small enough that the rate stays smooth (about 50 reads a
    /// second), waiting first until the schedule allows them.
    pub fn next_read(&mut self, max: usize) -> usize {
        let chunk = usize::try_from(self.bytes_per_sec / 50)
            .unwrap_or(usize::MAX)
            .clamp(1024, 64 * 1024)
            .min(max);
        let due = Duration::from_secs_f64(self.consumed as f64 / self.bytes_per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            thread::sleep(due - elapsed);
        }
        chunk
    }

    /// Records that `n` bytes were read.
    pub fn consumed(&mut self, n: usize) {
        self.consumed += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(seed: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        Pattern::new(seed).fill(&mut buf);
        buf
    }

    fn verify(seed: u64, expected: u64, data: &[u8], chunk: usize) -> Verified {
        let mut v = Verifier::new(seed, expected);
        data.chunks(chunk).for_each(|c| v.update(c));
        v.finish()
    }

    #[test]
    fn same_seed_same_stream_whatever_the_chunking() {
        let whole = stream(7, 100_000);
        let mut pieces = Vec::new();
        let mut source = Source::new(7, 100_000);
        let mut buf = vec![0; 777];
        loop {
            let chunk = source.next_chunk(&mut buf);
            if chunk.is_empty() {
                break;
            }
            pieces.extend_from_slice(chunk);
        }
        assert!(whole == pieces, "chunked generation differs");
        let sent = source.digest();
        let v = verify(7, 100_000, &whole, 4096);
        assert!(v.is_exact(), "{:?}", v.problem());
        assert_eq!(v.sha256, sent);
    }

    #[test]
    fn loss_duplication_and_reordering_are_located() {
        let data = stream(1, 10_000);
        let mut lost = data.clone();
        lost.drain(5_000..5_100);
        assert_eq!(verify(1, 10_000, &lost, 1000).first_mismatch, Some(5_000));

        let mut duplicated = data[..6_000].to_vec();
        duplicated.extend_from_slice(&data[5_000..]);
        assert_eq!(
            verify(1, 10_000, &duplicated, 333).first_mismatch,
            Some(6_000)
        );

        let mut reordered = data.clone();
        reordered[2_000..2_100].reverse();
        assert_eq!(
            verify(1, 10_000, &reordered, 10_000).first_mismatch,
            Some(2_000)
        );

        let truncated = verify(1, 10_000, &data[..9_000], 1000);
        assert_eq!(truncated.first_mismatch, None);
        assert!(!truncated.is_exact());
        assert!(
            truncated
                .problem()
                .unwrap_or_default()
                .contains("truncated")
        );
    }

    #[test]
    fn different_seeds_differ() {
        assert!(stream(1, 64) != stream(2, 64));
    }
}
