//! The texts of a record (SNI, ALPN, rule, instance), carried without a heap allocation.
//!
//! A record is built on a data-path thread and dropped on the writer thread. A `String` per
//! field would cost an allocation there and a free here, and glibc's per-thread caches do not
//! help a chunk freed by another thread, so each pair cost ~300 instructions (callgrind). Names
//! from the route table are shared (`Arc<str>`, one atomic add); the others are copied into
//! the record, and only values longer than [`INLINE_BYTES`] (server names) or
//! [`SHORT_INLINE_BYTES`] (ALPN, instance names rendered from a pattern) allocate.

use std::{fmt, sync::Arc};

/// Bytes a [`LogText`] holds in place by default (server names).
pub const INLINE_BYTES: usize = 46;

/// Bytes held in place for short texts (ALPN protocols, instance names): a record stays within
/// 256 bytes, the size up to which a `memcpy` needs no loop.
pub const SHORT_INLINE_BYTES: usize = 22;

/// One text of an access log record; bytes that are not UTF-8 (an ALPN protocol may be
/// anything) are shown lossily.
#[derive(Clone)]
pub struct LogText<const N: usize = INLINE_BYTES>(Repr<N>);

#[derive(Clone)]
enum Repr<const N: usize> {
    Shared(Arc<str>),
    Inline { len: u8, bytes: [u8; N] },
    Heap(Box<[u8]>),
}

impl<const N: usize> LogText<N> {
    /// A text shared with its owner (a route table name): no copy.
    pub fn shared(name: &Arc<str>) -> Self {
        Self(Repr::Shared(name.clone()))
    }

    /// A copy of `bytes`, in place when it fits.
    pub fn copy(bytes: &[u8]) -> Self {
        let mut inline = [0u8; N];
        match (inline.get_mut(..bytes.len()), u8::try_from(bytes.len())) {
            (Some(dst), Ok(len)) => {
                dst.copy_from_slice(bytes);
                Self(Repr::Inline { len, bytes: inline })
            }
            _ => Self(Repr::Heap(bytes.into())),
        }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Shared(s) => s.as_bytes(),
            Repr::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Repr::Heap(b) => b,
        }
    }
}

impl<const N: usize> From<Arc<str>> for LogText<N> {
    fn from(name: Arc<str>) -> Self {
        Self(Repr::Shared(name))
    }
}

impl<const N: usize> From<&str> for LogText<N> {
    fn from(s: &str) -> Self {
        Self::copy(s.as_bytes())
    }
}

impl<const N: usize> PartialEq for LogText<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<const N: usize> Eq for LogText<N> {}

impl<const N: usize> fmt::Debug for LogText<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(self.as_bytes()), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_texts_keep_their_bytes() {
        for len in [
            0,
            1,
            INLINE_BYTES - 1,
            INLINE_BYTES,
            INLINE_BYTES + 1,
            255,
            300,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let text = LogText::<INLINE_BYTES>::copy(&bytes);
            assert_eq!(text.as_bytes(), bytes.as_slice(), "{len}");
            assert_eq!(
                matches!(text.0, Repr::Inline { .. }),
                len <= INLINE_BYTES,
                "{len}"
            );
        }
        let name: Arc<str> = Arc::from("{id}.pg.example.com");
        let shared = LogText::<INLINE_BYTES>::shared(&name);
        assert_eq!(shared, LogText::from("{id}.pg.example.com"));
        assert_eq!(Arc::strong_count(&name), 2);
        assert_eq!(format!("{shared:?}"), "\"{id}.pg.example.com\"");
    }
}
