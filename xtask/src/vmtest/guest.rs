//! Booting a kernel with an initramfs under qemu, with a hard timeout, and reading what the guest
//! reported on its serial console.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::initramfs::{BEGIN_MARKER, BPF_MARKER, EXIT_MARKER, FACT_MARKER, SETUP_FAILED};
use crate::context::display;

/// What to boot, and how.
pub struct Boot<'a> {
    /// Shown before each line of guest output echoed to the terminal, e.g. `6.1`.
    pub label: &'a str,
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// Where the whole console output goes.
    pub log: &'a Path,
    /// The guest is stopped after this long.
    pub timeout: Duration,
    /// Echo the guest's output (after `/init` has started the suite) to the terminal.
    pub echo: bool,
}

/// How a guest ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// `/init` printed the suite's exit code.
    Exited(i32),
    /// The guest stopped (panic, power-off) without reporting an exit code.
    Silent,
    /// The guest was still running at the timeout and was killed.
    TimedOut,
}

/// What one boot reported.
#[derive(Debug)]
pub struct Run {
    /// How it ended.
    pub end: End,
    /// From starting qemu to the guest's begin marker (`None`: never got there).
    pub boot: Option<Duration>,
    /// From starting qemu to its end.
    pub total: Duration,
    /// The `bpftool -j prog show` listing the guest captured, if any.
    pub bpf: Option<String>,
    /// Facts about the kernel the guest printed.
    pub facts: Vec<String>,
    /// The console log.
    pub log: PathBuf,
}

impl Run {
    /// Ok when the suite exited 0; otherwise an error naming how it failed, with the log's path
    /// and its last lines.
    pub fn check(&self) -> Result<()> {
        let what = match self.end {
            End::Exited(0) => return Ok(()),
            End::Exited(SETUP_FAILED) => "preparing the guest failed".to_owned(),
            End::Exited(code) => format!("the suite failed in the guest (exit status {code})"),
            End::Silent => "the guest stopped without reporting an exit status".to_owned(),
            End::TimedOut => format!("the guest was killed after {:?}", self.total),
        };
        bail!(
            "{what}; console log: {}\n--- last lines of the log ---\n{}",
            self.log.display(),
            tail(&self.log, 40)
        )
    }
}

/// The qemu command line of `boot`: software emulation (see `shared/KERNELS.md`: this
/// machine's /dev/kvm cannot run stock kernels), serial console on stdout.
fn qemu(boot: &Boot) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-machine",
        "q35",
    ])
    .args(["-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
    .arg("-kernel")
    .arg(boot.kernel)
    .arg("-initrd")
    .arg(boot.initrd)
    // panic=-1 with -no-reboot: a panicking guest ends qemu at once.
    .args(["-append", "console=ttyS0 panic=-1 oops=panic"]);
    cmd
}

/// Boots, waits for the guest to power off (or kills it at the timeout), and reads its report.
pub fn boot(boot: &Boot) -> Result<Run> {
    let mut cmd = qemu(boot);
    println!("  + {}", display(&cmd));
    let log =
        fs::File::create(boot.log).with_context(|| format!("creating {}", boot.log.display()))?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let stderr = child.stderr.take().context("qemu's stderr")?;
    let (label, echo) = (boot.label.to_owned(), boot.echo);
    let reader = thread::spawn(move || read_console(stdout, log, &label, echo, started));
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });

    let deadline = started + boot.timeout;
    let timed_out = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if Instant::now() >= deadline {
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let total = started.elapsed();
    let console = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader panicked"))??;
    let errors = errors.join().unwrap_or_default();
    if !errors.trim().is_empty() {
        let mut log = fs::OpenOptions::new().append(true).open(boot.log)?;
        writeln!(log, "\n--- qemu stderr ---\n{errors}")?;
    }
    let end = match (timed_out, console.exit) {
        (_, Some(code)) => End::Exited(code),
        (true, None) => End::TimedOut,
        (false, None) => End::Silent,
    };
    Ok(Run {
        end,
        boot: console.begun,
        total,
        bpf: console.bpf,
        facts: console.facts,
        log: boot.log.to_owned(),
    })
}

/// What the console said.
#[derive(Default)]
struct Console {
    begun: Option<Duration>,
    exit: Option<i32>,
    bpf: Option<String>,
    facts: Vec<String>,
}

impl Console {
    /// Takes in one console line; returns whether it is guest output to echo.
    fn line(&mut self, line: &str, since_start: Duration) -> bool {
        if line.contains(BEGIN_MARKER) && self.begun.is_none() {
            self.begun = Some(since_start);
        }
        if let Some(at) = line.find(BPF_MARKER) {
            self.bpf = Some(line[at + BPF_MARKER.len()..].trim().to_owned());
            return false;
        }
        if let Some(at) = line.find(FACT_MARKER) {
            self.facts
                .push(line[at + FACT_MARKER.len()..].trim().to_owned());
            return false;
        }
        if let Some(at) = line.find(EXIT_MARKER) {
            let digits: String = line[at + EXIT_MARKER.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            // The first report counts; the marker cannot be taken back by later output.
            if self.exit.is_none() {
                self.exit = digits.parse().ok();
            }
        }
        self.begun.is_some()
    }
}

fn read_console(
    stdout: std::process::ChildStdout,
    mut log: fs::File,
    label: &str,
    echo: bool,
    started: Instant,
) -> Result<Console> {
    let mut console = Console::default();
    let mut input = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if input.read_until(b'\n', &mut raw)? == 0 {
            return Ok(console);
        }
        log.write_all(&raw)?;
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end();
        let since_start = started.elapsed();
        if console.line(line, since_start) && echo {
            println!("  [{label} {:>4}s] {line}", since_start.as_secs());
        }
    }
}

/// The last `n` lines of the file at `path`.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> Console {
        let mut c = Console::default();
        for l in lines {
            c.line(l, Duration::from_secs(1));
        }
        c
    }

    #[test]
    fn the_exit_marker_carries_the_suite_status() {
        let c = feed(&[
            "[    4.6] Run /init as init process",
            "INGRESSD-VMTEST-BEGIN kernel=6.1.0-56-amd64",
            "test result: ok. 3 passed",
            "INGRESSD-VMTEST-EXIT=0",
        ]);
        assert_eq!((c.exit, c.begun.is_some()), (Some(0), true));
        let c = feed(&["[  9.1] random: crng init doneINGRESSD-VMTEST-EXIT=101"]);
        assert_eq!(c.exit, Some(101));
    }

    #[test]
    fn no_marker_or_a_broken_one_is_no_exit_status() {
        assert_eq!(feed(&["Kernel panic - not syncing"]).exit, None);
        assert_eq!(feed(&["INGRESSD-VMTEST-EXIT="]).exit, None);
        let c = feed(&["INGRESSD-VMTEST-EXIT=1", "INGRESSD-VMTEST-EXIT=0"]);
        assert_eq!(c.exit, Some(1));
    }

    #[test]
    fn only_a_zero_exit_passes() {
        let dir = std::env::temp_dir();
        let run = |end| Run {
            end,
            boot: None,
            total: Duration::from_secs(1),
            bpf: None,
            facts: Vec::new(),
            log: dir.join("no-such-vmtest.log"),
        };
        assert!(run(End::Exited(0)).check().is_ok());
        for end in [End::Exited(1), End::Silent, End::TimedOut] {
            let err = format!("{:#}", run(end).check().unwrap_err());
            assert!(err.contains("no-such-vmtest.log"), "{err}");
        }
    }
}
