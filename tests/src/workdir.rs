//! Temporary directories for daemons and servers, kept (and named on stderr) when the test that
//! owns them fails, so their logs and state can be inspected.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    thread,
};

use tempfile::TempDir;

use crate::error::{IoContext as _, Result};

/// A temporary directory removed on drop unless the thread is panicking (a failing test).
pub struct WorkDir {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl WorkDir {
    /// A new directory `$TMPDIR/<prefix>XXXXXX`, mode 0755 so servers that run as another user
    /// (postgres) can reach the files prepared for them.
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .ctx(|| format!("creating a temporary directory {prefix}*"))?;
        let path = dir.path().to_path_buf();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .ctx(|| format!("chmod {}", path.display()))?;
        Ok(Self {
            dir: Some(dir),
            path,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("kept {} for diagnosis", kept.display());
        }
    }
}
