//! Debian kernel packages for the matrix: which one to boot, downloading and unpacking it once.
//!
//! Packages are downloaded with `apt-get download` and unpacked with `dpkg-deb -x`, never
//! installed. The bookworm series come through the host's apt sources; the trixie-backports
//! series through a private apt configuration under `target/vmtest/apt/` (its own sources list
//! and package lists, signed by the host's `debian-archive-keyring`), so the host's sources are
//! never touched. Each unpacked kernel lives in `target/vmtest/kernels/<package>/`, and a present
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
    /// Package names of the series are `<prefix><numbers><suffix>`, the numbers separated by
    /// dots (`56`, `117`, `17.13`).
    prefix: &'static str,
    suffix: &'static str,
    /// The lowest numbers a sibling may have to stand in for `pinned`.
    at_least: &'static [u32],
    /// Where apt finds it.
    pub archive: Archive,
}

/// Where a series' packages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// The host's apt sources (bookworm and bookworm-security).
    Host,
    /// A Debian suite of `deb.debian.org` the host's sources do not list, reached through a
    /// private apt configuration.
    Debian(&'static str),
}

/// Debian 12's default kernel (6.1), the 6.12 series of bookworm-security, and the newest
/// series of trixie-backports (6.17: the first kernels of the matrix that rekey kTLS, 6.14+).
/// Update `pinned` when a newer package appears (`apt-cache search linux-image-6`).
pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        pinned: "linux-image-6.1.0-56-amd64",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
        at_least: &[0],
        archive: Archive::Host,
    },
    Series {
        name: "6.12",
        pinned: "linux-image-6.12.117+deb12-amd64",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
        at_least: &[0],
        archive: Archive::Host,
    },
    // Backports move on to newer series and drop old ones: any 6.14+ kernel there stands in
    // for the pinned one, so the matrix keeps a kernel that rekeys kTLS.
    Series {
        name: "6.17",
        pinned: "linux-image-6.17.13+deb13-amd64",
        prefix: "linux-image-6.",
        suffix: "+deb13-amd64",
        at_least: &[14, 0],
        archive: Archive::Debian("trixie-backports"),
    },
];

impl Series {
    /// The numbers that order the series' packages (the ABI or patch level, or minor and
    /// patch), if `package` is one of them (flavours such as `-rt-amd64` or `-cloud-amd64`
    /// are not).
    fn number(&self, package: &str) -> Option<Vec<u32>> {
        let middle = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        let numbers = middle
            .split('.')
            .map(|part| {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                part.parse().ok()
            })
            .collect::<Option<Vec<u32>>>()?;
        (numbers.len() == self.at_least.len() && numbers.as_slice() >= self.at_least)
            .then_some(numbers)
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
    /// `ctr` on 6.12) needs no file. An entry `a|b` names one module that kernels call
    /// differently (`chacha_generic` became `chacha` in 6.15): the first this kernel has.
    pub fn modules_in_load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>> {
        let dep_path = self.modules_dir().join("modules.dep");
        let deps = fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        let builtin =
            fs::read_to_string(self.modules_dir().join("modules.builtin")).unwrap_or_default();
        let order = load_order(&deps, &resolve_names(&deps, &builtin, wanted)?)?;
        Ok(order
            .into_iter()
            .map(|rel| self.modules_dir().join(rel))
            .collect())
    }
}

/// The modules of `wanted` to load from files: for each entry, the first of its `|`
/// alternatives that `modules.dep` or `modules.builtin` lists, left out when built in.
fn resolve_names<'a>(modules_dep: &str, builtin: &str, wanted: &[&'a str]) -> Result<Vec<&'a str>> {
    let names = |list: &str| -> Vec<String> {
        list.lines()
            .filter_map(|l| l.split(':').next())
            .map(module_name)
            .collect()
    };
    let (files, builtin) = (names(modules_dep), names(builtin));
    let mut out = Vec::new();
    for entry in wanted {
        let found = entry.split('|').find_map(|name| {
            let key = name.replace('-', "_");
            if builtin.contains(&key) {
                Some(None)
            } else {
                files.contains(&key).then_some(Some(name))
            }
        });
        match found {
            Some(Some(name)) => out.push(name),
            Some(None) => {}
            None => bail!("no module {entry} in this kernel's modules.dep or modules.builtin"),
        }
    }
    Ok(out)
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
    let apt = Apt::new(series.archive, cache)?;
    let package = choose_package(ctx, &apt, series)?;
    if let Some(kernel) = cached(series, &package, &kernels)? {
        return Ok(kernel);
    }
    download_and_unpack(ctx, &apt, &package, cache)?;
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

/// apt as a series reaches its archive: the host's configuration, or a private one.
struct Apt {
    /// `-o` options for every apt command; empty for the host's configuration.
    options: Vec<String>,
    /// Whether `apt-get update` touches only files of ours (no root needed).
    private: bool,
}

/// The keyring that signs Debian's suites (bookworm's package carries trixie's keys too).
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

impl Apt {
    fn new(archive: Archive, cache: &Path) -> Result<Self> {
        let Archive::Debian(suite) = archive else {
            return Ok(Self {
                options: Vec::new(),
                private: false,
            });
        };
        if !Path::new(DEBIAN_KEYRING).exists() {
            bail!("{DEBIAN_KEYRING} is missing: apt-get install debian-archive-keyring");
        }
        let dir = std::path::absolute(cache.join("apt").join(suite))?;
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!("deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {suite} main\n"),
        )
        .with_context(|| format!("writing {}", sources.display()))?;
        let path = |p: PathBuf| p.display().to_string();
        let options = [
            ("Dir::Etc::SourceList", path(sources)),
            ("Dir::Etc::SourceParts", path(dir.join("sources.list.d"))),
            ("Dir::State::Lists", path(dir.join("lists"))),
            ("Dir::Cache", path(dir.join("cache"))),
            ("Dir::State::Status", "/dev/null".to_owned()),
            ("Acquire::Languages", "none".to_owned()),
        ]
        .into_iter()
        .flat_map(|(k, v)| ["-o".to_owned(), format!("{k}={v}")])
        .collect();
        Ok(Self {
            options,
            private: true,
        })
    }

    fn cache(&self) -> Command {
        let mut cmd = Command::new("apt-cache");
        cmd.args(&self.options);
        cmd
    }

    fn get(&self, ctx: &Ctx) -> Command {
        let mut cmd = ctx.command("apt-get");
        if ctx.is_root {
            // apt's download sandbox user cannot write into target/: run as root instead.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.args(&self.options);
        cmd
    }

    /// Whether apt can download `package` (it has a candidate version).
    fn downloadable(&self, package: &str) -> bool {
        output_if_ok(self.cache().args(["policy", package])).is_some_and(|out| {
            out.lines()
                .filter_map(|l| l.trim().strip_prefix("Candidate:"))
                .any(|c| c.trim() != "(none)")
        })
    }
}

/// The pinned package while apt still offers it; otherwise, with a warning, the newest package
/// of the series apt offers (a kernel leaving the archive must not fail the build by itself).
fn choose_package(ctx: &Ctx, apt: &Apt, series: &Series) -> Result<String> {
    let mut refreshed = false;
    loop {
        if apt.downloadable(series.pinned) {
            return Ok(series.pinned.to_owned());
        }
        let search = output_if_ok(apt.cache().args([
            "search",
            "--names-only",
            &format!("^{}", series.prefix.replace('.', "\\.")),
        ]))
        .unwrap_or_default();
        if let Some(newest) = series.newest_in(&search).filter(|p| apt.downloadable(p)) {
            println!(
                "  warning: {} is no longer in the archive; using {newest}, the newest {} kernel \
                 apt offers (update `pinned` in xtask/src/vmtest/kernel.rs)",
                series.pinned, series.name
            );
            return Ok(newest);
        }
        if refreshed || !(ctx.is_root || apt.private) {
            let archive = match series.archive {
                Archive::Host => "check that bookworm and bookworm-security are in the apt sources",
                Archive::Debian(_) => "check that deb.debian.org is reachable",
            };
            bail!(
                "apt offers no {} kernel (neither {} nor another {}<n>{}); run `apt-get update` \
                 and {archive}",
                series.name,
                series.pinned,
                series.prefix,
                series.suffix
            );
        }
        match series.archive {
            Archive::Host => println!(
                "  apt knows no {} kernel: refreshing package lists",
                series.name
            ),
            Archive::Debian(suite) => println!(
                "  fetching the package list of {suite} for the {} kernel",
                series.name
            ),
        }
        run(apt.get(ctx).args(["update", "-q"]))?;
        refreshed = true;
    }
}

/// `apt-get download`, `dpkg-deb -x`, `depmod -b`, then the rename that marks it complete.
fn download_and_unpack(ctx: &Ctx, apt: &Apt, package: &str, cache: &Path) -> Result<()> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    println!("  downloading {package} (unpacked, never installed)");
    let mut download = apt.get(ctx);
    download.current_dir(&debs).arg("download").arg("-q");
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
    merged_usr_modules(&partial)?;
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

/// Trixie's packages (merged `/usr`) ship `usr/lib/modules/`; `depmod -b` and the rest of the
/// harness look in `lib/modules/`, where bookworm's packages put them.
fn merged_usr_modules(root: &Path) -> Result<()> {
    let (merged, classic) = (root.join("usr/lib/modules"), root.join("lib/modules"));
    if classic.exists() || !merged.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(root.join("lib")).with_context(|| format!("creating {}", root.display()))?;
    fs::rename(&merged, &classic).with_context(|| format!("moving {}", merged.display()))
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
        let search = "linux-image-6.16.12+deb13-amd64 - Linux 6.16.12\n\
                      linux-image-6.17.8+deb13-amd64 - Linux 6.17.8\n\
                      linux-image-6.17.13+deb13-amd64 - Linux 6.17.13\n\
                      linux-image-6.17.14+deb13-rt-amd64 - Linux 6.17.14, PREEMPT_RT\n\
                      linux-image-6.12.57+deb13-amd64 - Linux 6.12.57\n";
        assert_eq!(
            SERIES[2].newest_in(search).as_deref(),
            Some("linux-image-6.17.13+deb13-amd64"),
            "minor before patch, numerically"
        );
        assert_eq!(
            SERIES[2].newest_in("linux-image-6.12.57+deb13-amd64 - Linux 6.12.57\n"),
            None,
            "a kernel older than 6.14 never stands in for the rekeying series"
        );
        assert_eq!(
            SERIES[2]
                .newest_in("linux-image-6.18.2+deb13-amd64 - Linux 6.18.2\n")
                .as_deref(),
            Some("linux-image-6.18.2+deb13-amd64"),
            "a newer series does, once 6.17 has left backports"
        );
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

    #[test]
    fn a_module_renamed_between_kernels_resolves_to_the_name_this_kernel_has() {
        let dep = "kernel/crypto/chacha.ko.xz:\nkernel/net/tls/tls.ko.xz:\n";
        let builtin = "kernel/crypto/ctr.ko\n";
        assert_eq!(
            resolve_names(dep, builtin, &["tls", "chacha_generic|chacha", "ctr"]).unwrap(),
            ["tls", "chacha"],
            "the second name where the first is missing; built-in ones need no file"
        );
        assert!(resolve_names(dep, builtin, &["poly1305_generic|poly1305"]).is_err());
    }
}
