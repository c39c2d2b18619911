//! Durable record storage: one JSON file per record under the data directory.
//!
//! Design: `<data_dir>/<kind>/<key>.json` holds `{"version": 1, "record": {...}}`. Writes go to a
//! temporary file in the same directory, are fsynced, renamed over the target, and the directory
//! is fsynced, so a crash leaves either the old or the new record, never a torn one. Loading
//! reads every `*.json` file of a kind; a file that cannot be read, parsed or understood is
//! returned as a [`FailedRecord`] (and logged), left on disk untouched, and never stops the
//! other files from loading. Temporary files (leading dot) are ignored.
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The record format version written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record could not be serialised.
    #[error("encoding {path}: {source}")]
    Encode {
        /// The target file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A record key would not make a safe file name.
    #[error("record key {0:?} is not a safe file name")]
    BadKey(String),
}

/// The kinds of record, each in its own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `tcp-ingresses/{id}.json`
    TcpIngress,
    /// `instances/{name}.json`
    Instance,
    /// `port-claims/{port}.json`
    PortClaim,
    /// `certificates/{name}.json` (mode 0600: holds the private key)
    Certificate,
}

impl Kind {
    /// Every kind, in load order (dependencies first).
    pub const ALL: [Self; 4] = [
        Self::Instance,
        Self::Certificate,
        Self::PortClaim,
        Self::TcpIngress,
    ];

    /// The directory name under the data dir.
    pub fn dir(self) -> &'static str {
        match self {
            Self::TcpIngress => "tcp-ingresses",
            Self::Instance => "instances",
            Self::PortClaim => "port-claims",
            Self::Certificate => "certificates",
        }
    }

    fn mode(self) -> u32 {
        match self {
            Self::Certificate => 0o600,
            _ => 0o644,
        }
    }
}

/// A record file that could not be loaded or applied; it stays on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FailedRecord {
    /// The file, relative to the data dir.
    pub path: String,
    /// Why it was not loaded.
    pub reason: String,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    version: u32,
    record: &'a T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeIn<T> {
    #[expect(dead_code, reason = "checked first through VersionOnly")]
    version: u32,
    record: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// The record files under one data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { op, path, source }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !key.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_owned()))
    }
}

/// A plain file name in the data directory: like a record key, with dots after the first byte.
fn check_file_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(name.to_owned()))
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// Creates `dir` and any missing parents; after each directory it creates, fsyncs the parent
/// that now names it, so a crash cannot lose a directory a record was then written into.
fn create_dir_durably(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_durably(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        // Created meanwhile by someone else, who is responsible for its durability.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io("creating", dir)(e)),
    }
}

/// Replaces `dir/name` with `bytes`: a temporary file in `dir`, fsynced, renamed over the
/// target, then `dir` fsynced, so a crash leaves the old or the new file, never a torn one.
fn write_durably(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io("writing", &path));
    if let Err(e) = written {
        // The temp file is ours and incomplete; the target is untouched.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

impl Store {
    /// Opens (creating if needed) the data directory and one directory per kind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for kind in Kind::ALL {
            create_dir_durably(&root.join(kind.dir()))?;
        }
        Ok(Self { root })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding a record.
    pub fn path(&self, kind: Kind, key: &str) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{key}.json"))
    }

    /// Writes a record durably (temp file, fsync, rename, fsync directory).
    pub fn put<T: Serialize>(&self, kind: Kind, key: &str, record: &T) -> Result<(), StoreError> {
        check_key(key)?;
        let dir = self.root.join(kind.dir());
        let path = self.path(kind, key);
        let mut bytes = serde_json::to_vec_pretty(&EnvelopeOut {
            version: FORMAT_VERSION,
            record,
        })
        .map_err(|source| StoreError::Encode {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        write_durably(&dir, &format!("{key}.json"), &bytes, kind.mode())
    }

    /// Writes `<data_dir>/<name>` durably and atomically (temp file, fsync, rename, fsync
    /// directory), mode 0644: for files other programs read, such as the bound API address.
    pub fn write_file(&self, name: &str, contents: &[u8]) -> Result<(), StoreError> {
        check_file_name(name)?;
        write_durably(&self.root, name, contents, 0o644)
    }

    /// Removes `<data_dir>/<name>`; a missing file is not an error.
    pub fn remove_file(&self, name: &str) -> Result<(), StoreError> {
        check_file_name(name)?;
        let path = self.root.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }

    /// Removes a record durably; removing a missing record is not an error.
    pub fn delete(&self, kind: Kind, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let path = self.path(kind, key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("removing", &path)(e)),
        }
        sync_dir(&self.root.join(kind.dir()))
    }

    /// Loads every record of a kind, sorted by key; failures are returned, logged and kept.
    pub fn load_all<T: DeserializeOwned>(
        &self,
        kind: Kind,
    ) -> (Vec<(String, T)>, Vec<FailedRecord>) {
        let dir = self.root.join(kind.dir());
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                failed.push(self.failure(&dir, format!("cannot list directory: {e}")));
                return (loaded, failed);
            }
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            match read_record(&path) {
                Ok(record) if check_key(key).is_ok() => loaded.push((key.to_owned(), record)),
                Ok(_) => failed.push(self.failure(&path, "file name is not a record key".into())),
                Err(reason) => failed.push(self.failure(&path, reason)),
            }
        }
        (loaded, failed)
    }

    /// Builds (and logs) a failure report for a file under the data dir.
    pub fn failure(&self, path: &Path, reason: String) -> FailedRecord {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let rec = FailedRecord {
            path: rel.display().to_string(),
            reason,
        };
        tracing::warn!(path = %rec.path, reason = %rec.reason, "record not loaded; file kept");
        rec
    }
}

fn read_record<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let version: VersionOnly =
        serde_json::from_slice(&bytes).map_err(|e| format!("corrupt or truncated: {e}"))?;
    if version.version != FORMAT_VERSION {
        return Err(format!(
            "unsupported format version {} (this build reads {FORMAT_VERSION})",
            version.version
        ));
    }
    let env: EnvelopeIn<T> =
        serde_json::from_slice(&bytes).map_err(|e| format!("invalid record: {e}"))?;
    Ok(env.record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rec {
        a: u32,
    }

    fn tmp_store(tag: &str) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "ingressd-store-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        (Store::open(&dir).unwrap(), dir)
    }

    #[test]
    fn put_load_delete_round_trip() {
        let (store, dir) = tmp_store("rt");
        store.put(Kind::Instance, "b", &Rec { a: 2 }).unwrap();
        store.put(Kind::Instance, "a", &Rec { a: 1 }).unwrap();
        store.put(Kind::Instance, "a", &Rec { a: 3 }).unwrap();
        let (ok, failed) = store.load_all::<Rec>(Kind::Instance);
        assert!(failed.is_empty());
        assert_eq!(
            ok,
            vec![("a".into(), Rec { a: 3 }), ("b".into(), Rec { a: 2 })]
        );
        let text = std::fs::read_to_string(store.path(Kind::Instance, "a")).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        store.delete(Kind::Instance, "a").unwrap();
        store.delete(Kind::Instance, "a").unwrap();
        assert_eq!(store.load_all::<Rec>(Kind::Instance).0.len(), 1);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.join("instances")).unwrap().collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn open_creates_missing_parents_and_reopens() {
        let top = std::env::temp_dir().join(format!(
            "ingressd-store-nested-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let root = top.join("a").join("b");
        let store = Store::open(&root).unwrap();
        for kind in Kind::ALL {
            assert!(root.join(kind.dir()).is_dir(), "{}", kind.dir());
        }
        store.put(Kind::Instance, "x", &Rec { a: 1 }).unwrap();
        let again = Store::open(&root).unwrap();
        assert_eq!(
            again.load_all::<Rec>(Kind::Instance).0,
            vec![("x".into(), Rec { a: 1 })]
        );
        std::fs::remove_dir_all(top).unwrap();
    }

    #[test]
    fn certificates_are_private() {
        let (store, dir) = tmp_store("mode");
        store.put(Kind::Certificate, "c", &Rec { a: 1 }).unwrap();
        let mode = std::fs::metadata(store.path(Kind::Certificate, "c"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_records_are_reported_kept_and_do_not_stop_others() {
        let (store, dir) = tmp_store("corrupt");
        store.put(Kind::PortClaim, "80", &Rec { a: 80 }).unwrap();
        store.put(Kind::PortClaim, "81", &Rec { a: 81 }).unwrap();
        let full = std::fs::read(store.path(Kind::PortClaim, "81")).unwrap();
        let truncated = &full[..full.len() / 2];
        std::fs::write(store.path(Kind::PortClaim, "81"), truncated).unwrap();
        std::fs::write(
            store.path(Kind::PortClaim, "82"),
            b"{\"version\": 9, \"record\": {}}",
        )
        .unwrap();
        std::fs::write(
            store.path(Kind::PortClaim, "83"),
            b"{\"version\": 1, \"record\": {\"b\": 1}}",
        )
        .unwrap();
        std::fs::write(store.path(Kind::PortClaim, "bad key!"), b"{}").unwrap();
        std::fs::write(dir.join("port-claims/.84.json.1.tmp"), b"partial").unwrap();
        let (ok, failed) = store.load_all::<Rec>(Kind::PortClaim);
        assert_eq!(ok, vec![("80".into(), Rec { a: 80 })]);
        let reasons: Vec<_> = failed
            .iter()
            .map(|f| (f.path.as_str(), f.reason.split(':').next().unwrap()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("port-claims/81.json", "corrupt or truncated"),
                (
                    "port-claims/82.json",
                    "unsupported format version 9 (this build reads 1)"
                ),
                ("port-claims/83.json", "invalid record"),
                ("port-claims/bad key!.json", "corrupt or truncated"),
            ]
        );
        // Nothing was deleted or rewritten.
        assert_eq!(
            std::fs::read(store.path(Kind::PortClaim, "81")).unwrap(),
            truncated
        );
        assert!(dir.join("port-claims/.84.json.1.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plain_files_are_replaced_whole_and_removed() {
        let (store, dir) = tmp_store("files");
        store.write_file("api.addr", b"127.0.0.1:1\n").unwrap();
        store.write_file("api.addr", b"127.0.0.1:2\n").unwrap();
        let path = dir.join("api.addr");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "127.0.0.1:2\n");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        store.remove_file("api.addr").unwrap();
        store.remove_file("api.addr").unwrap();
        assert!(!path.exists());
        for bad in ["", "../x", "a/b", ".hidden", "-x"] {
            assert!(
                matches!(store.write_file(bad, b""), Err(StoreError::BadKey(_))),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unsafe_keys_are_refused() {
        let (store, dir) = tmp_store("keys");
        for key in ["", "../x", "a/b", ".hidden", "-x"] {
            assert!(
                matches!(
                    store.put(Kind::Instance, key, &Rec { a: 1 }),
                    Err(StoreError::BadKey(_))
                ),
                "{key}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
