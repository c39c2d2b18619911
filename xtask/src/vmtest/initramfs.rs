//! The guest's initramfs: static busybox, host binaries with the libraries `ldd` lists, kernel
//! modules, and an `/init` that prepares the guest, runs the suite and reports its exit code on
//! the serial console before powering off.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::context::{display, run};

/// Printed by the guest once `/init` has prepared it, before the suite starts.
pub const BEGIN_MARKER: &str = "INGRESSD-VMTEST-BEGIN";
/// Printed by the guest after the suite, followed by its exit code: `INGRESSD-VMTEST-EXIT=0`.
pub const EXIT_MARKER: &str = "INGRESSD-VMTEST-EXIT=";
/// Printed by the guest before [`EXIT_MARKER`], followed by `bpftool -j prog show` as seen
/// while the suite had programs loaded.
pub const BPF_MARKER: &str = "INGRESSD-VMTEST-BPF ";

/// Printed by the guest before [`EXIT_MARKER`], followed by a fact about the kernel the engine
/// depends on (e.g. where `tcp_sock.bytes_acked` sits, from the kernel's BTF).
pub const FACT_MARKER: &str = "INGRESSD-VMTEST-FACT ";

/// The exit code `/init` reports when preparing the guest failed.
pub const SETUP_FAILED: i32 = 125;

/// A tree that becomes the initramfs.
pub struct Tree {
    root: PathBuf,
    modules: Vec<String>,
}

impl Tree {
    /// An empty tree at `root` (anything there before is removed) holding static busybox.
    pub fn new(root: &Path) -> Result<Self> {
        if root.exists() {
            fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
        }
        for dir in [
            "bin", "dev", "etc", "lib", "proc", "root", "run", "sys", "tmp", "usr/bin", "var",
        ] {
            fs::create_dir_all(root.join(dir))
                .with_context(|| format!("creating {}", root.join(dir).display()))?;
        }
        std::os::unix::fs::symlink("../run", root.join("var/run"))?;
        let tree = Self {
            root: root.to_owned(),
            modules: Vec::new(),
        };
        let busybox = Path::new("/bin/busybox");
        if !is_static(busybox)? {
            bail!("/bin/busybox is not statically linked: apt-get install busybox-static");
        }
        tree.copy_file(busybox, "bin/busybox")?;
        Ok(tree)
    }

    fn copy_file(&self, from: &Path, to: &str) -> Result<()> {
        let dest = self.root.join(to);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::copy(from, &dest)
            .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
        Ok(())
    }

    /// Copies the executable `from` to `/usr/bin/<name>` with every library `ldd` lists; with
    /// `strip_debug`, without its debug info (test binaries carry hundreds of MiB of it).
    pub fn add_binary(&self, from: &Path, name: &str, strip_debug: bool) -> Result<()> {
        let to = format!("usr/bin/{name}");
        if strip_debug {
            let dest = self.root.join(&to);
            run(Command::new("objcopy")
                .arg("--strip-debug")
                .arg(from)
                .arg(&dest))?;
        } else {
            self.copy_file(from, &to)?;
        }
        for lib in libraries(from)? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib).to_string_lossy();
            if !self.root.join(rel.as_ref()).exists() {
                self.copy_file(&lib, &rel)?;
            }
        }
        Ok(())
    }

    /// Copies the Python interpreter `python` as `/usr/bin/python3` with the core of its
    /// standard library: the top-level modules and the packages `packages` (sources only; the
    /// guest compiles what it imports).
    pub fn add_python(&self, python: &Path, packages: &[&str]) -> Result<()> {
        let real =
            fs::canonicalize(python).with_context(|| format!("resolving {}", python.display()))?;
        let version = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.starts_with("python3."))
            .with_context(|| format!("{} is not a python3.X binary", real.display()))?;
        self.add_binary(&real, "python3", false)?;
        let stdlib = Path::new("/usr/lib").join(&version);
        let dest = format!("usr/lib/{version}");
        for entry in fs::read_dir(&stdlib).with_context(|| format!("{}", stdlib.display()))? {
            let path = entry?.path();
            // Debian's sitecustomize.py is a symlink into /etc; `exists` follows it.
            if path.extension().is_some_and(|e| e == "py") && path.exists() {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                self.copy_file(&path, &format!("{dest}/{name}"))?;
            }
        }
        for package in packages {
            self.copy_py_tree(&stdlib.join(package), &format!("{dest}/{package}"))?;
        }
        // Without it Python warns that it cannot find its platform-dependent libraries.
        fs::create_dir_all(self.root.join(format!("{dest}/lib-dynload")))?;
        Ok(())
    }

    fn copy_py_tree(&self, from: &Path, to: &str) -> Result<()> {
        for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_dir() && name != "__pycache__" {
                self.copy_py_tree(&path, &format!("{to}/{name}"))?;
            } else if path.extension().is_some_and(|e| e == "py") {
                self.copy_file(&path, &format!("{to}/{name}"))?;
            }
        }
        Ok(())
    }

    /// Adds kernel modules, loaded by `/init` in the order given; `.ko.xz` files are
    /// decompressed here because busybox `insmod` takes plain `.ko` only.
    pub fn add_modules(&mut self, modules: &[PathBuf]) -> Result<()> {
        fs::create_dir_all(self.root.join("lib/modules"))?;
        for module in modules {
            let file = module.file_name().unwrap_or_default().to_string_lossy();
            let name = file.split(".ko").next().unwrap_or(&file).to_owned();
            let dest = self.root.join(format!("lib/modules/{name}.ko"));
            if file.ends_with(".ko") {
                fs::copy(module, &dest).with_context(|| format!("copying {}", module.display()))?;
            } else if file.ends_with(".ko.xz") {
                let out = fs::File::create(&dest)?;
                let mut cmd = Command::new("xz");
                cmd.arg("-dc").arg(module).stdout(out);
                let status = cmd
                    .status()
                    .with_context(|| format!("starting `{}`", display(&cmd)))?;
                if !status.success() {
                    bail!("`{}` failed ({status})", display(&cmd));
                }
            } else {
                bail!(
                    "{}: only .ko and .ko.xz modules are handled",
                    module.display()
                );
            }
            self.modules.push(name);
        }
        Ok(())
    }

    /// Writes `/init`; `suite` is the shell script run as the suite, with `env` exported.
    pub fn write_init(&self, env: &[(&str, String)], suite: &str, probe_bpf: bool) -> Result<()> {
        let init = init_script(&self.modules, env, probe_bpf);
        write_executable(&self.root.join("init"), &init)?;
        write_executable(&self.root.join("suite.sh"), suite)
    }

    /// Packs the tree into an uncompressed `newc` cpio archive at `out` (the kernel then has
    /// nothing to decompress, which is slow under emulation).
    pub fn pack(&self, out: &Path) -> Result<()> {
        let archive =
            fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet",
        ])
        .current_dir(&self.root)
        .stdout(archive)
        .stderr(Stdio::inherit());
        let status = cmd.status().context("running find | cpio")?;
        if !status.success() {
            bail!(
                "packing {} with cpio failed ({status})",
                self.root.display()
            );
        }
        Ok(())
    }
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// `/init`: prepares the guest as a host would be, runs `/suite.sh`, reports, powers off.
fn init_script(modules: &[String], env: &[(&str, String)], probe_bpf: bool) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
# The kernel-matrix guest's init, written by `cargo xtask vmtest`.
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root
fail() {
    echo "vmtest: $*"
"#,
    );
    let _ = writeln!(s, "    echo \"{EXIT_MARKER}{SETUP_FAILED}\"");
    s.push_str(
        r#"    poweroff -f
}
mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sysfs /sys || fail "mounting /sys"
mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"
mount -t tmpfs tmpfs /tmp || fail "mounting /tmp"
mount -t tmpfs tmpfs /run || fail "mounting /run"
mount -t bpf bpf /sys/fs/bpf || fail "mounting bpffs"
"#,
    );
    for module in modules {
        let _ = writeln!(
            s,
            "insmod /lib/modules/{module}.ko || fail \"loading module {module}\""
        );
    }
    s.push_str(
        r#"ip link set lo up || fail "bringing lo up"
ulimit -n "$(cat /proc/sys/fs/nr_open)" || ulimit -n 65536 || fail "raising ulimit -n"
"#,
    );
    for (key, value) in env {
        let _ = writeln!(s, "export {key}='{value}'");
    }
    if probe_bpf {
        // The suite loads and unloads its program many times: keep the first listing that
        // shows an sk_skb program.
        s.push_str(
            r#"( while sleep 1; do
    progs=$(bpftool -j prog show 2>/dev/null)
    case "$progs" in *'"sk_skb"'*) echo "$progs" > /run/bpf-progs.json; break;; esac
done ) &
probe=$!
"#,
        );
    }
    let _ = writeln!(
        s,
        "echo \"{BEGIN_MARKER} kernel=$(uname -r) nofile=$(ulimit -n)\""
    );
    s.push_str("cd /tmp\n/bin/sh /suite.sh\nrc=$?\n");
    if probe_bpf {
        s.push_str("kill $probe 2>/dev/null\n");
        let _ = writeln!(
            s,
            "[ -s /run/bpf-progs.json ] && echo \"{BPF_MARKER}$(cat /run/bpf-progs.json)\""
        );
        // The verdict program reads tcp_sock.bytes_acked at an offset taken from this BTF.
        let _ = writeln!(
            s,
            "bpftool btf dump file /sys/kernel/btf/vmlinux 2>/dev/null | awk \
             '/^\\[[0-9]+\\] STRUCT .tcp_sock. /{{s=1; print \"{FACT_MARKER}\" $0; next}} \
             s && /^\\[/{{exit}} s && /.bytes_acked./{{print \"{FACT_MARKER}\" $0}}'"
        );
    }
    let _ = writeln!(s, "echo\necho \"{EXIT_MARKER}$rc\"\npoweroff -f");
    s
}

/// Whether `ldd` calls `path` statically linked.
fn is_static(path: &Path) -> Result<bool> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    Ok(text.contains("not a dynamic executable") || text.contains("statically linked"))
}

/// The libraries `ldd` lists for `binary`, the dynamic loader included.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if is_static(binary)? {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {text}", binary.display());
    }
    parse_ldd(&text).with_context(|| format!("libraries of {}", binary.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{} is not found", name.trim());
                }
                target
            }
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_names_libraries_and_the_loader_but_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f18)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f18)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f18)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibbpf.so.1 => not found\n").is_err());
    }

    #[test]
    fn init_reports_the_suite_exit_code_and_fails_setup_loudly() {
        let init = init_script(&["veth".into()], &[("CI", "true".into())], true);
        assert!(init.contains("insmod /lib/modules/veth.ko || fail"));
        assert!(init.contains("export CI='true'"));
        assert!(init.contains(&format!("echo \"{EXIT_MARKER}$rc\"")));
        assert!(init.contains(&format!("echo \"{EXIT_MARKER}{SETUP_FAILED}\"")));
        let begin = init.find(BEGIN_MARKER).unwrap();
        assert!(begin < init.find("/suite.sh").unwrap());
    }
}
