//! `cargo xtask setup`: checks what the build and the tests need and installs what is missing.
//!
//! Every check comes first and fetches nothing: on a machine that has everything, setup runs a
//! handful of quick commands (dpkg-query, rustup, `bpf-linker --version`) and returns. Each install
//! says what it installs and why; each failure names the missing piece and the command that
//! installs it.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    apt::{self, Package},
    context::{Ctx, cache_dir, cargo_bin_dir, is_executable, output_if_ok, run},
};

/// What setup prepares.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Scope {
    /// The build toolchain: what `cargo xtask run` needs.
    Run,
    /// The toolchain plus what the kernel matrix needs: qemu and the tools copied into its
    /// guests.
    Vm,
    /// The toolchain plus the servers and clients the end-to-end tests drive, and the kernel
    /// matrix's tools (`cargo xtask test` runs the matrix too).
    Test,
}

impl Scope {
    /// The name `--for` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Vm => "vm",
            Self::Test => "test",
        }
    }

    /// The Debian packages this scope needs, each once.
    fn packages(self) -> Vec<&'static Package> {
        let mut wanted: Vec<&Package> = TOOLCHAIN_PACKAGES.iter().collect();
        if self == Self::Test {
            wanted.extend(TEST_PACKAGES);
        }
        if matches!(self, Self::Vm | Self::Test) {
            wanted.extend(VM_PACKAGES);
        }
        let mut seen = std::collections::BTreeSet::new();
        wanted.retain(|p| seen.insert(p.name));
        wanted
    }
}

/// Where LLVM 22 lives on Debian; bpf-linker is built against it.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The schemathesis release the API conformance step uses.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

const TOOLCHAIN_PACKAGES: &[Package] = &[Package {
    name: "llvm-22-dev",
    why: "bpf-linker links the eBPF object with LLVM 22, the LLVM of the nightly rustc",
    service: None,
}];

const TEST_PACKAGES: &[Package] = &[
    pkg(
        "openssl",
        "`openssl s_client`/`s_server` as TLS client and backend",
        None,
    ),
    pkg("curl", "HTTPS client in end-to-end tests", None),
    pkg(
        "postgresql-15",
        "postgres backend (initdb + postgres, started per test)",
        Some("postgresql"),
    ),
    pkg("postgresql-client-15", "psql client", None),
    pkg(
        "redis-server",
        "redis backend with --tls-port",
        Some("redis-server"),
    ),
    pkg("redis-tools", "redis-cli --tls client", None),
    pkg(
        "openssh-server",
        "sshd backend (started per test on its own port)",
        Some("ssh"),
    ),
    pkg("openssh-client", "ssh client", None),
    // dnsmasq-base: the binary alone; the `dnsmasq` package also runs a system service.
    pkg(
        "dnsmasq-base",
        "DNS server (started per test) for the dns instance resolver tests",
        None,
    ),
    pkg(
        "haproxy",
        "PROXY protocol v1/v2 receiver in the proxy protocol tests",
        Some("haproxy"),
    ),
    pkg(
        "iproute2",
        "`ip netns`/veth for tests that need a second host",
        None,
    ),
    pkg(
        "bpftool",
        "inspecting eBPF maps and programs from tests",
        None,
    ),
    pkg("procps", "ps/pgrep-style process inspection in tests", None),
    pkg(
        "prometheus",
        "`promtool check metrics` validates the daemon's /metrics exposition",
        Some("prometheus"),
    ),
    pkg("python3-pip", "installs schemathesis", None),
    pkg(
        "python3-venv",
        "keeps schemathesis in its own virtualenv",
        None,
    ),
];

/// What `cargo xtask vmtest` needs: qemu, and the tools it copies into the guest's initramfs.
const VM_PACKAGES: &[Package] = &[
    pkg(
        "qemu-system-x86",
        "boots the Debian kernels of the kernel matrix (software emulation)",
        None,
    ),
    pkg(
        "busybox-static",
        "the kernel-matrix guest's shell and core tools",
        None,
    ),
    pkg("cpio", "packs the kernel-matrix guest's initramfs", None),
    pkg(
        "xz-utils",
        "decompresses Debian's .ko.xz modules for the guest's busybox insmod",
        None,
    ),
    pkg("kmod", "depmod orders the guest's kernel modules", None),
    pkg(
        "binutils",
        "objcopy strips debug info from the binaries copied into the guest",
        None,
    ),
    pkg(
        "iproute2",
        "`ip netns`/veth in the guest, for the splice liveness tests",
        None,
    ),
    pkg(
        "python3",
        "the liveness tests' sink server, also run in the guest",
        None,
    ),
    pkg(
        "bpftool",
        "reads the verifier-reported size of the guest's eBPF program",
        None,
    ),
];

const fn pkg(name: &'static str, why: &'static str, service: Option<&'static str>) -> Package {
    Package { name, why, service }
}

/// Checks and installs what `scope` needs; with `check_only`, installs nothing and fails listing
/// what is missing.
pub fn setup(ctx: &mut Ctx, scope: Scope, check_only: bool) -> Result<()> {
    let started = Instant::now();
    println!("setup (for {}): checking what is missing", scope.name());
    let mut missing = Vec::new();

    let wanted = scope.packages();
    let absent = apt::missing(&wanted)?;
    if absent.is_empty() {
        println!("  ok  Debian packages ({})", wanted.len());
    } else if check_only {
        missing.push(format!(
            "Debian packages {}: {}",
            absent.iter().map(|p| p.name).collect::<Vec<_>>().join(" "),
            apt::install_hint(&absent)
        ));
    } else {
        apt::install(ctx, &absent)?;
    }

    if let Err(e) = nightly_rust_src(ctx, check_only) {
        missing.push(format!("{e:#}"));
    }
    if let Err(e) = bpf_linker(ctx, check_only) {
        missing.push(format!("{e:#}"));
    }
    bpffs(ctx, check_only);
    if scope == Scope::Test {
        if let Err(e) = schemathesis(ctx, check_only) {
            missing.push(format!("{e:#}"));
        }
        if let Err(e) = cargo_fuzz(ctx, check_only) {
            missing.push(format!("{e:#}"));
        }
    }

    if !missing.is_empty() {
        bail!("setup is incomplete:\n  - {}", missing.join("\n  - "));
    }
    println!(
        "setup (for {}): ready in {:.1?}",
        scope.name(),
        started.elapsed()
    );
    Ok(())
}

/// The nightly toolchain with `rust-src`: aya-build compiles `ingress-ebpf` with
/// `cargo +nightly -Z build-std=core` for `bpfel-unknown-none`.
fn nightly_rust_src(ctx: &Ctx, check_only: bool) -> Result<()> {
    if ctx.which("rustup").is_none() {
        bail!("rustup is not on PATH: install it from https://rustup.rs, then rerun setup");
    }
    let installed = output_if_ok(ctx.command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.trim().starts_with("rust-src")) => {
            println!("  ok  rust-src for the nightly toolchain");
            Ok(())
        }
        Some(_) => {
            let hint = "rustup component add rust-src --toolchain nightly";
            if check_only {
                bail!("rust-src for nightly: {hint}");
            }
            println!(
                "  installing rust-src for nightly: the eBPF build compiles `core` from source"
            );
            run(ctx.command("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
            .with_context(|| format!("installing rust-src; by hand: {hint}"))
        }
        None => {
            let hint = "rustup toolchain install nightly --profile minimal --component rust-src";
            if check_only {
                bail!("the nightly toolchain: {hint}");
            }
            println!("  installing the nightly toolchain with rust-src: the eBPF crate needs it");
            run(ctx.command("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .with_context(|| format!("installing nightly; by hand: {hint}"))
        }
    }
}

/// The `bpf-linker` install command, for messages.
fn bpf_linker_hint() -> String {
    format!(
        "LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} PATH={LLVM_PREFIX}/bin:$PATH \
         cargo install bpf-linker --locked --no-default-features --features llvm-22"
    )
}

/// `bpf-linker`, which links the eBPF object. It counts as present only if `bpf-linker --version`
/// runs (it loads libLLVM 22 at start-up). When it sits in `~/.cargo/bin` but that is not on
/// `PATH` (common under CI), the directory is added to the children's `PATH`.
fn bpf_linker(ctx: &mut Ctx, check_only: bool) -> Result<()> {
    if let Some(version) = find_bpf_linker(ctx)? {
        println!("  ok  {}", version.trim());
        return Ok(());
    }
    if check_only {
        bail!("bpf-linker: {}", bpf_linker_hint());
    }
    println!(
        "  installing bpf-linker (with LLVM 22): rustc links eBPF programs with it; takes minutes"
    );
    // /usr/bin/llvm-config is LLVM 14 on Debian 12: put LLVM 22's first so nothing picks it up.
    let path = env::join_paths(
        std::iter::once(PathBuf::from(LLVM_PREFIX).join("bin")).chain(env::split_paths(ctx.path())),
    )?;
    let mut cmd = ctx.cargo();
    cmd.env("PATH", path)
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        // Outside the workspace, so its .cargo/config.toml and target dir stay out of it.
        .current_dir(env::temp_dir())
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
    run(&mut cmd)
        .with_context(|| format!("installing bpf-linker; by hand: {}", bpf_linker_hint()))?;
    match find_bpf_linker(ctx)? {
        Some(version) => {
            println!("  ok  {}", version.trim());
            Ok(())
        }
        None => bail!("bpf-linker was installed but `bpf-linker --version` does not run"),
    }
}

fn find_bpf_linker(ctx: &mut Ctx) -> Result<Option<String>> {
    let candidate = match ctx.which("bpf-linker") {
        Some(path) => Some(path),
        None => cargo_bin_dir()
            .map(|dir| dir.join("bpf-linker"))
            .filter(|p| is_executable(p)),
    };
    let Some(path) = candidate else {
        return Ok(None);
    };
    let Some(version) = output_if_ok(Command::new(&path).arg("--version")) else {
        println!(
            "  found {} but `--version` fails (libLLVM 22 missing?)",
            path.display()
        );
        return Ok(None);
    };
    if let Some(dir) = path.parent() {
        ctx.prepend_path(dir)?;
    }
    Ok(Some(version))
}

/// bpffs at /sys/fs/bpf: not mounted at boot on these machines, needed to pin maps. Only root
/// can mount it; otherwise this is a note, not a failure (the daemon does not pin by default).
fn bpffs(ctx: &Ctx, check_only: bool) {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if bpffs_mounted(&mounts) {
        println!("  ok  bpffs at /sys/fs/bpf");
        return;
    }
    if !ctx.is_root || check_only {
        println!(
            "  note: bpffs is not mounted (only needed to pin maps): sudo mount -t bpf bpf /sys/fs/bpf"
        );
        return;
    }
    println!("  mounting bpffs at /sys/fs/bpf: pinned maps live there");
    if let Err(e) = run(ctx
        .command("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
    {
        println!("  warning: {e:#}");
    }
}

fn bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    })
}

/// The virtualenv holding schemathesis: `~/.cache/ingressd/venv` (`$XDG_CACHE_HOME` respected).
/// The test harness looks for `bin/schemathesis` there too.
pub fn venv_dir() -> Option<PathBuf> {
    cache_dir().map(|dir| dir.join("ingressd").join("venv"))
}

/// schemathesis (API conformance against `/openapi.json`), in its own virtualenv so the system
/// Python stays untouched.
fn schemathesis(ctx: &Ctx, check_only: bool) -> Result<()> {
    let venv = venv_dir().context("neither XDG_CACHE_HOME nor HOME is set")?;
    let bin = venv.join("bin").join("schemathesis");
    if let Some(version) = output_if_ok(Command::new(&bin).arg("--version")) {
        println!("  ok  {} ({})", version.trim(), venv.display());
        return Ok(());
    }
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let hint = format!(
        "{python} -m venv {v} && {v}/bin/pip install '{SCHEMATHESIS}'",
        v = venv.display()
    );
    if check_only {
        bail!("schemathesis: {hint}");
    }
    println!(
        "  installing {SCHEMATHESIS} into {}: API conformance tests run it",
        venv.display()
    );
    if !venv.join("bin").join("pip").exists() {
        if let Some(parent) = venv.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        run(ctx.command(python).arg("-m").arg("venv").arg(&venv))
            .with_context(|| format!("creating the virtualenv; by hand: {hint}"))?;
    }
    run(ctx.command(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        SCHEMATHESIS,
    ]))
    .with_context(|| format!("installing schemathesis; by hand: {hint}"))
}

/// The `cargo-fuzz` install command, for messages.
const CARGO_FUZZ_HINT: &str = "cargo install cargo-fuzz --locked";

/// `cargo-fuzz`, which builds and runs the fuzz targets under `fuzz/` (with the nightly
/// toolchain, which [`nightly_rust_src`] provides). Present when `cargo fuzz --version` runs.
fn cargo_fuzz(ctx: &mut Ctx, check_only: bool) -> Result<()> {
    if let Some(version) = find_cargo_fuzz(ctx)? {
        println!("  ok  {}", version.trim());
        return Ok(());
    }
    if check_only {
        bail!("cargo-fuzz: {CARGO_FUZZ_HINT}");
    }
    println!("  installing cargo-fuzz: the test suite runs the fuzz targets briefly");
    run(ctx
        .cargo()
        // Outside the workspace, so its .cargo/config.toml and target dir stay out of it.
        .current_dir(env::temp_dir())
        .args(["install", "cargo-fuzz", "--locked"]))
    .with_context(|| format!("installing cargo-fuzz; by hand: {CARGO_FUZZ_HINT}"))?;
    match find_cargo_fuzz(ctx)? {
        Some(version) => {
            println!("  ok  {}", version.trim());
            Ok(())
        }
        None => bail!("cargo-fuzz was installed but `cargo fuzz --version` does not run"),
    }
}

fn find_cargo_fuzz(ctx: &mut Ctx) -> Result<Option<String>> {
    let candidate = match ctx.which("cargo-fuzz") {
        Some(path) => Some(path),
        None => cargo_bin_dir()
            .map(|dir| dir.join("cargo-fuzz"))
            .filter(|p| is_executable(p)),
    };
    let Some(path) = candidate else {
        return Ok(None);
    };
    // Run as cargo runs it: `cargo-fuzz fuzz --version`.
    let Some(version) = output_if_ok(Command::new(&path).args(["fuzz", "--version"])) else {
        return Ok(None);
    };
    if let Some(dir) = path.parent() {
        ctx.prepend_path(dir)?;
    }
    Ok(Some(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_package_is_wanted_once() {
        let names: Vec<&str> = Scope::Test.packages().iter().map(|p| p.name).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(names.len(), unique.len());
        assert!(names.contains(&"qemu-system-x86") && names.contains(&"postgresql-15"));
        assert!(
            !Scope::Run
                .packages()
                .iter()
                .any(|p| p.name == "qemu-system-x86")
        );
    }

    #[test]
    fn bpffs_is_recognised_by_mount_point_and_type() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(bpffs_mounted(mounts));
        assert!(!bpffs_mounted(
            "sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n"
        ));
    }
}
