//! The access log: one JSON line per finished flow and per refused connection.
//!
//! Design: the data path never waits for I/O. A record is a view of what the connection's
//! task knows (borrowed, nothing copied); it is formatted straight into a bounded batch, a byte
//! buffer behind a mutex that is held for one line's formatting (a few hundred instructions,
//! no allocation once the buffer has grown) or for the writer's swap. When the batch is full
//! the line is dropped and counted (`ingressd_access_log_dropped_total`). A dedicated thread
//! takes the whole batch every `BATCH_INTERVAL` (one swap) and writes it: one `write` per
//! batch, so a line is never split and an idle daemon has written everything. With
//! `access_log = "off"` there is no batch, no thread and the data path builds no record.
//!
//! Cost: formatting where the values lie saves building a record, copying its texts, moving
//! it through a queue and dropping it on another thread (about a third of the log's cost when
//! records were queued and formatted by the writer). A record's wall-clock time comes from the
//! monotonic clock plus an offset the writer refreshes ([`AccessLog::unix_micros_at`]); lines
//! are formatted by hand ([`json`]). Measured with callgrind in the README's "Cost" section.
//!
//! # Layout
//! - `json`: the JSON value writers and the once-per-second date cache.
//! - `line`: a record as one line, keys and names written in precomputed runs.

mod json;
mod line;

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::oneshot;

use crate::{
    config,
    metrics::{FlowPath, Metrics},
    model::Mode,
    proxy::Reason,
    splice::FlowEnd,
    sys,
};

/// Bytes of lines waiting for the writer at most (~20,000 lines); beyond, lines are dropped
/// and counted.
const BATCH_BYTES: usize = 8 << 20;

/// How often the writer takes what is waiting (so at most ~400,000 lines a second).
const BATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Batch capacity the writer keeps between batches; a burst's is given back.
const SPARE_BYTES: usize = 256 << 10;

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The log file could not be opened for appending.
    #[error("opening the access log {path}: {source}")]
    Open {
        /// The configured path.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("starting the access log writer: {0}")]
    Thread(std::io::Error),
}

/// What ended a record's connection.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A flow that finished.
    Flow {
        /// Daemon-wide flow ID (as in `/flows`).
        id: u64,
        /// `sockmap`, `ktls_splice` or `userspace`.
        path: FlowPath,
        /// Client → backend bytes.
        client_to_backend_bytes: u64,
        /// Backend → client bytes.
        backend_to_client_bytes: u64,
        /// Of those, bytes the daemon relayed (the rest went through the kernel).
        relayed_bytes: u64,
        /// How it ended (`closed`, `client_reset`, ...).
        end: FlowEnd,
    },
    /// A connection refused before it became a flow.
    Refused {
        /// The stable refusal reason.
        reason: Reason,
    },
}

/// An instance name: the route table's, or rendered for the connection.
#[derive(Debug, Clone, Copy)]
pub enum Name<'a> {
    /// Shared with the route table (a template without captures, the default target).
    Shared(&'a Arc<str>),
    /// Rendered from a pattern's captures.
    Text(&'a str),
}

/// One access log record: what the data path knew about the connection, borrowed from it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// When the flow ended or the connection was refused, in microseconds since the Unix epoch
    /// (see [`unix_micros`]).
    pub time_micros: u64,
    /// The ingress name.
    pub ingress: &'a Arc<str>,
    /// The matched rule's SNI pattern (`default` for the default target).
    pub rule: Option<&'a Arc<str>>,
    /// The client's address.
    pub client: SocketAddr,
    /// The server name of the ClientHello.
    pub sni: Option<&'a str>,
    /// ALPN: negotiated (terminate) or the client's first offer (passthrough); bytes that are
    /// not UTF-8 are shown lossily.
    pub alpn: Option<&'a [u8]>,
    /// The target instance.
    pub instance: Option<Name<'a>>,
    /// The backend address.
    pub backend: Option<SocketAddr>,
    /// `passthrough` or `terminate`.
    pub mode: Option<Mode>,
    /// From accept (refusals) or hand-off (flows) to the end, in microseconds.
    pub duration_micros: u64,
    /// Flow or refusal.
    pub outcome: Outcome,
}

impl Record<'_> {
    /// Appends the record as one JSON line (with its newline) to `out`.
    ///
    /// Written by hand rather than through `serde_json`: the keys are fixed and the values
    /// mostly plain, and this is most of the access log's cost (see [`line`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        line::Line::new().write(self, out);
    }
}

/// Microseconds from the Unix epoch to `t` (0 before it, saturating far after it).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What the writer takes whole: lines waiting to be written and flushes waiting for them.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
    flushes: Vec<oneshot::Sender<()>>,
}

/// The batch being filled and the formatting state.
#[derive(Default)]
struct Queue {
    batch: Batch,
    line: line::Line,
}

/// What the data path and the writer share.
struct Shared {
    queue: Mutex<Queue>,
    /// Wall clock minus monotonic clock ([`sys::monotonic_micros`]), in microseconds,
    /// refreshed by the writer on each batch: a record's time costs one monotonic clock read
    /// instead of a wall-clock read and its conversion.
    wall_offset_micros: AtomicU64,
    /// An instant and the same instant on [`sys::monotonic_micros`], to place an `Instant`.
    origin: Instant,
    origin_micros: u64,
}

impl Shared {
    fn new() -> Self {
        Self {
            queue: Mutex::default(),
            wall_offset_micros: AtomicU64::new(0),
            origin: Instant::now(),
            origin_micros: sys::monotonic_micros(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a queue that is still consistent (pushes and
        // swaps are whole), so a poisoned lock is taken as it is.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_wall_offset(&self) {
        let wall = unix_micros(SystemTime::now());
        let mono = sys::monotonic_micros();
        self.wall_offset_micros
            .store(wall.wrapping_sub(mono), Ordering::Relaxed);
    }
}

/// A duration in whole microseconds (saturating after ~584,000 years).
#[inline]
pub fn micros(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
}

/// The data path's handle on the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl AccessLog {
    /// Starts the access log the configuration asks for (a writer thread unless `off`).
    pub fn start(
        destination: &config::AccessLog,
        metrics: Arc<Metrics>,
    ) -> Result<Self, AccessLogError> {
        let sink: Box<dyn Write + Send> = match destination {
            config::AccessLog::Off => return Ok(Self::off(metrics)),
            config::AccessLog::Stderr => Box::new(std::io::stderr()),
            config::AccessLog::File(path) => Box::new(open(path)?),
        };
        let shared = Arc::new(Shared::new());
        shared.refresh_wall_offset();
        let writer = shared.clone();
        let counters = metrics.clone();
        std::thread::Builder::new()
            .name("access-log".to_owned())
            .spawn(move || write_loop(&writer, sink, &counters))
            .map_err(AccessLogError::Thread)?;
        Ok(Self {
            shared: Some(shared),
            metrics,
        })
    }

    /// An access log that writes nothing.
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self {
            shared: None,
            metrics,
        }
    }

    /// Whether records are wanted (the data path builds none otherwise).
    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// The wall-clock time of the monotonic instant `at`, in microseconds since the Unix
    /// epoch (as of the writer's last batch: a clock step shows within `BATCH_INTERVAL`).
    #[inline]
    pub fn unix_micros_at(&self, at: Instant) -> u64 {
        match &self.shared {
            Some(shared) => shared
                .wall_offset_micros
                .load(Ordering::Relaxed)
                .wrapping_add(
                    shared
                        .origin_micros
                        .wrapping_add(micros(at.saturating_duration_since(shared.origin))),
                ),
            None => unix_micros(SystemTime::now()),
        }
    }

    /// The wall-clock time now, in microseconds since the Unix epoch (as of the writer's last
    /// batch), from one monotonic clock read.
    #[inline]
    pub fn unix_micros_now(&self) -> u64 {
        match &self.shared {
            Some(shared) => shared
                .wall_offset_micros
                .load(Ordering::Relaxed)
                .wrapping_add(sys::monotonic_micros()),
            None => unix_micros(SystemTime::now()),
        }
    }

    /// The wall-clock time now (as [`Self::unix_micros_now`]) and the microseconds since
    /// `since`, from one clock read.
    #[inline]
    pub fn now_since(&self, since: Instant) -> (u64, u64) {
        let Some(shared) = &self.shared else {
            return (unix_micros(SystemTime::now()), micros(since.elapsed()));
        };
        let now = sys::monotonic_micros();
        let took = match since.checked_duration_since(shared.origin) {
            Some(after) => now.saturating_sub(shared.origin_micros.wrapping_add(micros(after))),
            // Before the log started (a flow taken over from a previous daemon).
            None => micros(since.elapsed()),
        };
        (
            shared
                .wall_offset_micros
                .load(Ordering::Relaxed)
                .wrapping_add(now),
            took,
        )
    }

    /// Adds a record's line to the batch without waiting for I/O; a full batch drops it
    /// (counted).
    #[inline]
    pub fn log(&self, record: &Record<'_>) {
        let Some(shared) = &self.shared else { return };
        let mut queue = shared.lock();
        if queue.batch.bytes.len() < BATCH_BYTES {
            let Queue { batch, line } = &mut *queue;
            line.write(record, &mut batch.bytes);
            batch.lines += 1;
            return;
        }
        drop(queue);
        self.metrics
            .access_log
            .dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Waits (up to `timeout`) until every record queued so far is written.
    pub async fn flush(&self, timeout: Duration) {
        let Some(shared) = &self.shared else { return };
        let (done, wait) = oneshot::channel();
        shared.lock().batch.flushes.push(done);
        let _ = tokio::time::timeout(timeout, wait).await;
    }
}

fn open(path: &Path) -> Result<std::fs::File, AccessLogError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_owned(),
            source,
        })
}

fn write_loop(shared: &Arc<Shared>, mut sink: Box<dyn Write + Send>, metrics: &Metrics) {
    let counters = &metrics.access_log;
    let mut taken = Batch::default();
    let mut failed_before = false;
    loop {
        // Woken on a short period instead of per record: a busy data path then never pays for
        // a wake-up, and lines still reach the file within `BATCH_INTERVAL`.
        std::thread::sleep(BATCH_INTERVAL);
        shared.refresh_wall_offset();
        // Every handle but this one gone: what is queued now is the last of it.
        let last = Arc::strong_count(shared) == 1;
        {
            // One swap under the lock: the data path never waits for I/O.
            std::mem::swap(&mut shared.lock().batch, &mut taken);
        }
        write_batch(
            &mut sink,
            &mut taken.bytes,
            &mut taken.lines,
            counters,
            &mut failed_before,
        );
        // Lines added before a flush was asked for were taken with it, and are written.
        for done in taken.flushes.drain(..) {
            let _ = done.send(());
        }
        // A burst's batch is not kept for good.
        if taken.bytes.capacity() > SPARE_BYTES {
            taken.bytes.shrink_to(SPARE_BYTES);
        }
        if last {
            return;
        }
    }
}

fn write_batch(
    sink: &mut Box<dyn Write + Send>,
    buf: &mut Vec<u8>,
    lines: &mut u64,
    counters: &crate::metrics::AccessLogCounters,
    failed_before: &mut bool,
) {
    if buf.is_empty() {
        return;
    }
    let written = sink.write_all(buf).and_then(|()| sink.flush());
    buf.clear();
    match written {
        Ok(()) => {
            counters.written.fetch_add(*lines, Ordering::Relaxed);
            *failed_before = false;
        }
        Err(err) => {
            counters.dropped.fetch_add(*lines, Ordering::Relaxed);
            if !*failed_before {
                tracing::warn!(error = %err, "writing the access log failed; dropping lines");
            }
            *failed_before = true;
        }
    }
    *lines = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(ingress: &Arc<str>, time_micros: u64) -> Record<'_> {
        Record {
            time_micros,
            ingress,
            rule: None,
            client: "127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: Some("x.example.com"),
            alpn: None,
            instance: None,
            backend: None,
            mode: None,
            duration_micros: 1500,
            outcome: Outcome::Refused {
                reason: Reason::UnknownSni,
            },
        }
    }

    #[test]
    fn a_full_batch_drops_and_counts_without_waiting() {
        // No writer: nothing takes the batch while it fills.
        let metrics = Metrics::new();
        let log = AccessLog {
            shared: Some(Arc::new(Shared::new())),
            metrics: metrics.clone(),
        };
        let db = Arc::from("db");
        let mut line = Vec::new();
        refusal(&db, 0).write_json(&mut line);
        let fit = BATCH_BYTES.div_ceil(line.len());
        for _ in 0..fit + 3 {
            log.log(&refusal(&db, 0));
        }
        let (bytes, lines) = log.shared.as_ref().map_or((0, 0), |s| {
            let queue = s.lock();
            (queue.batch.bytes.len(), queue.batch.lines)
        });
        assert_eq!((bytes, lines), (fit * line.len(), fit as u64));
        assert_eq!(metrics.access_log.dropped.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_flush_returns_once_earlier_records_are_written_and_times_follow_the_wall_clock() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("access.log");
        let metrics = Metrics::new();
        let log = AccessLog::start(&config::AccessLog::File(path.clone()), metrics.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let wall = unix_micros(SystemTime::now());
        let derived = log.unix_micros_at(Instant::now());
        // Both clocks read within microseconds of each other; a wrong offset is off by years.
        assert!(
            derived.abs_diff(wall) < 1_000_000,
            "monotonic-derived {derived} vs wall clock {wall}"
        );
        let db = Arc::from("db");
        for _ in 0..3 {
            log.log(&refusal(&db, derived));
        }
        log.flush(Duration::from_secs(10)).await;
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(metrics.access_log.written.load(Ordering::Relaxed), 3);
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().unwrap_or_default()).unwrap_or_default();
        assert_eq!(first["reason"], "unknown_sni");
    }

    #[test]
    fn a_refusal_line_has_the_reason_and_no_flow_fields() {
        let db = Arc::from("db");
        let record = refusal(&db, 1_700_000_000_000_000);
        let mut line = Vec::new();
        record.write_json(&mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        assert_eq!(json["time"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(json["event"], "refused");
        assert_eq!(json["reason"], "unknown_sni");
        assert_eq!(json["duration_ms"], 1.5);
        assert!(json.get("end").is_none() && json.get("flow_id").is_none());
    }

    #[test]
    fn a_flow_line_escapes_what_it_must_and_parses_back() {
        let (db, rule) = (Arc::from("db"), Arc::from("{name}.example.com"));
        let record = Record {
            time_micros: unix_micros(
                SystemTime::UNIX_EPOCH + Duration::new(951_782_400, 123_456_789),
            ),
            ingress: &db,
            rule: Some(&rule),
            client: "[::1]:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: Some("a.example.com"),
            alpn: Some(b"we\"ird\\\x01\xc3\xa9\xff"),
            instance: Some(Name::Text("a")),
            backend: Some("10.0.0.7:5432".parse().unwrap_or_else(|_| unreachable!())),
            mode: Some(Mode::Passthrough),
            duration_micros: 12_345_678,
            outcome: Outcome::Flow {
                id: 42,
                path: FlowPath::Sockmap,
                client_to_backend_bytes: 0,
                backend_to_client_bytes: u64::MAX,
                relayed_bytes: 7,
                end: FlowEnd::ClientReset,
            },
        };
        let mut line = Vec::new();
        record.write_json(&mut line);
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2000-02-29T00:00:00.123456Z", "event": "flow", "ingress": "db",
                "flow_id": 42, "rule": "{name}.example.com", "client": "[::1]:5000",
                "sni": "a.example.com", "alpn": "we\"ird\\\u{1}é\u{fffd}", "instance": "a",
                "backend": "10.0.0.7:5432", "mode": "passthrough", "path": "sockmap",
                "client_to_backend_bytes": 0, "backend_to_client_bytes": u64::MAX,
                "relayed_bytes": 7, "duration_ms": 12345.678, "end": "client_reset"
            })
        );
    }

    #[test]
    fn timestamps_match_the_time_crate() {
        for secs in [
            0u64,
            86_399,
            951_868_800,
            1_700_000_000,
            4_102_444_800,
            253_402_300_799,
        ] {
            let t = SystemTime::UNIX_EPOCH + Duration::new(secs, 5_000);
            let mut ours = Vec::new();
            json::Dates::default().rfc3339(&mut ours, unix_micros(t));
            let theirs = time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            assert_eq!(String::from_utf8_lossy(&ours), theirs);
        }
    }
}
