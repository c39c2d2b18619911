//! Encoding of control messages: `u32 length (LE) | JSON | raw tail`, one seqpacket message
//! each, descriptors attached.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{Message, TakeoverError};
use crate::sys;

/// Largest message either side sends (a `Flows` batch is cut below it); below the default
/// socket buffer, so no privilege is needed to raise it.
pub(super) const MAX_MESSAGE_BYTES: usize = 192 << 10;

/// Sends `message` with `tail` bytes and descriptors.
pub(super) fn send(
    sock: BorrowedFd<'_>,
    message: &Message,
    tail: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), TakeoverError> {
    let json = serde_json::to_vec(message).map_err(|e| TakeoverError::Protocol(e.to_string()))?;
    let len = u32::try_from(json.len())
        .map_err(|_| TakeoverError::Protocol("message too large".to_owned()))?;
    let mut buf = Vec::with_capacity(4 + json.len() + tail.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&json);
    buf.extend_from_slice(tail);
    if buf.len() > MAX_MESSAGE_BYTES {
        return Err(TakeoverError::Protocol(format!(
            "message of {} bytes exceeds {MAX_MESSAGE_BYTES}",
            buf.len()
        )));
    }
    sys::send_with_fds(sock, &buf, fds)?;
    Ok(())
}

/// Tells the peer the hand-off is off, and why.
pub(super) fn send_refuse(sock: BorrowedFd<'_>, reason: &str) -> Result<(), TakeoverError> {
    send(
        sock,
        &Message::Refuse {
            reason: reason.to_owned(),
        },
        &[],
        &[],
    )
}

/// A received message, its tail and its descriptors.
pub(super) struct Received {
    pub(super) message: Message,
    pub(super) tail: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

/// Receives one message; `Ok(None)` when the peer closed the connection.
pub(super) fn recv(sock: &impl AsFd) -> Result<Option<Received>, TakeoverError> {
    let Some((buf, fds)) = sys::recv_with_fds(sock.as_fd(), MAX_MESSAGE_BYTES)? else {
        return Ok(None);
    };
    let bad = |what: &str| TakeoverError::Protocol(what.to_owned());
    let len = buf
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad("short message"))? as usize;
    let json = buf
        .get(4..4 + len)
        .ok_or_else(|| bad("message shorter than its length"))?;
    let message: Message =
        serde_json::from_slice(json).map_err(|e| TakeoverError::Protocol(e.to_string()))?;
    let tail = buf.get(4 + len..).unwrap_or_default().to_vec();
    Ok(Some(Received { message, tail, fds }))
}
