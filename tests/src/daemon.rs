//! The real `ingressd` binary as a child process.
//!
//! # Contract with ingressd
//! - The harness sets `INGRESSD_DATA_DIR=<fresh temporary dir>/data` and
//!   `INGRESSD_API_LISTEN=127.0.0.1:0`, and removes every other inherited `INGRESSD_*` variable
//!   (and `RESERVED_PORTS`) unless the test sets it.
//! - Once its API listener is bound and serving, the daemon writes the bound address
//!   (`127.0.0.1:41234`, one line) to `<data_dir>/api.addr`, atomically (temporary file, then
//!   rename), replacing any earlier file; it also logs `ingressd api listening on <addr>` to
//!   stderr. The harness deletes `api.addr` before each start, polls for it, then polls
//!   `GET /healthz` until it answers 200.
//! - SIGTERM stops the daemon gracefully; the harness waits [`STOP_GRACE`] before SIGKILL.
//! - stdout and stderr go to `<dir>/ingressd.log` (all starts appended), printed in part when the
//!   owning test fails; the directory is then kept.
//!
//! Which binary runs: see [`crate::binary`].
use std::{
    env,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use crate::{
    api::ApiClient,
    error::{Error, IoContext as _, Result},
    process::{ChildGuard, STOP_GRACE, tail, wait_until},
    workdir::WorkDir,
};

/// The name of the file the daemon writes its bound API address to, in its data directory.
pub const API_ADDR_FILE: &str = "api.addr";

/// How the daemon splices passthrough flows (`INGRESSD_OFFLOAD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// The kernel path when eBPF loads, the userspace relay otherwise.
    Auto,
    /// Always the userspace relay.
    Off,
    /// The kernel path or refuse to start (CI uses it so a broken eBPF load cannot pass).
    Required,
}

impl Offload {
    /// The value of `INGRESSD_OFFLOAD`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Off => "off",
            Self::Required => "required",
        }
    }
}

/// How to start a [`Daemon`].
#[derive(Clone)]
pub struct DaemonBuilder {
    binary: Option<PathBuf>,
    envs: Vec<(String, String)>,
    args: Vec<String>,
    token: Option<String>,
    start_timeout: Duration,
}

impl Default for DaemonBuilder {
    fn default() -> Self {
        Self {
            binary: None,
            envs: Vec::new(),
            args: Vec::new(),
            token: None,
            start_timeout: Duration::from_secs(30),
        }
    }
}

impl DaemonBuilder {
    /// Runs `path` instead of the located `ingressd` (for testing the harness itself).
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Sets an environment variable for the daemon.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Adds a command-line argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets `INGRESSD_OFFLOAD`.
    #[must_use]
    pub fn offload(self, mode: Offload) -> Self {
        self.env("INGRESSD_OFFLOAD", mode.as_str())
    }

    /// Sets `INGRESSD_API_TOKEN`; [`Daemon::api`] then sends it.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = Some(token.clone());
        self.env("INGRESSD_API_TOKEN", token)
    }

    /// How long a start may take until `/healthz` answers (default 30 s).
    #[must_use]
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Starts the daemon with a fresh data directory and waits until it is healthy.
    pub fn start(self) -> Result<Daemon> {
        let binary = match &self.binary {
            Some(path) => path.clone(),
            None => crate::binary::ingressd_binary()?,
        };
        let work = WorkDir::new("ingt-ingressd-")?;
        let data_dir = work.join("data");
        std::fs::create_dir_all(&data_dir).ctx(|| format!("creating {}", data_dir.display()))?;
        let log = work.join("ingressd.log");
        let mut daemon = Daemon {
            builder: self,
            binary,
            data_dir,
            log,
            running: None,
            api_addr: None,
            starts: 0,
            work,
        };
        daemon.spawn()?;
        Ok(daemon)
    }
}

struct Running {
    guard: ChildGuard,
}

/// A daemon started with `--takeover`, not yet known to be in charge; stopped when dropped.
pub struct Successor {
    guard: ChildGuard,
    started: Instant,
}

impl Successor {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.guard.wait_timeout(timeout)
    }
}

/// A running `ingressd`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    builder: DaemonBuilder,
    binary: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    running: Option<Running>,
    api_addr: Option<SocketAddr>,
    starts: u32,
    work: WorkDir,
}

impl Daemon {
    /// Starts a daemon with the defaults (fresh data directory, API on a kernel-picked port).
    pub fn start() -> Result<Self> {
        DaemonBuilder::default().start()
    }

    /// A builder for a daemon with settings.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    fn spawn(&mut self) -> Result<()> {
        let addr_file = self.data_dir.join(API_ADDR_FILE);
        if addr_file.exists() {
            std::fs::remove_file(&addr_file).ctx(|| format!("removing {}", addr_file.display()))?;
        }
        self.starts += 1;
        let marker = format!(
            "==== ingress-tests: start #{} of {} ====\n",
            self.starts,
            self.binary.display()
        );
        append(&self.log, &marker)?;

        let mut cmd = self.command(&self.binary);
        let mut guard = ChildGuard::spawn("ingressd", &mut cmd, Some(&self.log))?;

        let started = Instant::now();
        let timeout = self.builder.start_timeout;
        let addr = wait_until(
            &format!("ingressd to write {}", addr_file.display()),
            timeout,
            || {
                guard.ensure_running()?;
                Ok(std::fs::read_to_string(&addr_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok()))
            },
        )?;
        let mut api = ApiClient::new(addr)?;
        if let Some(token) = &self.builder.token {
            api = api.with_token(token);
        }
        wait_until(
            "ingressd to answer GET /healthz with 200",
            timeout.saturating_sub(started.elapsed()),
            || {
                guard.ensure_running()?;
                Ok(api.healthz().ok().filter(|r| r.status == 200).map(drop))
            },
        )?;
        self.api_addr = Some(addr);
        self.running = Some(Running { guard });
        Ok(())
    }

    fn command(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(binary);
        for (key, _) in env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("INGRESSD_") || key == "RESERVED_PORTS" {
                cmd.env_remove(&*key);
            }
        }
        cmd.current_dir(self.work.path())
            .env("INGRESSD_DATA_DIR", &self.data_dir)
            .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
            .envs(self.builder.envs.iter().map(|(k, v)| (k, v)))
            .args(&self.builder.args);
        cmd
    }

    /// Starts a second daemon (`binary`, or the same one) with `--takeover` on this daemon's
    /// data directory and settings plus `extra_env`; it takes over from the running one.
    /// Logs go to the same file. Returns at once.
    pub fn start_successor(
        &self,
        binary: Option<&Path>,
        extra_env: &[(&str, &str)],
    ) -> Result<Successor> {
        append(&self.log, "==== ingress-tests: takeover start ====\n")?;
        let mut cmd = self.command(binary.unwrap_or(&self.binary));
        cmd.arg("--takeover")
            .envs(extra_env.iter().map(|(k, v)| (k, v)));
        let started = Instant::now();
        let guard = ChildGuard::spawn("ingressd (takeover)", &mut cmd, Some(&self.log))?;
        Ok(Successor { guard, started })
    }

    /// Waits until the running daemon has exited and the successor answers `/healthz` on the
    /// same API address; the successor is the running daemon from then on. Returns the old
    /// daemon's exit status and how long after the successor's start it was gone.
    pub fn complete_takeover(
        &mut self,
        mut successor: Successor,
        timeout: Duration,
    ) -> Result<(ExitStatus, Duration)> {
        let mut old = self.take_running()?;
        let (status, gone_after) = wait_until("the old ingressd to exit", timeout, || {
            successor.guard.ensure_running()?;
            Ok(old
                .guard
                .try_wait()?
                .map(|status| (status, successor.started.elapsed())))
        })?;
        let api = self.api()?;
        wait_until("the new ingressd to answer GET /healthz", timeout, || {
            successor.guard.ensure_running()?;
            Ok(api.healthz().ok().filter(|r| r.status == 200).map(drop))
        })?;
        self.running = Some(Running {
            guard: successor.guard,
        });
        Ok((status, gone_after))
    }

    /// The address of the API (of the latest start).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// A client for the API, sending the configured token.
    pub fn api(&self) -> Result<ApiClient> {
        let addr = self.api_addr.ok_or_else(|| Error::Process {
            what: "ingressd".to_owned(),
            detail: "has not started".to_owned(),
        })?;
        let api = ApiClient::new(addr)?;
        Ok(match &self.builder.token {
            Some(token) => api.with_token(token),
            None => api,
        })
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The daemon's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.guard.pid())
    }

    /// How many file descriptors the running daemon holds (`/proc/<pid>/fd`), to check that
    /// closed flows leave none behind.
    pub fn open_fds(&self) -> Result<usize> {
        let pid = self.running_pid()?;
        let dir = format!("/proc/{pid}/fd");
        std::fs::read_dir(&dir)
            .ctx(|| format!("listing {dir}"))
            .map(Iterator::count)
    }

    /// The running daemon's resident memory in bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.running_pid()?;
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| Error::Process {
                what: "reading VmRSS".to_owned(),
                detail: path,
            })
    }

    fn running_pid(&self) -> Result<u32> {
        self.pid().ok_or_else(|| Error::Process {
            what: "ingressd".to_owned(),
            detail: "is not running".to_owned(),
        })
    }

    /// The log of every start so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("ingressd to log {needle:?}"), timeout, || {
            Ok(self.log().contains(needle).then_some(()))
        })
    }

    /// Whether the daemon is running (reaping it if it exited).
    pub fn is_running(&mut self) -> Result<bool> {
        match self.running.as_mut() {
            Some(r) => Ok(r.guard.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// Stops the daemon gracefully (SIGTERM; SIGKILL after [`STOP_GRACE`]); returns its exit
    /// status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.take_running()?.guard.stop(STOP_GRACE)
    }

    /// Kills the daemon with SIGKILL, as a crash would; the data directory stays.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.take_running()?.guard.kill9()
    }

    /// Starts the daemon again with the same data directory and settings (stopping it first if
    /// it runs) and waits until it is healthy.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut running) = self.running.take() {
            running.guard.stop(STOP_GRACE)?;
        }
        self.spawn()
    }

    fn take_running(&mut self) -> Result<Running> {
        self.running.take().ok_or_else(|| Error::Process {
            what: "ingressd".to_owned(),
            detail: "is not running".to_owned(),
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take()
            && let Err(e) = running.guard.stop(STOP_GRACE)
        {
            eprintln!("stopping ingressd: {e:?}");
        }
        if std::thread::panicking() {
            eprintln!(
                "---- ingressd log ({}), last 60 lines ----\n{}\n----",
                self.log.display(),
                tail(&self.log, 60)
            );
        }
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())
        .ctx(|| format!("writing {}", path.display()))
}
