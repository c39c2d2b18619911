//! A TCP stream that reads ahead for rustls.
//!
//! rustls asks its transport for at most 4 KiB per read (`read_tls`), so a full 16 KiB record
//! costs four or five `recv` calls, and a terminated upload spends much of its time entering
//! and leaving the kernel. [`ReadAhead`] takes whatever the socket holds, up to
//! [`READ_AHEAD_BYTES`], in one call and serves rustls's small reads from it. The buffer exists
//! only while the peer is sending: it goes back when a read finds the socket empty, so an idle
//! connection holds none (each thread keeps a few such buffers for the next burst).

use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Most bytes one read from the socket takes.
pub(super) const READ_AHEAD_BYTES: usize = 64 << 10;

/// Buffers a thread keeps for the next connection whose peer starts sending.
const KEEP_SPARE: usize = 4;

thread_local! {
    /// Buffers freed by connections whose peer paused: a busy upload pauses between bursts,
    /// and taking one from here costs neither an allocation nor zeroing 64 KiB.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of [`READ_AHEAD_BYTES`].
fn take_spare() -> Vec<u8> {
    SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0; READ_AHEAD_BYTES])
}

/// Hands `buf` back (it may go to another thread's spares than it came from).
fn give_back(buf: Vec<u8>) {
    if buf.len() == READ_AHEAD_BYTES {
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < KEEP_SPARE {
                spare.push(buf);
            }
        });
    }
}

/// A [`TcpStream`] whose reads go through a buffer of its own while its peer is sending.
pub(super) struct ReadAhead {
    inner: TcpStream,
    /// Empty when nothing is buffered; otherwise `READ_AHEAD_BYTES` long with
    /// `buf[at..end]` not read yet.
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl ReadAhead {
    pub(super) fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            at: 0,
            end: 0,
        }
    }

    /// Bytes read from the socket and not yet passed on.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.end - self.at
    }
}

impl AsFd for ReadAhead {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at == this.end {
            if out.remaining() >= READ_AHEAD_BYTES {
                // A read this large gains nothing from a copy.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = take_spare();
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    give_back(std::mem::take(&mut this.buf));
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // The peer paused: give the memory back until it sends again.
                    give_back(std::mem::take(&mut this.buf));
                    return Poll::Pending;
                }
            }
            let n = fill.filled().len();
            if n == 0 {
                give_back(std::mem::take(&mut this.buf));
                // End of stream: `out` stays unfilled.
                return Poll::Ready(Ok(()));
            }
            (this.at, this.end) = (0, n);
        }
        let n = out.remaining().min(this.end - this.at);
        out.put_slice(this.buf.get(this.at..this.at + n).unwrap_or_default());
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::{READ_AHEAD_BYTES, ReadAhead};

    #[tokio::test]
    async fn small_reads_see_the_stream_whole_and_a_quiet_stream_holds_no_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let mut ours = ReadAhead::new(ours);
        let sent: Vec<u8> = (0..(3 * READ_AHEAD_BYTES as u32 + 1234))
            .map(|i| (i % 253) as u8)
            .collect();
        peer.write_all(&sent).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut most_buffered = 0;
        while got.len() < sent.len() {
            let n = ours.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            most_buffered = most_buffered.max(ours.buffered());
        }
        assert!(got == sent, "the stream arrived changed");
        assert!(
            most_buffered > chunk.len(),
            "reads did not go ahead of the caller"
        );
        // Nothing more to read: the next read waits, and the buffer goes.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), ours.read(&mut chunk)).await;
        assert!(waited.is_err());
        assert_eq!(ours.buf.capacity(), 0);
        // Writes pass through; end of stream reads as 0.
        ours.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        peer.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        peer.shutdown().await.unwrap();
        assert_eq!(ours.read(&mut chunk).await.unwrap(), 0);
    }
}
