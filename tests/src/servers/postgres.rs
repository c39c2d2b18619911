//! A postgres server (initdb into a temporary directory) with `ssl=on`, trust authentication
//! from loopback, listening on one loopback address and a leased port.
//!
//! postgres refuses to run as root: when the tests run as root, initdb and postgres run as the
//! `postgres` system user (created by Debian's postgresql-15 package), which owns the directory.
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::{fs::chown, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::User};

use super::{START_TIMEOUT, ServerOptions};
use crate::{
    error::{IoContext as _, Result},
    pki::Pki,
    ports::PortLease,
    process::{ChildGuard, run_capture, run_checked, wait_until},
    skip::Skip,
    tools::{self, is_root},
    workdir::WorkDir,
};

/// A running postgres; stopped (fast shutdown, SIGINT) when dropped.
pub struct Postgres {
    guard: ChildGuard,
    addr: SocketAddr,
    ca: PathBuf,
    names: Vec<String>,
    _lease: PortLease,
    work: WorkDir,
}

impl Postgres {
    /// initdb, start, and wait until postgres accepts connections.
    pub fn start(options: &ServerOptions) -> Result<Self> {
        let initdb = tools::postgres_program("initdb")?;
        let postgres = tools::postgres_program("postgres")?;
        let pg_isready = tools::postgres_program("pg_isready")?;
        tools::find("psql")?;
        let owner = server_user()?;

        let work = WorkDir::new("ingt-postgres-")?;
        let pki = Pki::new()?;
        let ca = pki.write_ca(work.path())?;
        let cert = pki
            .issue(&options.cert_names())?
            .write(work.path(), "server")?;
        if let Some((uid, gid)) = owner {
            for path in [work.path(), cert.cert.as_path(), cert.key.as_path()] {
                chown(path, Some(uid), Some(gid)).ctx(|| format!("chown {}", path.display()))?;
            }
        }

        let data = work.join("data");
        let mut cmd = Command::new(initdb);
        cmd.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        as_user(&mut cmd, owner, work.path());
        run_checked("initdb", &mut cmd, Duration::from_secs(120))?;
        let hba =
            "local all all trust\nhost all all 127.0.0.0/8 trust\nhost all all ::1/128 trust\n";
        fs::write(data.join("pg_hba.conf"), hba).ctx(|| "writing pg_hba.conf".to_owned())?;

        let lease = PortLease::new()?;
        let mut cmd = Command::new(postgres);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-h",
                &options.ip.to_string(),
                "-p",
                &lease.port().to_string(),
                "-k",
                "",
            ])
            .args([
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
            ])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert.cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", cert.key.display()));
        as_user(&mut cmd, owner, work.path());
        let mut guard = ChildGuard::spawn("postgres", &mut cmd, Some(&work.join("postgres.log")))?
            .with_stop_signal(Signal::SIGINT);

        let addr = SocketAddr::new(IpAddr::V4(options.ip), lease.port());
        wait_until("postgres to accept connections", START_TIMEOUT, || {
            guard.ensure_running()?;
            let mut probe = Command::new(&pg_isready);
            probe.args([
                "-q",
                "-t",
                "2",
                "-h",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
            ]);
            let out = run_capture("pg_isready", &mut probe, Duration::from_secs(10))?;
            Ok(out.status.success().then_some(()))
        })?;
        Ok(Self {
            guard,
            addr,
            ca,
            names: options.names.clone(),
            _lease: lease,
            work,
        })
    }

    /// Where postgres listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate that signed the server's certificate (for `sslrootcert`).
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// The server's directory (data, log, certificates).
    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// The process guard (PID, log).
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// A libpq connection string reaching `target` (this server, or an ingress in front of it)
    /// with `host` as the TLS server name, verifying the certificate fully.
    pub fn conninfo(&self, target: SocketAddr, host: &str) -> String {
        format!(
            "host={host} hostaddr={} port={} user=postgres dbname=postgres sslmode=verify-full \
             sslrootcert={} connect_timeout=10",
            target.ip(),
            target.port(),
            self.ca.display()
        )
    }

    /// Runs `sql` with `psql -Atc` through `target` with `host` as server name; returns stdout.
    pub fn query_via(&self, target: SocketAddr, host: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new(tools::find("psql")?);
        cmd.arg(self.conninfo(target, host)).args(["-Atc", sql]);
        run_checked("psql", &mut cmd, Duration::from_secs(60)).map(|out| out.trim().to_owned())
    }

    /// Runs `sql` directly against this server, over TLS, as the first certificate name.
    pub fn query(&self, sql: &str) -> Result<String> {
        let host = self.names.first().map_or("localhost", String::as_str);
        self.query_via(self.addr, host, sql)
    }
}

/// The uid/gid to run postgres as: `None` (ourselves) unless we are root.
fn server_user() -> Result<Option<(u32, u32)>> {
    if !is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(Skip::new(
            "postgres refuses to run as root and there is no `postgres` user \
             (Debian package postgresql-15 creates it)",
        )
        .into()),
    }
}

/// Runs `cmd` as `owner` (dropping root's supplementary groups) from `dir`.
fn as_user(cmd: &mut Command, owner: Option<(u32, u32)>, dir: &Path) {
    cmd.current_dir(dir).env("LC_ALL", "C");
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}
