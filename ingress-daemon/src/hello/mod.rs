//! ClientHello reader: which name and protocols a TLS client asks for, without consuming a byte.
//!
//! [`parse_client_hello`] is the pure parser over the bytes peeked so far (every prefix of a
//! valid hello is [`ParseError::Incomplete`]); [`read_client_hello`] drives it over a live
//! socket with `MSG_PEEK`, a buffer that grows up to the cap, and a deadline. The bytes stay in
//! the socket's receive queue: the splice engine hands the socket to the kernel afterwards and
//! the backend must see the hello untouched.

mod parse;
mod reader;

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;

/// Default time a client has to deliver its whole ClientHello (and any Postgres preamble).
pub const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub use parse::{ClientHelloInfo, DEFAULT_MAX_HELLO_BYTES, ParseError, parse_client_hello};
pub use reader::{HelloError, read_client_hello};
