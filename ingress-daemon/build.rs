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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ingress-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
