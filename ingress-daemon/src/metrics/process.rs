//! Process metrics read at scrape time: descriptors, resident memory, CPU time, start time.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::sys;

/// What the process uses now; a field is `None` when it cannot be read.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessSample {
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft descriptor limit.
    pub max_fds: Option<u64>,
    /// Resident memory, bytes.
    pub resident_bytes: Option<u64>,
    /// User plus system CPU seconds.
    pub cpu_seconds: Option<f64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessSample {
    /// Reads the sample (a directory listing, one small `/proc` file, two system calls).
    pub fn read(started: SystemTime) -> Self {
        Self {
            open_fds: sys::open_fd_count().ok().map(|n| n as u64),
            max_fds: sys::nofile_limit().ok().map(|(soft, _)| soft),
            resident_bytes: resident_bytes(),
            cpu_seconds: sys::cpu_time().ok().map(|d| d.as_secs_f64()),
            start_time_seconds: started
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}
