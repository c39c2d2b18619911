//! A redis server with a TLS port (and a plaintext port, for ingresses that terminate TLS), no
//! persistence, on one loopback address and leased ports.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{START_TIMEOUT, ServerOptions};
use crate::{
    error::Result,
    pki::Pki,
    ports::PortLease,
    process::{ChildGuard, run_capture, run_checked, wait_until},
    tools,
    workdir::WorkDir,
};

/// A running redis-server; stopped when dropped.
pub struct Redis {
    guard: ChildGuard,
    tls_addr: SocketAddr,
    plain_addr: SocketAddr,
    ca: PathBuf,
    names: Vec<String>,
    _leases: [PortLease; 2],
    _work: WorkDir,
}

impl Redis {
    /// Starts redis-server and waits until `PING` over TLS answers `PONG`.
    pub fn start(options: &ServerOptions) -> Result<Self> {
        let server = tools::find("redis-server")?;
        let cli = tools::find("redis-cli")?;
        let work = WorkDir::new("ingt-redis-")?;
        let pki = Pki::new()?;
        let ca = pki.write_ca(work.path())?;
        let cert = pki
            .issue(&options.cert_names())?
            .write(work.path(), "server")?;
        let leases = [PortLease::new()?, PortLease::new()?];
        let ip = IpAddr::V4(options.ip);
        let plain_addr = SocketAddr::new(ip, leases[0].port());
        let tls_addr = SocketAddr::new(ip, leases[1].port());

        let mut cmd = Command::new(server);
        cmd.current_dir(work.path())
            .args(["--bind", &options.ip.to_string()])
            .args(["--port", &plain_addr.port().to_string()])
            .args(["--tls-port", &tls_addr.port().to_string()])
            .arg("--tls-cert-file")
            .arg(&cert.cert)
            .arg("--tls-key-file")
            .arg(&cert.key)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .arg("--dir")
            .arg(work.path());
        let mut guard = ChildGuard::spawn("redis-server", &mut cmd, Some(&work.join("redis.log")))?;

        wait_until(
            "redis-server to answer PING over TLS",
            START_TIMEOUT,
            || {
                guard.ensure_running()?;
                let mut ping = cli_command(&cli, tls_addr, Some((&ca, None)));
                ping.arg("PING");
                let out = run_capture("redis-cli PING", &mut ping, Duration::from_secs(10))?;
                Ok((out.status.success() && out.stdout.trim() == "PONG").then_some(()))
            },
        )?;
        Ok(Self {
            guard,
            tls_addr,
            plain_addr,
            ca,
            names: options.names.clone(),
            _leases: leases,
            _work: work,
        })
    }

    /// The TLS port's address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr
    }

    /// The plaintext port's address.
    pub fn plain_addr(&self) -> SocketAddr {
        self.plain_addr
    }

    /// The CA certificate that signed the server's certificate.
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// The process guard (PID, log).
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// `redis-cli --tls` reaching `target` (this server or an ingress in front of it), sending
    /// `sni` (default: the first certificate name); append the redis command as arguments.
    pub fn tls_cli(&self, target: SocketAddr, sni: Option<&str>) -> Result<Command> {
        let cli = tools::find("redis-cli")?;
        let sni = sni.or(self.names.first().map(String::as_str));
        Ok(cli_command(&cli, target, Some((&self.ca, sni))))
    }

    /// Runs one redis command over TLS through `target` with `sni`; returns the reply.
    pub fn tls_command(
        &self,
        target: SocketAddr,
        sni: Option<&str>,
        args: &[&str],
    ) -> Result<String> {
        let mut cmd = self.tls_cli(target, sni)?;
        cmd.args(args);
        run_checked("redis-cli", &mut cmd, Duration::from_secs(30)).map(|out| out.trim().to_owned())
    }
}

/// `redis-cli -h <ip> -p <port>`, with `--tls --cacert <ca> [--sni <name>]` when `tls` is given.
fn cli_command(cli: &Path, target: SocketAddr, tls: Option<(&Path, Option<&str>)>) -> Command {
    let mut cmd = Command::new(cli);
    cmd.args([
        "-h",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ]);
    if let Some((ca, sni)) = tls {
        cmd.arg("--tls").arg("--cacert").arg(ca);
        if let Some(sni) = sni {
            cmd.args(["--sni", sni]);
        }
    }
    cmd
}
