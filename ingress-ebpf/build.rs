//! Rebuild the eBPF programs whenever the `bpf-linker` on PATH changes: the dependency on that
//! binary cannot be declared to cargo.
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    } else if env::var_os("CARGO_CFG_TARGET_ARCH").is_some_and(|arch| arch == "bpf") {
        println!("cargo:warning=bpf-linker is not on PATH: run `cargo xtask setup`");
    }
}
