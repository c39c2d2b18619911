//! Which `ingressd` binary the end-to-end tests run.
//!
//! `INGRESSD_BIN` if set (`cargo xtask test` builds the daemon first and sets it). Otherwise the
//! harness runs, once per test process, the build `cargo xtask test` runs (`cargo build
//! --workspace --exclude ingress-ebpf --lib --bins --tests`, for the profile and target directory
//! of the running test binary) and uses `<target>/<profile>/ingressd` — so a plain `cargo test`
//! never runs a stale daemon. The package selection matters: another feature resolution reruns
//! the daemon's build script, which rebuilds the eBPF object from scratch (minutes).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use crate::{
    error::{Error, IoContext as _, Result},
    process::run_capture,
};

/// The `ingressd` binary to test (see the module documentation): the path, building it first
/// when `INGRESSD_BIN` is unset.
pub fn ingressd_binary() -> Result<PathBuf> {
    if let Some(path) = env::var_os("INGRESSD_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::Process {
                what: "locating ingressd".to_owned(),
                detail: format!("INGRESSD_BIN={} does not exist", path.display()),
            })
        };
    }
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_ingressd().map_err(|e| format!("{e:?}")))
        .clone()
        .map_err(|detail| Error::Process {
            what: "building ingressd".to_owned(),
            detail,
        })
}

/// Builds `ingressd` for the profile and target directory of the running test binary
/// (`<target>/<profile>/deps/<test>`).
fn build_ingressd() -> Result<PathBuf> {
    let exe = env::current_exe().ctx(|| "locating the test binary".to_owned())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Error::Process {
            what: "locating ingressd".to_owned(),
            detail: format!("{} is not in <target>/<profile>/deps", exe.display()),
        })?
        .to_path_buf();
    let target_dir = profile_dir.parent().unwrap_or(&profile_dir).to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let cargo = env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--quiet",
            "--workspace",
            "--exclude",
            "ingress-ebpf",
            "--lib",
            "--bins",
            "--tests",
            "--target-dir",
        ])
        .arg(&target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    clean_cargo_env(&mut cmd, &target_dir);
    eprintln!("building ingressd ({profile}) for the end-to-end tests");
    let out = run_capture(
        "cargo build (for ingressd)",
        &mut cmd,
        Duration::from_secs(3600),
    )?;
    if !out.status.success() {
        return Err(Error::Process {
            what: "cargo build (for ingressd)".to_owned(),
            detail: format!("{}\n{}", out.status, out.stderr),
        });
    }
    Ok(profile_dir.join("ingressd"))
}

/// Removes what `cargo test` set for this test process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`,
/// `LD_LIBRARY_PATH` entries, the toolchain rustup chose by default) from a nested cargo's
/// environment: build scripts that watch such variables (ring watches `CARGO_MANIFEST_DIR`)
/// would rerun, and the crates above them rebuild, each time the environment flips between this
/// build and a plain `cargo`.
fn clean_cargo_env(cmd: &mut Command, target_dir: &Path) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || matches!(
                key,
                "CARGO"
                    | "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
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
