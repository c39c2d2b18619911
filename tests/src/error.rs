//! The harness's error type.
use std::{fmt, io, time::Duration};

use crate::skip::Skip;

/// Why a harness operation failed.
#[derive(thiserror::Error)]
pub enum Error {
    /// A prerequisite (a binary, root) is missing: the test should skip, or fail under `CI=true`.
    #[error(transparent)]
    Skip(#[from] Skip),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Something did not happen before its deadline.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        waited: Duration,
    },
    /// A child process failed, or exited when it should have kept running.
    #[error("{what}: {detail}")]
    Process {
        /// The process and what it was doing.
        what: String,
        /// Exit status, log tail or other evidence.
        detail: String,
    },
    /// An HTTP request to the daemon's API failed at the transport level.
    #[error("{method} {url}: {source}")]
    Http {
        /// The request method.
        method: String,
        /// The request URL.
        url: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// Generating a certificate failed.
    #[error("generating a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A TLS operation failed.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Bytes that arrived differ from the bytes that were sent.
    #[error("data mismatch: {0}")]
    Mismatch(String),
}

// Test failures print errors with `{:?}`: show the message and its causes, not the structure.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to an [`io::Error`].
pub trait IoContext<T> {
    /// Wraps the error as [`Error::Io`] with `context`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
