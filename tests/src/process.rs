//! Child processes the harness starts (daemons, servers, clients): stopped by PID when their
//! guard drops, with their output kept in a log file; and polling with a deadline.
use std::{
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::error::{Error, IoContext as _, Result};

/// How long a process gets to exit after its stop signal before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Polls `probe` until it returns `Some`, with a short growing pause between attempts, and fails
/// with [`Error::Timeout`] after `timeout`. An error from `probe` ends the wait at once.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited,
            });
        }
        thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A running child process, stopped when the guard drops: its stop signal (SIGTERM unless set
/// otherwise), then SIGKILL after [`STOP_GRACE`]. Signals go to its PID only while the child is
/// unreaped, so the PID cannot have been reused.
pub struct ChildGuard {
    name: String,
    child: Child,
    stop_signal: Signal,
    log: Option<PathBuf>,
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and, when `log` is given, stdout and stderr appended to that
    /// file (created if needed).
    pub fn spawn(name: impl Into<String>, cmd: &mut Command, log: Option<&Path>) -> Result<Self> {
        let name = name.into();
        cmd.stdin(Stdio::null());
        if let Some(log) = log {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ctx(|| format!("opening {}", log.display()))?;
            let err = file
                .try_clone()
                .ctx(|| format!("duplicating {}", log.display()))?;
            cmd.stdout(file).stderr(err);
        }
        let child = cmd
            .spawn()
            .ctx(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name,
            child,
            stop_signal: Signal::SIGTERM,
            log: log.map(Path::to_path_buf),
            exit: None,
        })
    }

    /// Wraps a child spawned elsewhere.
    pub fn from_child(name: impl Into<String>, child: Child, log: Option<PathBuf>) -> Self {
        Self {
            name: name.into(),
            child,
            stop_signal: Signal::SIGTERM,
            log,
            exit: None,
        }
    }

    /// Uses `signal` instead of SIGTERM to ask the process to stop (postgres: SIGINT).
    #[must_use]
    pub fn with_stop_signal(mut self, signal: Signal) -> Self {
        self.stop_signal = signal;
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file holding the process's stdout and stderr, if any.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last `lines` lines of the log (empty without a log).
    pub fn log_tail(&self, lines: usize) -> String {
        self.log
            .as_deref()
            .map(|p| tail(p, lines))
            .unwrap_or_default()
    }

    /// Sends `signal` to the process unless it has already exited.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.child.id()).map_err(|_| Error::Process {
            what: self.name.clone(),
            detail: format!("pid {} out of range", self.child.id()),
        })?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal).map_err(|errno| Error::Io {
            context: format!("sending {signal} to {} (pid {pid})", self.name),
            source: errno.into(),
        })
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .ctx(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.exit)
    }

    /// Fails with the exit status and the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            None => Ok(()),
            Some(status) => Err(Error::Process {
                what: format!("{} exited early", self.name),
                detail: format!("{status}\n{}", self.log_tail(40)),
            }),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let name = self.name.clone();
        match wait_until(&format!("{name} to exit"), timeout, || self.try_wait()) {
            Ok(status) => Ok(Some(status)),
            Err(Error::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends the stop signal, waits up to `grace`, then SIGKILLs; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(self.stop_signal)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        eprintln!(
            "{} did not stop within {grace:?} of {}: killing it",
            self.name, self.stop_signal
        );
        self.kill9()
    }

    /// SIGKILLs the process (a crash, as far as it is concerned) and reaps it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL)?;
        let status = self
            .child
            .wait()
            .ctx(|| format!("waiting for {}", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop(STOP_GRACE) {
            eprintln!("stopping {}: {e:?}", self.name);
        }
    }
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion with a deadline, capturing stdout and stderr; fails unless it exits 0.
/// Returns stdout.
pub fn run_checked(what: &str, cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = run_capture(what, cmd, timeout)?;
    if !out.status.success() {
        return Err(Error::Process {
            what: what.to_owned(),
            detail: format!(
                "{}\nstdout: {}\nstderr: {}",
                out.status, out.stdout, out.stderr
            ),
        });
    }
    Ok(out.stdout)
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// The exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Runs `cmd` to completion with a deadline (killing it when the deadline passes), capturing
/// stdout and stderr through temporary files so a chatty child never blocks on a full pipe.
pub fn run_capture(what: &str, cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = tempfile::tempfile().ctx(|| "creating a capture file".to_owned())?;
    let err = tempfile::tempfile().ctx(|| "creating a capture file".to_owned())?;
    cmd.stdin(Stdio::null())
        .stdout(
            out.try_clone()
                .ctx(|| "duplicating a capture file".to_owned())?,
        )
        .stderr(
            err.try_clone()
                .ctx(|| "duplicating a capture file".to_owned())?,
        );
    let child = cmd
        .spawn()
        .ctx(|| format!("starting {what} ({:?})", cmd.get_program()))?;
    let mut guard = ChildGuard::from_child(what, child, None).with_stop_signal(Signal::SIGKILL);
    let Some(status) = guard.wait_timeout(timeout)? else {
        guard.kill9()?;
        return Err(Error::Timeout {
            what: format!("{what} to finish"),
            waited: timeout,
        });
    };
    Ok(Output {
        status,
        stdout: read_all(out)?,
        stderr: read_all(err)?,
    })
}

fn read_all(mut file: File) -> Result<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0))
        .ctx(|| "rewinding a capture file".to_owned())?;
    file.read_to_end(&mut buf)
        .ctx(|| "reading a capture file".to_owned())?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
