//! CPU and memory from `/proc`: system-wide busy time (so in-kernel work such as the sockmap
//! kworkers and softirqs counts), a process tree's own CPU time and resident memory, and the
//! CPU other user processes took meanwhile (the machine is shared: builds running beside a
//! benchmark would otherwise be charged to it).
use std::{collections::HashMap, fs};

use anyhow::{Context as _, Result};

/// Clock ticks per second of `/proc/stat` and `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 by the
/// Linux ABI).
const USER_HZ: f64 = 100.0;

/// `PF_KTHREAD` in the `flags` field of `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// System-wide busy time in seconds: user, nice, system, irq, softirq and steal of every CPU
/// (idle and iowait excluded).
pub fn system_busy_s() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_system_busy(&stat).context("no cpu line in /proc/stat")
}

fn parse_system_busy(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| f.get(*i))
        .sum::<u64>();
    Some(busy as f64 / USER_HZ)
}

/// The fields of `/proc/<pid>/stat` a benchmark needs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ProcStat {
    ppid: u32,
    flags: u64,
    /// utime + stime of the process (all its threads), in ticks.
    own_ticks: u64,
    /// cutime + cstime: reaped children, in ticks.
    children_ticks: u64,
}

fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|x| x.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(num(4)?).ok()?,
        flags: num(9)?,
        own_ticks: num(14)? + num(15)?,
        children_ticks: num(16)? + num(17)?,
    })
}

fn read_proc_stat(pid: u32) -> Option<ProcStat> {
    parse_proc_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid` and all its live descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while let Some(p) = all.get(i).copied() {
        i += 1;
        let tasks = fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// CPU seconds used by `pid`'s tree: every live member's threads plus the children it reaped.
pub fn tree_cpu_s(pid: u32) -> f64 {
    process_tree(pid)
        .into_iter()
        .filter_map(read_proc_stat)
        .map(|s| s.own_ticks + s.children_ticks)
        .sum::<u64>() as f64
        / USER_HZ
}

/// Resident memory of `pid`'s tree in bytes (`VmRSS`, summed over its processes, so an nginx
/// master and its workers count together).
pub fn tree_rss_bytes(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| parse_vm_rss(&s))
        .sum()
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// CPU time of every user-space process, for subtracting what processes outside the benchmark
/// used during an interval. Kernel threads are left out: the kworkers and softirq threads do
/// the benchmark's in-kernel work.
#[derive(Clone, Debug, Default)]
pub struct ForeignCpu {
    ticks: HashMap<u32, u64>,
}

impl ForeignCpu {
    /// Reads every process except those in `ours` (and their descendants).
    pub fn snapshot(ours: &[u32]) -> Self {
        let mut ours_all: Vec<u32> = ours.iter().flat_map(|p| process_tree(*p)).collect();
        ours_all.sort_unstable();
        let mut ticks = HashMap::new();
        let Ok(dir) = fs::read_dir("/proc") else {
            return Self { ticks };
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if ours_all.binary_search(&pid).is_ok() {
                continue;
            }
            let Some(stat) = read_proc_stat(pid) else {
                continue;
            };
            if stat.flags & PF_KTHREAD != 0 || stat.ppid == 2 || pid == 2 {
                continue;
            }
            ticks.insert(pid, stat.own_ticks + stat.children_ticks);
        }
        Self { ticks }
    }

    /// Seconds other processes used between `self` and `later`: the sum of every process's own
    /// and reaped-children time at the end, minus the same sum at the start. A process that
    /// appeared counts whole (it started within the interval); one that ended is counted by its
    /// parent's reaped-children time, which includes what it used before the interval — its
    /// share in the start sum takes that back out.
    pub fn seconds_until(&self, later: &Self) -> f64 {
        let start: u64 = self.ticks.values().sum();
        let end: u64 = later.ticks.values().sum();
        end.saturating_sub(start) as f64 / USER_HZ
    }
}

/// A CPU reading at one instant: system busy time, the proxy's tree, and everyone else.
#[derive(Clone, Debug)]
pub struct CpuMark {
    system_s: f64,
    proxy_s: f64,
    foreign: ForeignCpu,
}

/// CPU used between two marks, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUsed {
    /// System-wide busy time (all CPUs), minus what unrelated processes used.
    pub system_s: f64,
    /// System-wide busy time as `/proc/stat` reports it.
    pub system_raw_s: f64,
    /// The proxy's own processes and threads.
    pub proxy_s: f64,
    /// Unrelated user-space processes (other builds on a shared machine).
    pub foreign_s: f64,
}

impl CpuMark {
    /// Reads the counters now; `proxy` is the proxy's PID (none for a direct connection),
    /// `ours` every process of the benchmark (excluded from the foreign share).
    pub fn now(proxy: Option<u32>, ours: &[u32]) -> Result<Self> {
        Ok(Self {
            system_s: system_busy_s()?,
            proxy_s: proxy.map_or(0.0, tree_cpu_s),
            foreign: ForeignCpu::snapshot(ours),
        })
    }

    /// What was used from `self` until `later`.
    pub fn until(&self, later: &Self) -> CpuUsed {
        let raw = (later.system_s - self.system_s).max(0.0);
        let foreign = self.foreign.seconds_until(&later.foreign);
        CpuUsed {
            system_s: (raw - foreign).max(0.0),
            system_raw_s: raw,
            proxy_s: (later.proxy_s - self.proxy_s).max(0.0),
            foreign_s: foreign,
        }
    }
}

impl std::ops::Add for CpuUsed {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            system_s: self.system_s + o.system_s,
            system_raw_s: self.system_raw_s + o.system_raw_s,
            proxy_s: self.proxy_s + o.proxy_s,
            foreign_s: self.foreign_s + o.foreign_s,
        }
    }
}

/// The machine, for the report: CPU count, model, kernel.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// `model name` of `/proc/cpuinfo`.
    pub model: String,
    /// `uname -r`.
    pub kernel: String,
    /// Load average over one minute when the run started.
    pub load_1m_at_start: f64,
}

impl Machine {
    /// Reads the machine's description.
    pub fn describe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model,
            kernel,
            load_1m_at_start: load_1m(),
        }
    }
}

/// The one-minute load average.
pub fn load_1m() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_skips_idle_and_iowait() {
        let stat = "cpu  100 5 50 9000 40 3 2 1 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_system_busy(stat), Some(1.61));
    }

    #[test]
    fn proc_stat_survives_parentheses_in_the_name() {
        let stat = "42 (a) b (c)) S 7 42 42 0 -1 4194560 10 0 0 0 120 30 4 6 20 0 3 0 1 2 3";
        let s = parse_proc_stat(stat).unwrap();
        assert_eq!(
            (s.ppid, s.flags, s.own_ticks, s.children_ticks),
            (7, 4_194_560, 150, 10)
        );
    }

    #[test]
    fn vm_rss_in_bytes() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t  1024 kB\n"), Some(1 << 20));
    }

    #[test]
    fn a_child_reaped_during_the_interval_counts_only_its_time_in_it() {
        // Parent 1 (10 ticks) and child 2 (50 ticks, 40 of them before the interval); the
        // child exits and is reaped: the parent's children time grows by all 50.
        let before = ForeignCpu {
            ticks: HashMap::from([(1, 10), (2, 40)]),
        };
        let after = ForeignCpu {
            ticks: HashMap::from([(1, 10 + 50), (3, 5)]),
        };
        assert_eq!(before.seconds_until(&after), 0.15);
    }

    #[test]
    fn own_process_is_in_its_tree_and_uses_cpu() {
        let me = std::process::id();
        assert!(process_tree(me).contains(&me));
        assert!(tree_rss_bytes(me) > 0);
    }
}
