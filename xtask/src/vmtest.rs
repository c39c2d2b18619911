//! `cargo xtask vmtest`: the splice engine's tests and the guest end-to-end test on stock Debian
//! kernels, each booted under qemu with the test binaries and `ingressd` in its initramfs.
//!
//! Per kernel: fetch the pinned Debian package (cached under `target/vmtest/kernels/`), build an
//! initramfs (static busybox, the test binary and the tools its tests call, with their
//! libraries, and the kernel modules they need), boot it, and read the suite's exit status from
//! the serial console. The console log of each kernel is kept in `target/vmtest/logs/`.
//! `shared/KERNELS.md` records why it boots this way on this machine.
//!
//! The guest runs as root with `CI=true`, so kernel-path tests cannot skip; the bulk sizes shrink
//! by `INGRESSD_TEST_SCALE_MIB` because the emulated guest moves about 2 Gbit/s.
//! [`self_check`] proves a failing guest fails the run.
mod guest;
mod initramfs;
mod kernel;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    context::{Ctx, display},
    suite::{PACKAGES, SERIAL_PREFIX},
};
use guest::{Boot, End};
use initramfs::Tree;
use kernel::{Kernel, SERIES, Series};

/// Which kernels to boot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Which {
    /// Debian 12's default kernel series.
    #[value(name = "6.1")]
    V6_1,
    /// The 6.12 series of bookworm-security.
    #[value(name = "6.12")]
    V6_12,
    /// The 6.17 series of trixie-backports (kTLS rekeying, 6.14+).
    #[value(name = "6.17")]
    V6_17,
    /// Every series.
    All,
}

impl Which {
    fn series(self) -> Vec<&'static Series> {
        SERIES
            .iter()
            .filter(|s| match self {
                Self::V6_1 => s.name == "6.1",
                Self::V6_12 => s.name == "6.12",
                Self::V6_17 => s.name == "6.17",
                Self::All => true,
            })
            .collect()
    }
}

/// How `cargo xtask vmtest` runs.
pub struct Options {
    /// The kernels to boot.
    pub which: Which,
    /// What `INGRESSD_TEST_SCALE_MIB` the guest gets.
    pub scale_mib: u32,
    /// Each guest is killed after this long.
    pub timeout: Duration,
    /// Arguments for the test binary (a libtest filter); empty: the whole suite.
    pub test_args: Vec<String>,
}

/// Bulk size of the guest's splice tests, in MiB (1,024 on the host): the 1 GiB transfers move
/// 256 MiB and the 1,000 concurrent flows become 250.
pub const DEFAULT_SCALE_MIB: u32 = 256;

/// A guest still running after this long is killed. The kTLS bulk test alone moves 1 GiB of
/// AES-GCM through emulated AES-NI (4–5 minutes in a guest on a loaded host).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Modules the tests need that Debian builds as modules: `veth`, for the liveness tests'
/// network namespaces, and kernel TLS for terminated flows: `tls` and the AEADs it uses
/// (AES-GCM: `gcm`, `ctr`, `ghash`, `aesni`; ChaCha20-Poly1305; `tls` alone fails `TLS_TX`
/// with `ENOENT`). The splice engine itself needs none (sockmap is built in). The guest has no
/// `modprobe` for the kernel to call, so each is loaded up front.
const GUEST_MODULES: &[&str] = &[
    "veth",
    "tls",
    "gcm",
    "ctr",
    "ghash-generic",
    "aesni-intel",
    "ghash-clmulni-intel",
    "chacha20poly1305",
    "chacha_generic|chacha",
    "chacha-x86_64",
    "poly1305_generic|libpoly1305-generic",
    "poly1305-x86_64",
];

/// Standard-library packages the guest's Python gets besides the top-level modules: enough for
/// the liveness tests' socket server.
const PYTHON_PACKAGES: &[&str] = &["encodings", "collections", "re", "importlib"];

/// The test binary booted in each guest.
const TEST_TARGET: &str = "splice";

/// The end-to-end test binary; the guest runs its tests under [`E2E_FILTER`] (Rust peers only:
/// the guests carry no `openssl` or `curl`) against `/usr/bin/ingressd`.
const E2E_TARGET: &str = "e2e";
const E2E_FILTER: &str = "guest::";

/// What the guest runs: the two test binaries and the daemon.
struct Binaries {
    splice: PathBuf,
    e2e: PathBuf,
    ingressd: PathBuf,
}

/// Runs the suite on each kernel of `options`; fails if any kernel fails.
pub fn vmtest(ctx: &Ctx, options: &Options) -> Result<()> {
    require_tools(ctx)?;
    let cache = ctx.target_dir().join("vmtest");
    let binaries = build_test_binaries(ctx)?;
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    for series in options.which.series() {
        println!("\n--- kernel {} ---", series.name);
        let started = Instant::now();
        match run_kernel(ctx, series, &binaries, &cache, options) {
            Ok(summary) => lines.push(format!("  ok      {:<5} {summary}", series.name)),
            Err(e) => {
                eprintln!("kernel {}: {e:#}", series.name);
                lines.push(format!(
                    "  FAILED  {:<5} after {:.0?}: {}",
                    series.name,
                    started.elapsed(),
                    e.to_string().lines().next().unwrap_or_default()
                ));
                failed.push(series.name);
            }
        }
    }
    println!("\nkernel matrix");
    for line in &lines {
        println!("{line}");
    }
    if !failed.is_empty() {
        bail!("the suite failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

/// Boots one kernel with the suite; returns its summary line.
fn run_kernel(
    ctx: &Ctx,
    series: &'static Series,
    binaries: &Binaries,
    cache: &Path,
    options: &Options,
) -> Result<String> {
    let kernel = kernel::fetch(ctx, series, cache)?;
    println!("  kernel {} ({})", kernel.release, kernel.package);
    let work = cache.join(series.name);
    let initrd = work.join("initramfs.cpio");
    let started = Instant::now();
    let mut tree = Tree::new(&work.join("root"))?;
    tree.add_binary(&binaries.splice, TEST_TARGET, true)?;
    tree.add_binary(&binaries.e2e, E2E_TARGET, true)?;
    tree.add_binary(&binaries.ingressd, "ingressd", true)?;
    tree.add_binary(&find_tool(ctx, "ip")?, "ip", false)?;
    tree.add_binary(&find_tool(ctx, "bpftool")?, "bpftool", false)?;
    tree.add_python(Path::new("/usr/bin/python3"), PYTHON_PACKAGES)?;
    tree.add_modules(&kernel.modules_in_load_order(GUEST_MODULES)?)?;
    let env = [
        ("CI", "true".to_owned()),
        ("RUST_BACKTRACE", "1".to_owned()),
        ("INGRESSD_TEST_SCALE_MIB", options.scale_mib.to_string()),
        ("INGRESSD_BIN", "/usr/bin/ingressd".to_owned()),
        // The guests load the kTLS modules: terminated flows must take the kernel path there.
        ("INGRESSD_EXPECT_KTLS", "1".to_owned()),
    ];
    tree.write_init(&env, &suite_script(&options.test_args), true)?;
    tree.pack(&initrd)?;
    println!(
        "  initramfs {} ({} MiB) built in {:.1?}",
        initrd.display(),
        fs::metadata(&initrd)?.len() >> 20,
        started.elapsed()
    );
    let run = boot(&kernel, &initrd, &cache.join("logs"), options.timeout, true)?;
    // What the guest saw of the kernel is worth reading whether the suite passed or not.
    let mut details = String::new();
    match run.bpf.as_deref().map(program_sizes) {
        Some(Ok(sizes)) if !sizes.is_empty() => {
            let _ = write!(details, "\n                program {sizes}");
        }
        Some(Err(e)) => println!("  note: cannot read the guest's bpftool listing: {e:#}"),
        _ => println!("  note: the guest saw no sk_skb program loaded"),
    }
    match bytes_acked_offset(&run.facts) {
        Some(at) => {
            let _ = write!(details, "\n                BTF {at}");
        }
        None => println!("  note: the guest's BTF showed no tcp_sock.bytes_acked"),
    }
    if let Err(e) = run.check() {
        println!("  kernel {}:{details}", kernel.release);
        return Err(e);
    }
    let summary = format!(
        "{:<34} {:>7} (boot {:.0?}){details}",
        kernel.package,
        format!("{:.0?}", run.total),
        run.boot.unwrap_or_default()
    );
    Ok(summary)
}

/// `tcp_sock.bytes_acked at byte N of M` from the guest's BTF dump lines: the verdict program
/// reads the field at this offset, which differs between kernels.
fn bytes_acked_offset(facts: &[String]) -> Option<String> {
    let value = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let size = facts
        .iter()
        .find(|f| f.contains("STRUCT 'tcp_sock'"))
        .and_then(|f| value(f, "size="))?;
    let bits = facts
        .iter()
        .find(|f| f.contains("'bytes_acked'"))
        .and_then(|f| value(f, "bits_offset="))?;
    Some(format!(
        "tcp_sock.bytes_acked at byte {} of {size}",
        bits / 8
    ))
}

fn boot(
    kernel: &Kernel,
    initrd: &Path,
    logs: &Path,
    timeout: Duration,
    echo: bool,
) -> Result<guest::Run> {
    fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let log = logs.join(format!("{}.log", kernel.series));
    let run = guest::boot(&Boot {
        label: kernel.series,
        kernel: &kernel.vmlinuz(),
        initrd,
        log: &log,
        timeout,
        echo,
    })?;
    println!(
        "  guest ended after {:.1?} ({:?}); console log: {}",
        run.total,
        run.end,
        log.display()
    );
    Ok(run)
}

/// The guest's `/suite.sh`: the non-serial tests in parallel, then the `serial_` ones alone, as
/// `cargo xtask test` runs them on the host; or the test binary with `args`.
fn suite_script(args: &[String]) -> String {
    let bin = format!("/usr/bin/{TEST_TARGET}");
    if !args.is_empty() {
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        return format!("exec {bin} {}\n", quoted.join(" "));
    }
    format!(
        "rc=0\n\
         {bin} --skip {SERIAL_PREFIX} || rc=$?\n\
         {bin} --test-threads=1 {SERIAL_PREFIX} || rc=$?\n\
         /usr/bin/{E2E_TARGET} --test-threads=1 --show-output {E2E_FILTER} || rc=$?\n\
         exit $rc\n"
    )
}

/// Name and sizes the kernel reports after verification for each sk_skb program in a
/// `bpftool -j prog show` listing.
fn program_sizes(listing: &str) -> Result<String> {
    let progs: serde_json::Value = serde_json::from_str(listing).context("parsing the JSON")?;
    let mut out = Vec::new();
    for prog in progs.as_array().context("not a JSON array")? {
        if prog["type"] != "sk_skb" {
            continue;
        }
        let xlated = prog["bytes_xlated"].as_u64().unwrap_or(0);
        let mut line = format!(
            "{} (sk_skb): xlated {xlated} B ({} insns), jited {} B",
            prog["name"].as_str().unwrap_or("?"),
            xlated / 8,
            prog["bytes_jited"].as_u64().unwrap_or(0),
        );
        // Newer bpftool releases also show how many instructions the verifier walked.
        if let Some(verified) = prog["verified_insns"].as_u64() {
            let _ = write!(line, ", {verified} insns verified");
        }
        // Parallel tests load the same program more than once.
        if !out.contains(&line) {
            out.push(line);
        }
    }
    Ok(out.join("; "))
}

/// Proves that a failing suite fails the run: boots the 6.1 kernel (from the cache) with an
/// initramfs whose suite is `false` and expects the failure, exit status 1, to be reported.
pub fn self_check(ctx: &Ctx) -> Result<()> {
    require_tools(ctx)?;
    let cache = ctx.target_dir().join("vmtest");
    let kernel = kernel::fetch(ctx, &SERIES[0], &cache)?;
    let work = cache.join("self-check");
    let initrd = work.join("initramfs.cpio");
    let tree = Tree::new(&work.join("root"))?;
    tree.write_init(&[], "echo 'this suite fails on purpose'\nfalse\n", false)?;
    tree.pack(&initrd)?;
    let run = boot(&kernel, &initrd, &work, Duration::from_secs(5 * 60), false)?;
    if run.end != End::Exited(1) {
        bail!(
            "a guest whose suite runs `false` ended as {:?}, not with exit status 1: the kernel \
             matrix cannot be trusted; console log: {}",
            run.end,
            run.log.display()
        );
    }
    match run.check() {
        Ok(()) => bail!("a guest whose suite failed was reported as passing"),
        Err(e) => {
            println!("  ok  a failing guest fails the run, reported as:");
            for line in format!("{e:#}").lines().take(2) {
                println!("      {line}");
            }
            Ok(())
        }
    }
}

/// The test binaries and the daemon, built as `cargo xtask test` builds them (same packages,
/// targets and profile), so an earlier build is reused.
fn build_test_binaries(ctx: &Ctx) -> Result<Binaries> {
    let mut cmd = ctx.cargo();
    cmd.arg("build")
        .args(PACKAGES)
        .args(["--lib", "--bins", "--tests", "--message-format=json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("  + {}", display(&cmd));
    let out = cmd.output().context("running cargo")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    Ok(Binaries {
        splice: executable_of(&messages, TEST_TARGET)?,
        e2e: executable_of(&messages, E2E_TARGET)?,
        ingressd: artifact_of(&messages, "ingressd", "bin")?,
    })
}

/// The executable cargo's JSON messages report for the test target `target`.
fn executable_of(messages: &str, target: &str) -> Result<PathBuf> {
    artifact_of(messages, target, "test")
}

/// The executable cargo's JSON messages report for the `kind` target `target`. A `bin` target
/// also has a unit-test harness of the same name and kind (`--bins --tests` builds both); the
/// profile's `test` flag tells them apart, so a `bin` is never its test harness.
fn artifact_of(messages: &str, target: &str, kind: &str) -> Result<PathBuf> {
    let want_harness = kind == "test";
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
        })
        .filter(|m| m["profile"]["test"].as_bool() == Some(want_harness))
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo reported no executable for the {kind} `{target}`"))
}

/// Host tools the matrix runs or copies, by their usual paths (`/usr/sbin` may not be on a
/// non-root `PATH`).
fn find_tool(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    ctx.which(name)
        .or_else(|| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|p| crate::context::is_executable(p))
        })
        .with_context(|| format!("{name} is missing: cargo xtask setup --for vm installs it"))
}

fn require_tools(ctx: &Ctx) -> Result<()> {
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "cpio",
        "xz",
        "objcopy",
        "dpkg-deb",
    ] {
        find_tool(ctx, tool)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_executable_comes_from_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"ingress_daemon","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"splice","kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/splice-abc"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_of(messages, "splice").unwrap(),
            PathBuf::from("/t/debug/deps/splice-abc")
        );
        assert!(executable_of(messages, "other").is_err());
    }

    /// `--bins --tests` builds a bin twice: the program and its unit-test harness, both of kind
    /// `bin`; whichever cargo reports first, the daemon is the program.
    #[test]
    fn the_daemon_is_never_its_unit_test_harness() {
        let harness = r#"{"reason":"compiler-artifact","target":{"name":"ingressd","kind":["bin"]},"profile":{"test":true},"executable":"/t/debug/deps/ingressd-0123"}"#;
        let program = r#"{"reason":"compiler-artifact","target":{"name":"ingressd","kind":["bin"]},"profile":{"test":false},"executable":"/t/debug/ingressd"}"#;
        for messages in [
            format!("{harness}\n{program}"),
            format!("{program}\n{harness}"),
        ] {
            assert_eq!(
                artifact_of(&messages, "ingressd", "bin").unwrap(),
                PathBuf::from("/t/debug/ingressd")
            );
        }
        assert!(artifact_of(harness, "ingressd", "bin").is_err());
    }

    #[test]
    fn the_suite_runs_serial_tests_alone_and_fails_if_either_run_fails() {
        let s = suite_script(&[]);
        assert!(s.contains("--skip serial_ || rc=$?"));
        assert!(s.contains("--test-threads=1 serial_ || rc=$?"));
        assert!(s.contains("/usr/bin/e2e --test-threads=1 --show-output guest:: || rc=$?"));
        assert!(s.ends_with("exit $rc\n"));
        assert_eq!(
            suite_script(&["it's".into()]),
            "exec /usr/bin/splice 'it'\\''s'\n"
        );
    }

    #[test]
    fn the_bytes_acked_offset_comes_from_the_btf_dump() {
        let facts = [
            "[22102] STRUCT 'tcp_sock' size=2280 vlen=142".to_owned(),
            "'bytes_acked' type_id=46 bits_offset=11968".to_owned(),
        ];
        assert_eq!(
            bytes_acked_offset(&facts).as_deref(),
            Some("tcp_sock.bytes_acked at byte 1496 of 2280")
        );
        assert_eq!(bytes_acked_offset(&facts[..1]), None);
    }

    #[test]
    fn program_sizes_come_from_the_sk_skb_entries() {
        let listing = r#"[{"id":3,"type":"cgroup_skb","name":"x"},{"id":7,"type":"sk_skb","name":"verdict","tag":"ab","bytes_xlated":1200,"bytes_jited":800,"verified_insns":312},{"id":8,"type":"sk_skb","name":"verdict","tag":"ab","bytes_xlated":1200,"bytes_jited":800,"verified_insns":312}]"#;
        assert_eq!(
            program_sizes(listing).unwrap(),
            "verdict (sk_skb): xlated 1200 B (150 insns), jited 800 B, 312 insns verified"
        );
    }
}
