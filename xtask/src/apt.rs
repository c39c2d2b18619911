//! Debian packages: which are installed, and installing the missing ones without starting their
//! services.
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::context::{Ctx, output_if_ok, run};

/// A Debian package this project needs, and why.
#[derive(Clone, Copy)]
pub struct Package {
    /// The package name.
    pub name: &'static str,
    /// One line saying what needs it.
    pub why: &'static str,
    /// The system service the package starts at boot, disabled again on systemd hosts because
    /// tests start their own servers.
    pub service: Option<&'static str>,
}

/// The packages of `wanted` that are not installed, according to dpkg.
pub fn missing<'a>(wanted: &[&'a Package]) -> Result<Vec<&'a Package>> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(wanted.iter().map(|p| p.name))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    // dpkg-query exits 1 when a package is unknown but still lists the known ones.
    let out = cmd
        .output()
        .context("running dpkg-query (is this a Debian system?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = installed_from_dpkg_query(&stdout);
    Ok(wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(p.name))
        .collect())
}

fn installed_from_dpkg_query(stdout: &str) -> BTreeSet<&str> {
    stdout
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            status.starts_with("ii").then_some(name)
        })
        .collect()
}

/// The shell command that installs `packages`, for error messages.
pub fn install_hint(packages: &[&Package]) -> String {
    let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
    format!(
        "sudo apt-get update && sudo apt-get install -y {}",
        names.join(" ")
    )
}

/// Installs `packages` with apt-get, refreshing the package lists first when one of them is
/// unknown, and keeping their services from starting.
pub fn install(ctx: &Ctx, packages: &[&Package]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !ctx.is_root {
        bail!(
            "missing Debian packages {}; install them with: {}",
            names(packages),
            install_hint(packages)
        );
    }
    for p in packages {
        println!("  installing {}: {}", p.name, p.why);
    }
    let unknown: Vec<&str> = packages
        .iter()
        .map(|p| p.name)
        .filter(|name| !is_known(name))
        .collect();
    let refreshed = !unknown.is_empty();
    if refreshed {
        println!(
            "  apt does not know {} yet: refreshing package lists",
            unknown.join(", ")
        );
        run(ctx.command("apt-get").args(["update", "-q"]))?;
        let still: Vec<&str> = unknown.into_iter().filter(|n| !is_known(n)).collect();
        if !still.is_empty() {
            bail!(
                "apt has no package {} even after `apt-get update`; on Debian 12 llvm-22 comes \
                 from bookworm-security: make sure /etc/apt/sources.list.d/ lists it",
                still.join(", ")
            );
        }
    }
    let _hold = ServiceHold::new()?;
    let apt_install = || {
        run(ctx
            .command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages.iter().map(|p| p.name)))
    };
    let mut result = apt_install();
    if result.is_err() && !refreshed {
        // Package lists older than the mirror name files it no longer has (404): refresh, retry.
        println!("  the install failed: refreshing package lists and trying once more");
        result = run(ctx.command("apt-get").args(["update", "-q"])).and_then(|()| apt_install());
    }
    result
        .with_context(|| format!("installing {}: {}", names(packages), install_hint(packages)))?;
    disable_services(ctx, packages)
}

fn names(packages: &[&Package]) -> String {
    packages
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_known(name: &str) -> bool {
    output_if_ok(Command::new("apt-cache").args(["show", "--no-all-versions", name]))
        .is_some_and(|out| !out.trim().is_empty())
}

/// On a systemd host, packages enable their service for the next boot even when policy-rc.d kept
/// it from starting now: disable the services of the packages we just installed.
fn disable_services(ctx: &Ctx, packages: &[&Package]) -> Result<()> {
    if !Path::new("/run/systemd/system").exists() {
        return Ok(());
    }
    let services: Vec<&str> = packages.iter().filter_map(|p| p.service).collect();
    if services.is_empty() {
        return Ok(());
    }
    println!(
        "  disabling {} at boot: the tests start their own servers",
        services.join(", ")
    );
    run(ctx
        .command("systemctl")
        .args(["disable", "--quiet"])
        .args(&services))
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Keeps package maintainer scripts from starting services while it lives, with the
/// `policy-rc.d` convention (exit 101 = "action forbidden"); a policy already in place is left
/// alone.
struct ServiceHold {
    created: bool,
}

impl ServiceHold {
    fn new() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        println!("  holding services from starting during the install ({POLICY_RC_D})");
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# written by cargo xtask setup; removed after the install\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {POLICY_RC_D}"))?;
        Ok(Self { created: true })
    }
}

impl Drop for ServiceHold {
    fn drop(&mut self) {
        if self.created
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("  warning: could not remove {POLICY_RC_D}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fully_installed_packages_count() {
        let out = "curl ii \nredis-server un \nopenssl ii \nbpftool rc \n";
        let installed = installed_from_dpkg_query(out);
        assert_eq!(
            installed.into_iter().collect::<Vec<_>>(),
            ["curl", "openssl"]
        );
    }
}
