//! Finding the programs tests drive, and the privileges they need. A missing program is a
//! [`Skip`] naming the Debian package that provides it.
use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::{error::Result, skip::Skip};

/// Directories searched after `PATH`: a non-root `PATH` often lacks the sbin directories.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The Debian package providing each program tests use.
const PACKAGES: &[(&str, &str)] = &[
    ("openssl", "openssl"),
    ("curl", "curl"),
    ("psql", "postgresql-client-15"),
    ("postgres", "postgresql-15"),
    ("initdb", "postgresql-15"),
    ("pg_isready", "postgresql-client-15"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("dnsmasq", "dnsmasq"),
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("python3", "python3"),
];

/// The absolute path of `program`, searched on `PATH` then in the sbin directories.
pub fn find(program: &str) -> Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| missing(program).into())
}

/// A postgres server program (`postgres`, `initdb`, `pg_isready`, ...). Debian keeps them in
/// `/usr/lib/postgresql/<major>/bin`, off `PATH`: `PG_BINDIR` wins, then the newest major there,
/// then `PATH`.
pub fn postgres_program(program: &str) -> Result<PathBuf> {
    if let Some(dir) = env::var_os("PG_BINDIR") {
        let candidate = Path::new(&dir).join(program);
        return if is_executable(&candidate) {
            Ok(candidate)
        } else {
            Err(Skip::new(format!("PG_BINDIR has no {program}")).into())
        };
    }
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .max_by_key(|(major, _)| *major);
    if let Some((_, dir)) = newest {
        let candidate = dir.join("bin").join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    find(program)
}

/// schemathesis: `SCHEMATHESIS` if set, else the virtualenv `cargo xtask setup --for test`
/// creates (`~/.cache/ingressd/venv`, `$XDG_CACHE_HOME` respected), else `PATH`.
pub fn schemathesis() -> Result<PathBuf> {
    if let Some(path) = env::var_os("SCHEMATHESIS") {
        return Ok(PathBuf::from(path));
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        let candidate = cache.join("ingressd/venv/bin/schemathesis");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    find("schemathesis").map_err(|_| {
        Skip::new("schemathesis is not installed: run `cargo xtask setup --for test`").into()
    })
}

/// Whether the tests run as root (network namespaces, eBPF, running servers as other users).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A [`Skip`] unless the tests run as root.
pub fn require_root(what: &str) -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        Err(Skip::new(format!("{what} needs root")).into())
    }
}

fn missing(program: &str) -> Skip {
    match PACKAGES.iter().find(|(p, _)| *p == program) {
        Some((_, package)) => Skip::new(format!(
            "{program} not found (Debian package {package}; `cargo xtask setup --for test` installs it)"
        )),
        None => Skip::new(format!("{program} not found on PATH")),
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
