//! The real `ingressd` binary as a child process: started with a clean environment plus what
//! the test sets, its API address read from the line it prints, stopped by its PID on drop.
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ingress_daemon::ctl::ApiClient;

use crate::common::wait_for;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ingressd");

/// A running `ingressd` child process, killed (by PID, through its handle) on drop.
pub struct Daemon {
    pub child: Child,
    pub api: String,
    token: Option<String>,
}

impl Daemon {
    /// Starts a daemon on `data_dir` with the API on 127.0.0.1:0 and listeners on 127.0.0.1.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[], &[])
    }

    /// Like [`Self::start`], with extra environment variables and arguments (set after the
    /// defaults, so they may override them). `INGRESSD_API_TOKEN` is used by [`Self::client`].
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .env_clear()
            .env("INGRESSD_DATA_DIR", data_dir)
            .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
            .env("INGRESSD_LISTEN_ADDR", "127.0.0.1")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[ingressd] {line}");
                let _ = tx.send(line);
            }
        });
        let api = wait_for("the api listening line", Duration::from_secs(30), || {
            let line = rx.recv_timeout(Duration::from_millis(100)).ok()?;
            if !line.contains("api listening") {
                return None;
            }
            let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
            Some(addr.to_owned())
        });
        let token = env
            .iter()
            .find(|(k, _)| *k == "INGRESSD_API_TOKEN")
            .map(|(_, v)| (*v).to_owned());
        Self { child, api, token }
    }

    /// An API client (with the daemon's token, if it has one).
    pub fn client(&self) -> ApiClient {
        ApiClient::new(self.api.clone(), self.token.clone())
    }

    /// Runs `ingressd ctl --api <addr> <args>` with a clean environment; returns its output.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .env_clear()
            .arg("ctl")
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `ingressd ctl` and returns its standard output, failing the test unless it succeeds.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
