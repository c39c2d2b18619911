//! TCP edges tests provoke on purpose: an abortive close (RST).
use std::net::TcpStream;

use nix::sys::socket::{setsockopt, sockopt::Linger};

use crate::error::{Error, Result};

/// Closes `stream` with a reset instead of a FIN (`SO_LINGER` {on, 0 s}, then close), as a
/// crashing peer or an aborting application would.
pub fn abort(stream: TcpStream) -> Result<()> {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&stream, Linger, &linger).map_err(|errno| Error::Io {
        context: "setting SO_LINGER {1, 0}".to_owned(),
        source: errno.into(),
    })?;
    drop(stream);
    Ok(())
}
