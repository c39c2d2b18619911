//! What every command needs to know about the machine: the workspace root, the `PATH` that child
//! processes get, whether we run as root.
use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Shared state of one xtask invocation.
pub struct Ctx {
    /// The workspace root (the parent of `xtask/`).
    pub root: PathBuf,
    /// `PATH` for every child process; `~/.cargo/bin` is added only when it is missing and needed,
    /// because `ingress-ebpf`'s build script reruns (and the daemon rebuilds) whenever `PATH`
    /// changes.
    path: OsString,
    /// Whether the effective user is root (installing packages and mounting need it).
    pub is_root: bool,
}

impl Ctx {
    /// Reads the environment of this process.
    pub fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        Ok(Self {
            root,
            path: env::var_os("PATH").unwrap_or_default(),
            is_root: effective_uid()? == 0,
        })
    }

    /// The `PATH` given to child processes.
    pub fn path(&self) -> &OsStr {
        &self.path
    }

    /// Puts `dir` at the front of the children's `PATH` unless it is already on it.
    pub fn prepend_path(&mut self, dir: &Path) -> Result<()> {
        if env::split_paths(&self.path).any(|p| p == dir) {
            return Ok(());
        }
        let joined =
            env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(&self.path)))
                .context("joining PATH")?;
        println!(
            "  note: {} is not on PATH; adding it for child processes",
            dir.display()
        );
        self.path = joined;
        Ok(())
    }

    /// Finds `program` on the children's `PATH`.
    pub fn which(&self, program: &str) -> Option<PathBuf> {
        env::split_paths(&self.path)
            .map(|dir| dir.join(program))
            .find(|p| is_executable(p))
    }

    /// A command for `program` with the children's `PATH`, run from the workspace root, without
    /// what `cargo run` added to this process's environment (see [`clean_cargo_run_env`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", &self.path).current_dir(&self.root);
        clean_cargo_run_env(&mut cmd, &self.target_dir());
        cmd
    }

    /// `cargo` with the children's `PATH`. The rustup proxy on `PATH` is used (not `$CARGO`) so
    /// toolchain selection works as it does in a shell.
    pub fn cargo(&self) -> Command {
        self.command("cargo")
    }

    /// The target directory cargo uses for this workspace.
    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }
}

/// Removes from `cmd`'s environment what `cargo run` and rustup set for xtask itself
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, `LD_LIBRARY_PATH` entries, the toolchain rustup chose by
/// default). A nested cargo would otherwise see them: build scripts that watch such variables
/// (ring watches `CARGO_MANIFEST_DIR`) rerun, and the crates above them rebuild, every time the
/// environment flips between `cargo xtask` and a plain `cargo`.
pub fn clean_cargo_run_env(cmd: &mut Command, target_dir: &Path) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO"
                    | "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
            )
        {
            cmd.env_remove(key);
        }
    }
    if env::var_os("RUSTUP_TOOLCHAIN_SOURCE").is_some_and(|s| s == "default") {
        cmd.env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTUP_TOOLCHAIN_SOURCE");
    }
    if let Some(paths) = env::var_os("LD_LIBRARY_PATH") {
        let rustup_home = env::var_os("RUSTUP_HOME").map(PathBuf::from);
        let kept: Vec<PathBuf> = env::split_paths(&paths)
            .filter(|p| !p.starts_with(target_dir))
            .filter(|p| !rustup_home.as_ref().is_some_and(|home| p.starts_with(home)))
            .collect();
        match env::join_paths(&kept) {
            Ok(joined) if !kept.is_empty() => {
                cmd.env("LD_LIBRARY_PATH", joined);
            }
            _ => {
                cmd.env_remove("LD_LIBRARY_PATH");
            }
        }
    }
}

/// Cargo's bin directory (`$CARGO_HOME/bin`, default `~/.cargo/bin`), where `cargo install` puts
/// `bpf-linker`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    match env::var_os("CARGO_HOME") {
        Some(home) => Some(PathBuf::from(home).join("bin")),
        None => env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo").join("bin")),
    }
}

/// The user's cache directory (`$XDG_CACHE_HOME`, default `~/.cache`).
pub fn cache_dir() -> Option<PathBuf> {
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The effective uid, from `/proc/self/status` (no `unsafe` needed).
fn effective_uid() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_effective_uid(&status).context("no Uid line in /proc/self/status")
}

fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Prints `cmd` as a shell would show it, then runs it with inherited stdio; fails on a non-zero
/// exit, naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("  + {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout when it exits 0, `None` otherwise (including when the
/// program does not exist).
pub fn output_if_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd` rendered for humans: environment overrides, program and arguments.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "PATH" && *k != "LD_LIBRARY_PATH")
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(' ') {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n";
        assert_eq!(parse_effective_uid(status), Some(0));
    }

    #[test]
    fn display_quotes_empty_and_spaced_arguments() {
        let mut cmd = Command::new("echo");
        cmd.args(["a b", "", "c"]).env("X", "1");
        assert_eq!(display(&cmd), "X=1 echo 'a b' '' c");
    }
}
