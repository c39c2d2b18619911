//! `ingressd upgrade`: start the installed binary as a new daemon that takes the running one's
//! listeners, API and spliced flows over, and return once it serves.
//!
//! Design: a service manager's reload command must return, so it cannot be the new daemon
//! itself. `ingressd [FLAGS] upgrade` starts `ingressd [FLAGS] --takeover` (this executable,
//! the same flags and environment, its own process group so a terminal's Ctrl-C on the
//! command does not reach it), gives it a private notification socket in the data directory
//! (`INGRESSD_READY_SOCKET`, see [`crate::notify`]) and waits for its `READY=1`, which the new
//! daemon sends once it owns the listeners and before it tells the old daemon to exit. The
//! new daemon also notifies `NOTIFY_SOCKET` when there is one, with its `MAINPID`, so a
//! service manager follows it (`NotifyAccess=all` in the unit).
//!
//! If the new daemon exits first, or `timeout` passes (then it is killed), the command fails:
//! the old daemon resumes everything when its successor goes away before the end of the
//! hand-off, so a failed upgrade leaves the running daemon serving.

use std::{
    ffi::OsString,
    io,
    os::unix::{net::UnixDatagram, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::notify::READY_SOCKET_ENV;

/// The flag that makes a daemon take over from the running one.
pub const TAKEOVER_FLAG: &str = "--takeover";

/// How long `ingressd upgrade` waits for the new daemon by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `ingressd upgrade`'s own options.
#[derive(Debug, Clone, clap::Args)]
pub struct UpgradeArgs {
    /// Seconds to wait for the new daemon to take over before killing it.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT.as_secs())]
    pub timeout_secs: u64,
}

/// Why an upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// No daemon runs on the data directory (its control socket is missing).
    #[error("no running ingressd on {data_dir}: {socket} does not exist")]
    NotRunning {
        /// The configured data directory.
        data_dir: PathBuf,
        /// The control socket looked for.
        socket: PathBuf,
    },
    /// The private notification socket could not be made.
    #[error("creating {path}: {source}")]
    ReadySocket {
        /// Its path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The new daemon could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The executable.
        program: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The new daemon exited before it took over (the old one keeps serving).
    #[error(
        "the new daemon exited before taking over ({status}); the running daemon keeps serving"
    )]
    Exited {
        /// How it exited.
        status: ExitStatus,
    },
    /// The new daemon did not take over in time; it was killed (the old one keeps serving).
    #[error(
        "the new daemon did not take over within {timeout:?} and was killed; the running daemon keeps serving"
    )]
    Timeout {
        /// The limit.
        timeout: Duration,
    },
    /// Waiting on the new daemon failed.
    #[error("waiting for the new daemon: {0}")]
    Wait(io::Error),
}

/// The daemon's command line for the new process: `args` (without the program name) up to the
/// `upgrade` subcommand, plus [`TAKEOVER_FLAG`]. Daemon flags precede the subcommand.
pub fn takeover_args(args: &[OsString]) -> Vec<OsString> {
    let mut out: Vec<OsString> = args
        .iter()
        .take_while(|a| a.as_os_str() != "upgrade")
        .filter(|a| a.as_os_str() != TAKEOVER_FLAG)
        .cloned()
        .collect();
    out.push(TAKEOVER_FLAG.into());
    out
}

/// Starts `program` with `args` (see [`takeover_args`]) as the daemon taking over from the one
/// running on `data_dir`, and waits until it serves; returns its PID.
pub fn run(
    program: &Path,
    args: &[OsString],
    data_dir: &Path,
    timeout: Duration,
) -> Result<u32, UpgradeError> {
    let socket = data_dir.join(crate::takeover::SOCKET_FILE);
    if !socket.exists() {
        return Err(UpgradeError::NotRunning {
            data_dir: data_dir.to_owned(),
            socket,
        });
    }
    let ready_path = data_dir.join(format!("upgrade-{}.sock", std::process::id()));
    let ready = ReadySocket::bind(&ready_path)?;
    let mut child = Command::new(program)
        .args(args)
        .env(READY_SOCKET_ENV, &ready_path)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let pid = child.id();
    match wait_ready(&ready.socket, &mut child, timeout) {
        Ok(()) => Ok(pid),
        Err(e) => {
            if matches!(e, UpgradeError::Timeout { .. }) {
                let _ = child.kill();
                let _ = child.wait();
            }
            Err(e)
        }
    }
}

/// Waits for `READY=1` on `socket` while `child` runs.
fn wait_ready(
    socket: &UnixDatagram,
    child: &mut Child,
    timeout: Duration,
) -> Result<(), UpgradeError> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) if is_ready(&buf[..n]) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(UpgradeError::Wait(e)),
        }
        if let Some(status) = child.try_wait().map_err(UpgradeError::Wait)? {
            return Err(UpgradeError::Exited { status });
        }
        if started.elapsed() >= timeout {
            return Err(UpgradeError::Timeout { timeout });
        }
    }
}

/// Whether a notification says `READY=1`.
fn is_ready(message: &[u8]) -> bool {
    message
        .split(|&b| b == b'\n')
        .any(|line| line == b"READY=1")
}

/// The private notification socket; its file is removed on drop.
struct ReadySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl ReadySocket {
    fn bind(path: &Path) -> Result<Self, UpgradeError> {
        let err = |source| UpgradeError::ReadySocket {
            path: path.to_owned(),
            source,
        };
        // A stale file from an upgrade command that died is in the way.
        let _ = std::fs::remove_file(path);
        let socket = UnixDatagram::bind(path).map_err(err)?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(err)?;
        Ok(Self {
            socket,
            path: path.to_owned(),
        })
    }
}

impl Drop for ReadySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_new_daemon_gets_the_daemon_flags_and_takeover() {
        assert_eq!(
            takeover_args(&os(&[
                "--data-dir",
                "/d",
                "--offload",
                "required",
                "upgrade",
                "--timeout-secs",
                "5"
            ])),
            os(&["--data-dir", "/d", "--offload", "required", "--takeover"])
        );
        assert_eq!(takeover_args(&os(&["upgrade"])), os(&["--takeover"]));
    }

    #[test]
    fn only_a_ready_line_is_readiness() {
        assert!(is_ready(b"READY=1\nMAINPID=7\nSTATUS=serving"));
        assert!(is_ready(b"STATUS=x\nREADY=1"));
        assert!(!is_ready(b"STOPPING=1"));
        assert!(!is_ready(b"NOTREADY=1"));
    }

    #[test]
    fn a_data_dir_without_a_daemon_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(
            Path::new("/bin/false"),
            &[],
            dir.path(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, UpgradeError::NotRunning { .. }), "{err}");
    }

    #[test]
    fn a_new_daemon_that_exits_fails_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::takeover::SOCKET_FILE), b"").unwrap();
        let err = run(
            Path::new("/bin/false"),
            &[],
            dir.path(),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(matches!(err, UpgradeError::Exited { .. }), "{err}");
        // The private socket is gone again.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn a_new_daemon_that_never_gets_ready_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::takeover::SOCKET_FILE), b"").unwrap();
        let started = Instant::now();
        let err = run(
            Path::new("/bin/sleep"),
            &os(&["30"]),
            dir.path(),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sleeper was killed"
        );
    }
}
