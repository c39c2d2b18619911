//! API conformance: schemathesis against a real `ingressd`'s `/openapi.json`.
//!
//! The daemon built by the suite's build step is started with a fresh data directory under the
//! target directory, the API on `127.0.0.1:0` and a bearer token. Its bound address is read
//! from `<data_dir>/api.addr` (the daemon's start-up contract), `GET /healthz` is polled until
//! it answers, schemathesis runs every check that catches a 5xx or a response outside the
//! schema, and the daemon is stopped by its PID (SIGTERM, SIGKILL after a grace period).
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    context::{Ctx, run},
    setup,
};

/// The token the daemon under test requires; schemathesis sends it.
const TOKEN: &str = "schema-conformance-token";

/// How long the daemon may take to write `api.addr` and answer `/healthz`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the daemon may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The schemathesis checks: no 5xx, every response (status, content type, body, headers)
/// matches the schema, invalid data and missing auth are refused.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance,\
                      negative_data_rejection,ignored_auth";

/// Runs schemathesis against a fresh daemon; fails on any failed check.
pub fn conformance(ctx: &Ctx) -> Result<()> {
    let schemathesis = setup::venv_dir()
        .map(|venv| venv.join("bin").join("schemathesis"))
        .filter(|bin| bin.exists())
        .context("schemathesis is not installed: run `cargo xtask setup --for test`")?;
    let ingressd = ctx.target_dir().join("debug").join("ingressd");
    if !ingressd.exists() {
        bail!(
            "{} does not exist: the build step makes it",
            ingressd.display()
        );
    }
    let work = ctx
        .target_dir()
        .join("xtask")
        .join(format!("schema-{}", std::process::id()));
    let data_dir = work.join("data");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;

    let daemon = Daemon::start(ctx, &ingressd, &data_dir, &work.join("ingressd.log"))?;
    let url = format!("http://{}/openapi.json", daemon.api_addr);
    let max_examples =
        std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "50".to_owned());
    let result = run(ctx
        .command(&schemathesis)
        .args(["run", &url])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", &max_examples])
        // Keeps schemathesis's own state out of the workspace.
        .current_dir(&work));
    let stopped = daemon.stop();
    if result.is_err() {
        let log = work.join("ingressd.log");
        println!("  ingressd log ({}):\n{}", log.display(), tail(&log, 40));
    }
    result?;
    stopped?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))
}

/// The daemon under test; stopped by PID when dropped if [`Daemon::stop`] was not called.
struct Daemon {
    child: Option<Child>,
    api_addr: SocketAddr,
}

impl Daemon {
    fn start(ctx: &Ctx, binary: &Path, data_dir: &Path, log: &Path) -> Result<Self> {
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = ctx.command(binary);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("INGRESSD_") || key == "RESERVED_PORTS" {
                cmd.env_remove(&*key);
            }
        }
        cmd.env("INGRESSD_DATA_DIR", data_dir)
            .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
            .env("INGRESSD_API_TOKEN", TOKEN)
            .env("INGRESSD_LISTEN_ADDR", "127.0.0.1")
            .env("INGRESSD_OFFLOAD", "off")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the log file")?)
            .stderr(log_file);
        println!("  + {} (data dir {})", binary.display(), data_dir.display());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut daemon = Daemon {
            child: Some(child),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let addr_file = data_dir.join("api.addr");
        let deadline = Instant::now() + START_TIMEOUT;
        daemon.api_addr = daemon.poll(deadline, "write api.addr", || {
            fs::read_to_string(&addr_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })?;
        let addr = daemon.api_addr;
        daemon.poll(deadline, "answer GET /healthz", || {
            healthz_ok(addr).then_some(())
        })?;
        println!("  ingressd pid {} serves its API on {addr}", daemon.pid());
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `ready` every 50 ms until it returns a value, the daemon exits, or `deadline`.
    fn poll<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        loop {
            if let Some(value) = ready() {
                return Ok(value);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for ingressd")?
            {
                self.child = None;
                bail!("ingressd exited ({status}) before it would {what}");
            }
            if Instant::now() >= deadline {
                bail!("ingressd did not {what} within {START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM by PID, then SIGKILL if it has not exited after [`STOP_GRACE`].
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if let Some(status) = child.try_wait().context("waiting for ingressd")? {
                if status.success() {
                    return Ok(());
                }
                bail!("ingressd (pid {pid}) exited with {status} after SIGTERM");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ingressd (pid {pid}) ignored SIGTERM for {STOP_GRACE:?}; killed");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Kills exactly the child we started (by its PID), then reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `GET /healthz` answers 200 (HTTP/1.0, so the server closes after the response).
fn healthz_ok(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: ingressd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..] == b"200"
}

/// The last `lines` lines of a file, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
