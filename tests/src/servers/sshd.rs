//! An OpenSSH server on one loopback address and a leased port, with a fresh host key and one
//! authorized client key for the user running the tests (root under CI).
//!
//! sshd runs in the foreground (`-D -e`) from a generated config; as root it needs its
//! privilege-separation directory `/run/sshd`, created here when missing.
use std::{
    fs,
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{START_TIMEOUT, ServerOptions};
use crate::{
    error::{IoContext as _, Result},
    ports::PortLease,
    process::{ChildGuard, run_checked, wait_until},
    tools::{self, is_root},
    workdir::WorkDir,
};

/// A running sshd; stopped when dropped.
pub struct Sshd {
    guard: ChildGuard,
    addr: SocketAddr,
    user: String,
    client_key: PathBuf,
    host_public_key: String,
    _lease: PortLease,
    work: WorkDir,
}

impl Sshd {
    /// Generates keys and a config, starts sshd and waits for its SSH banner. `options.names` is
    /// unused (SSH has no certificates here); `options.ip` is the listen address.
    pub fn start(options: &ServerOptions) -> Result<Self> {
        let sshd = tools::find("sshd")?;
        let keygen = tools::find("ssh-keygen")?;
        tools::find("ssh")?;
        let work = WorkDir::new("ingt-sshd-")?;
        let host_key = work.join("host_ed25519");
        let client_key = work.join("client_ed25519");
        for key in [&host_key, &client_key] {
            let mut cmd = Command::new(&keygen);
            cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(key);
            run_checked("ssh-keygen", &mut cmd, Duration::from_secs(30))?;
        }
        let read = |p: PathBuf| fs::read_to_string(&p).ctx(|| format!("reading {}", p.display()));
        let authorized = work.join("authorized_keys");
        fs::write(&authorized, read(client_key.with_extension("pub"))?)
            .ctx(|| "writing authorized_keys".to_owned())?;
        let host_public_key = read(host_key.with_extension("pub"))?.trim().to_owned();
        if is_root() {
            fs::create_dir_all("/run/sshd").ctx(|| "creating /run/sshd".to_owned())?;
        }

        let lease = PortLease::new()?;
        let addr = SocketAddr::new(IpAddr::V4(options.ip), lease.port());
        let config = work.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {ip}\nHostKey {host_key}\nPidFile none\n\
                 AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nLogLevel VERBOSE\nSubsystem sftp internal-sftp\n",
                port = addr.port(),
                ip = options.ip,
                host_key = host_key.display(),
                authorized = authorized.display(),
            ),
        )
        .ctx(|| "writing sshd_config".to_owned())?;
        let mut cmd = Command::new(sshd);
        cmd.args(["-D", "-e", "-f"]).arg(&config);
        let mut guard = ChildGuard::spawn("sshd", &mut cmd, Some(&work.join("sshd.log")))?;

        wait_until("sshd to send its banner", START_TIMEOUT, || {
            guard.ensure_running()?;
            Ok(banner(addr).then_some(()))
        })?;
        Ok(Self {
            guard,
            addr,
            user: current_user(),
            client_key,
            host_public_key,
            _lease: lease,
            work,
        })
    }

    /// Where sshd listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The user the client key logs in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The client's private key.
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// The host's public key line (`ssh-ed25519 AAAA...`), to pin the host in `known_hosts`.
    pub fn host_public_key(&self) -> &str {
        &self.host_public_key
    }

    /// The server's directory (config, keys, log).
    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// The process guard (PID, log).
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// `ssh` logging in with the client key, batch mode, pinning this server's host key under
    /// `alias` (the name a test connects by; through an ingress, the SNI). Add `-o
    /// ProxyCommand=...` or `-p`, the destination and the remote command.
    pub fn ssh_command(&self, alias: &str) -> Result<Command> {
        let known_hosts = self.work.join(&format!("known_hosts-{alias}"));
        fs::write(&known_hosts, format!("{alias} {}\n", self.host_public_key))
            .ctx(|| format!("writing {}", known_hosts.display()))?;
        let mut cmd = Command::new(tools::find("ssh")?);
        cmd.arg("-i")
            .arg(&self.client_key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-o")
            .arg(format!("HostKeyAlias={alias}"))
            .args(["-l", &self.user]);
        Ok(cmd)
    }

    /// Runs `remote` over ssh directly against this server; returns its stdout.
    pub fn run(&self, remote: &str) -> Result<String> {
        let mut cmd = self.ssh_command("direct")?;
        cmd.args([
            "-p",
            &self.addr.port().to_string(),
            &self.addr.ip().to_string(),
            remote,
        ]);
        run_checked("ssh", &mut cmd, Duration::from_secs(30))
    }
}

/// Whether `addr` accepts a connection and sends an SSH banner.
fn banner(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0_u8; 8];
    stream.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-2.0")
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".to_owned(), |u| u.name)
}
