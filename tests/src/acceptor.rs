//! The accept loop shared by the harness's in-process servers: one thread accepting, one thread
//! per connection, stopped by shutting the listening socket down (which wakes `accept`, also for
//! a listener inside a network namespace that cannot be reached to wake it by connecting).
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use nix::sys::socket::{Shutdown, shutdown};

use crate::error::{IoContext as _, Result};

/// Stack size of connection threads: small, so a thousand concurrent flows stay cheap.
pub(crate) const CONN_STACK_BYTES: usize = 256 * 1024;

/// A running accept loop; stops and joins when dropped.
pub(crate) struct Acceptor {
    addr: SocketAddr,
    listener: TcpListener,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Accepts on `listener` in a new thread, running `handler` in a new thread per connection.
    pub(crate) fn spawn(
        name: &str,
        listener: TcpListener,
        handler: impl Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .ctx(|| format!("{name}: local address"))?;
        let accepting = listener
            .try_clone()
            .ctx(|| format!("{name}: cloning the listener"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let handler = Arc::new(handler);
        let conn_name = format!("{name}-conn");
        let thread = thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || {
                loop {
                    match accepting.accept() {
                        Ok((stream, peer)) => {
                            let handler = Arc::clone(&handler);
                            let spawned = thread::Builder::new()
                                .name(conn_name.clone())
                                .stack_size(CONN_STACK_BYTES)
                                .spawn(move || handler(stream, peer));
                            if let Err(e) = spawned {
                                eprintln!("{conn_name}: cannot spawn a connection thread: {e}");
                            }
                        }
                        Err(_) if stop.load(Ordering::Acquire) => break,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            eprintln!("{conn_name}: accept failed: {e}");
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .ctx(|| format!("{name}: spawning the accept thread"))?;
        Ok(Self {
            addr,
            listener,
            stopping,
            thread: Some(thread),
        })
    }

    /// The address the listener is bound to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Linux wakes a blocked accept() with EINVAL once the listening socket is shut down.
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
