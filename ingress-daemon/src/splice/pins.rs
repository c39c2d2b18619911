//! Pins handed-over maps for the one moment a new program is loaded on them.
//!
//! aya 0.14 cannot load an object onto map descriptors it did not create; it can open maps
//! pinned on a bpffs (`EbpfLoader::map_pin_path`). So each received map is pinned into a fresh
//! private directory (mode 0700) on a bpffs, the object is loaded from those pins, and the
//! pins and the directory are removed again when [`PinnedMaps`] drops, on every path. The
//! caller compares the kernel ids of the loaded maps with [`PinnedMaps::ids`]: a pin that did
//! not lead to the handed-over map would make the loader create a fresh one.
//!
//! The directory is made under the first of `/sys/fs/bpf/ingressd` (prepared by the service
//! unit, where the daemon's user cannot write to `/sys/fs/bpf` itself) and `/sys/fs/bpf` that
//! exists, unless the test hook [`TEST_BPFFS_ENV`] names another; it must be on a bpffs.

use std::{
    os::{fd::AsFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::MapData;
use ingress_common::{DIRS_MAP, EVENTS_MAP, SOCK_DIR_MAP, SOCKS_MAP};

use super::ebpf::{LoadError, MapFds};
use crate::sys;

/// Environment variable of a test-only hook: the directory to pin in instead of the bpffs
/// defaults (a directory that is not on a bpffs makes the new daemon keep the previous
/// daemon's program).
pub const TEST_BPFFS_ENV: &str = "INGRESSD_TEST_BPFFS";

/// Where the private pin directory goes, in order of preference.
const PIN_ROOTS: [&str; 2] = ["/sys/fs/bpf/ingressd", "/sys/fs/bpf"];

/// The handed-over maps, pinned in a private directory; unpinned on drop.
#[derive(Debug)]
pub(crate) struct PinnedMaps {
    dir: PathBuf,
    pinned: Vec<(&'static str, PathBuf, u32)>,
}

/// The directory to make the private pin directory in.
fn pin_root(hook: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = hook {
        return dir;
    }
    PIN_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from(PIN_ROOTS[1]))
}

fn sys_err(call: &'static str) -> impl FnOnce(std::io::Error) -> LoadError {
    move |source| LoadError::Sys { call, source }
}

impl PinnedMaps {
    /// Pins the four maps into a fresh private directory.
    pub(crate) fn pin(maps: &MapFds) -> Result<Self, LoadError> {
        let root = pin_root(std::env::var_os(TEST_BPFFS_ENV).map(PathBuf::from));
        if !sys::is_bpffs(&root).map_err(sys_err("statfs pin directory"))? {
            return Err(LoadError::NoBpffs {
                path: root.display().to_string(),
            });
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = root.join(format!("takeover-{}-{nanos:09}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(sys_err("creating the pin directory"))?;
        let mut pinned = Self {
            dir,
            pinned: Vec::with_capacity(4),
        };
        for (name, fd) in [
            (SOCKS_MAP, &maps.socks),
            (SOCK_DIR_MAP, &maps.sock_dir),
            (DIRS_MAP, &maps.dirs),
            (EVENTS_MAP, &maps.events),
        ] {
            let copy = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(sys_err("dup map fd"))?;
            let data = MapData::from_fd(copy).map_err(aya::EbpfError::MapError)?;
            let id = data.info().map_err(aya::EbpfError::MapError)?.id();
            let path = pinned.dir.join(name);
            data.pin(&path).map_err(|source| LoadError::Pin {
                name,
                path: path.display().to_string(),
                source,
            })?;
            pinned.pinned.push((name, path, id));
        }
        Ok(pinned)
    }

    /// Each map's name and pin path.
    pub(crate) fn paths(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        self.pinned
            .iter()
            .map(|(name, path, _)| (*name, path.as_path()))
    }

    /// Each map's name and the kernel id of the handed-over map.
    pub(crate) fn ids(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.pinned.iter().map(|(name, _, id)| (*name, *id))
    }
}

impl Drop for PinnedMaps {
    fn drop(&mut self) {
        for (_, path, _) in &self.pinned {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "removing a map pin");
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(path = %self.dir.display(), error = %e, "removing the pin directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::pin_root;

    #[test]
    fn the_test_hook_directory_wins_over_the_bpffs_defaults() {
        assert_eq!(
            pin_root(Some(PathBuf::from("/tmp/x"))),
            PathBuf::from("/tmp/x")
        );
        let default = pin_root(None);
        assert!(default.starts_with("/sys/fs/bpf"), "{}", default.display());
    }
}
