//! Builds the eBPF programs (`ingress-ebpf`) with the nightly toolchain and bpf-linker, into
//! `OUT_DIR`, where `splice::ebpf` embeds them.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("the daemon crate has no parent directory"))?
        .join("ingress-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    println!("cargo:rerun-if-changed=../ingress-common/src");
    git_commit();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ingress-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Exposes the commit being built as `INGRESSD_GIT_COMMIT` (for `ingressd_build_info`), from
/// the environment variable of that name if set, else from git; nothing outside a checkout.
/// Reruns when HEAD moves, so the commit is never stale.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=INGRESSD_GIT_COMMIT");
    if let Ok(commit) = std::env::var("INGRESSD_GIT_COMMIT") {
        println!("cargo:rustc-env=INGRESSD_GIT_COMMIT={commit}");
        return;
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
            && let Some(common) = git(&["rev-parse", "--git-common-dir"])
        {
            println!("cargo:rerun-if-changed={common}/{branch}");
            println!("cargo:rerun-if-changed={common}/packed-refs");
        }
    }
    println!("cargo:rustc-env=INGRESSD_GIT_COMMIT={commit}");
}
