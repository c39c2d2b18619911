//! Debian kernel packages for the matrix: which one to boot, downloading and unpacking it once.
//!
//! Packages are downloaded with `apt-get download` and unpacked with `dpkg-deb -x`, never
//! installed. Each unpacked kernel lives in `target/vmtest/kernels/<package>/`, and a present
//! directory means nothing is downloaded. The directory appears by rename once unpacking and
//! `depmod` have finished, so an interrupted run leaves no half-unpacked kernel behind.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::context::{Ctx, output_if_ok, run};

/// A kernel series of the matrix: the package pinned for it and how its siblings are named.
#[derive(Debug)]
pub struct Series {
    /// How `--kernel` names it.
    pub name: &'static str,
    /// The newest package of the series known when this list was last updated.
    pub pinned: &'static str,
    /// Package names of the series are `<prefix><number><suffix>`.
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's default kernel (6.1) and the 6.12 series of bookworm-security.
/// Update `pinned` when a newer package appears (`apt-cache search linux-image-6`).
pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        pinned: "linux-image-6.1.0-56-amd64",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.12",
        pinned: "linux-image-6.12.117+deb12-amd64",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

impl Series {
    /// The number that orders the series' packages (the ABI or patch level), if `package` is
    /// one of them (flavours such as `-rt-amd64` or `-cloud-amd64` are not).
    fn number(&self, package: &str) -> Option<u32> {
        let middle = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        middle.parse().ok()
    }

    /// The newest package of the series among `apt-cache search` output lines.
    fn newest_in(&self, search: &str) -> Option<String> {
        search
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter_map(|name| Some((self.number(name)?, name)))
            .max()
            .map(|(_, name)| name.to_owned())
    }
}

/// An unpacked kernel package.
#[derive(Debug)]
pub struct Kernel {
    /// The series it stands for.
    pub series: &'static str,
    /// The Debian package it came from.
    pub package: String,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The unpacked package.
    root: PathBuf,
}

impl Kernel {
    /// The bootable image.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// `lib/modules/<release>`, with a `modules.dep` written by `depmod`.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib").join("modules").join(&self.release)
    }

    /// The module files to load for `wanted` (names as `modprobe` takes them), dependencies
    /// first, each once; a wanted module this kernel has built in (`modules.builtin`, e.g.
    /// `ctr` on 6.12) needs no file.
    pub fn modules_in_load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>> {
        let dep_path = self.modules_dir().join("modules.dep");
        let deps = fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        let builtin =
            fs::read_to_string(self.modules_dir().join("modules.builtin")).unwrap_or_default();
        let builtin: Vec<String> = builtin.lines().map(module_name).collect();
        let wanted: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !builtin.contains(&w.replace('-', "_")))
            .collect();
        let order = load_order(&deps, &wanted)?;
        Ok(order
            .into_iter()
            .map(|rel| self.modules_dir().join(rel))
            .collect())
    }
}

/// The module name a `modules.dep` path stands for: `kernel/drivers/net/veth.ko.xz` → `veth`,
/// with `-` and `_` the same, as `modprobe` treats them.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Paths (relative to the modules directory) to load for `wanted`, dependencies first. In
/// `modules.dep`, a module's line lists what it needs with the deepest dependency last; `modprobe`
/// loads the list from its end.
fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut order: Vec<String> = Vec::new();
    for want in wanted {
        let want_name = want.replace('-', "_");
        let Some((module, needs)) = modules_dep.lines().find_map(|line| {
            let (module, needs) = line.split_once(':')?;
            (module_name(module) == want_name).then_some((module, needs))
        }) else {
            bail!("module {want} is not in this kernel's modules.dep");
        };
        for path in needs
            .split_whitespace()
            .rev()
            .chain(std::iter::once(module))
        {
            if !order.iter().any(|p| p == path) {
                order.push(path.to_owned());
            }
        }
    }
    Ok(order)
}

/// The kernel of `series`, downloaded and unpacked under `cache` unless it already is there.
pub fn fetch(ctx: &Ctx, series: &'static Series, cache: &Path) -> Result<Kernel> {
    let kernels = cache.join("kernels");
    if let Some(kernel) = cached(series, series.pinned, &kernels)? {
        return Ok(kernel);
    }
    let package = choose_package(ctx, series)?;
    if let Some(kernel) = cached(series, &package, &kernels)? {
        return Ok(kernel);
    }
    download_and_unpack(ctx, &package, cache)?;
    cached(series, &package, &kernels)?
        .with_context(|| format!("{package} was unpacked but is not where it should be"))
}

fn cached(series: &'static Series, package: &str, kernels: &Path) -> Result<Option<Kernel>> {
    let root = kernels.join(package);
    if !root.is_dir() {
        return Ok(None);
    }
    let release = release_of(&root)?;
    Ok(Some(Kernel {
        series: series.name,
        package: package.to_owned(),
        release,
        root,
    }))
}

/// The one `lib/modules/<release>` directory of an unpacked kernel package.
fn release_of(root: &Path) -> Result<String> {
    let dir = root.join("lib").join("modules");
    let mut releases = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    match (releases.next(), releases.next()) {
        (Some(release), None) => Ok(release),
        _ => bail!(
            "{} should hold exactly one kernel release; delete {} to fetch it again",
            dir.display(),
            root.display()
        ),
    }
}

/// Whether apt can download `package` (it has a candidate version).
fn downloadable(package: &str) -> bool {
    output_if_ok(Command::new("apt-cache").args(["policy", package])).is_some_and(|out| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Candidate:"))
            .any(|c| c.trim() != "(none)")
    })
}

/// The pinned package while apt still offers it; otherwise, with a warning, the newest package
/// of the series apt offers (a kernel leaving the archive must not fail the build by itself).
fn choose_package(ctx: &Ctx, series: &Series) -> Result<String> {
    let mut refreshed = false;
    loop {
        if downloadable(series.pinned) {
            return Ok(series.pinned.to_owned());
        }
        let search = output_if_ok(Command::new("apt-cache").args([
            "search",
            "--names-only",
            &format!("^{}", series.prefix.replace('.', "\\.")),
        ]))
        .unwrap_or_default();
        if let Some(newest) = series.newest_in(&search).filter(|p| downloadable(p)) {
            println!(
                "  warning: {} is no longer in the archive; using {newest}, the newest {} kernel \
                 apt offers (update `pinned` in xtask/src/vmtest/kernel.rs)",
                series.pinned, series.name
            );
            return Ok(newest);
        }
        if refreshed || !ctx.is_root {
            bail!(
                "apt offers no {} kernel (neither {} nor another {}<n>{}); run `apt-get update` \
                 and check that bookworm and bookworm-security are in the apt sources",
                series.name,
                series.pinned,
                series.prefix,
                series.suffix
            );
        }
        println!(
            "  apt knows no {} kernel: refreshing package lists",
            series.name
        );
        run(ctx.command("apt-get").args(["update", "-q"]))?;
        refreshed = true;
    }
}

/// `apt-get download`, `dpkg-deb -x`, `depmod -b`, then the rename that marks it complete.
fn download_and_unpack(ctx: &Ctx, package: &str, cache: &Path) -> Result<()> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    println!("  downloading {package} (unpacked, never installed)");
    let mut download = ctx.command("apt-get");
    download.current_dir(&debs).arg("download").arg("-q");
    if ctx.is_root {
        // apt's download sandbox user cannot write into target/: download as root instead.
        download.args(["-o", "APT::Sandbox::User=root"]);
    }
    run(download.arg(package))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
            })
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;

    let kernels = cache.join("kernels");
    let partial = kernels.join(format!("{package}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let release = release_of(&partial)?;
    // Debian's postinst runs depmod; the package itself carries no modules.dep.
    run(Command::new(depmod()?)
        .arg("-b")
        .arg(&partial)
        .arg(&release))?;
    fs::rename(&partial, kernels.join(package))
        .with_context(|| format!("moving {} into place", partial.display()))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    Ok(())
}

/// `depmod` lives in `/usr/sbin`, which a non-root `PATH` often lacks.
fn depmod() -> Result<PathBuf> {
    ["/usr/sbin/depmod", "/sbin/depmod"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("depmod is missing: apt-get install kmod")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_of_a_series_wins_and_flavours_do_not_count() {
        let search = "linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                      linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                      linux-image-6.1.0-57-rt-amd64 - Linux 6.1 for 64-bit PCs, PREEMPT_RT\n\
                      linux-image-6.1.0-58-amd64-unsigned - Linux 6.1 for 64-bit PCs\n\
                      linux-image-6.1.0-56-cloud-amd64 - Linux 6.1 for x86-64 cloud\n";
        assert_eq!(
            SERIES[0].newest_in(search).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let search = "linux-image-6.12.9+deb12-amd64 - Linux 6.12\n\
                      linux-image-6.12.117+deb12-amd64 - Linux 6.12\n\
                      linux-image-6.12.118+deb12-cloud-amd64 - Linux 6.12\n\
                      linux-image-6.12-amd64 - Linux for 64-bit PCs (meta-package)\n";
        assert_eq!(
            SERIES[1].newest_in(search).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(SERIES[1].newest_in(""), None);
    }

    #[test]
    fn the_pinned_packages_belong_to_their_series() {
        for series in SERIES {
            assert!(series.number(series.pinned).is_some(), "{series:?}");
        }
    }

    #[test]
    fn modules_load_dependencies_first_and_once() {
        let dep = "kernel/net/tls/tls.ko.xz:\n\
                   kernel/crypto/gcm.ko.xz: kernel/crypto/ghash-generic.ko.xz kernel/crypto/gf128mul.ko.xz\n\
                   kernel/crypto/ghash-generic.ko.xz: kernel/crypto/gf128mul.ko.xz\n\
                   kernel/drivers/net/veth.ko:\n";
        assert_eq!(
            load_order(dep, &["veth", "gcm", "ghash-generic"]).unwrap(),
            [
                "kernel/drivers/net/veth.ko",
                "kernel/crypto/gf128mul.ko.xz",
                "kernel/crypto/ghash-generic.ko.xz",
                "kernel/crypto/gcm.ko.xz",
            ]
        );
        assert!(load_order(dep, &["nope"]).is_err());
    }
}
