//! The access log: one JSON line per finished flow and per refused connection.
//!
//! Design: the data path never waits for it. A record is moved (not formatted) into a bounded
//! queue, a `Vec` behind a mutex that is only ever held for a push or a swap; when the queue is
//! full the record is dropped and counted (`ingressd_access_log_dropped_total`). A dedicated
//! thread takes the whole queue every `BATCH_INTERVAL` (one swap), formats it and writes it:
//! one `write` per batch, so a line is never split and an idle daemon has written everything.
//! With `access_log = "off"` there is no queue, no thread and the data path builds no record.
//!
//! Cost: a record carries no heap allocation (see [`LogText`]), is moved once into the queue
//! and formatted where it lies; its wall-clock time comes from the monotonic clock plus an
//! offset the writer refreshes ([`AccessLog::unix_micros_at`]); the writer formats by hand
//! ([`json`]). Measured with callgrind in the README's "Cost" section.
//!
//! # Layout
//! - `text`: [`LogText`], the record's texts, shared or copied in place.
//! - `json`: the JSON value writers and the once-per-second date cache.
//! - `line`: a record as one line, keys and the daemon's names written in precomputed runs.

mod json;
mod line;
mod text;

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

pub use text::{LogText, SHORT_INLINE_BYTES};

use crate::{
    config,
    metrics::{FlowPath, Metrics},
    model::Mode,
    proxy::Reason,
    splice::FlowEnd,
};

/// Records waiting for the writer at most; beyond, records are dropped and counted.
const QUEUE_RECORDS: usize = 16_384;

/// How often the writer takes what is queued (so at most ~160,000 records a second).
const BATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Queue capacity (in records) the writer keeps between batches; a burst's is given back.
const SPARE_RECORDS: usize = 1024;

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

/// One access log record: what the data path knew about the connection.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the flow ended or the connection was refused, in microseconds since the Unix epoch
    /// (see [`unix_micros`]; integers keep the record small).
    pub time_micros: u64,
    /// The ingress name.
    pub ingress: Arc<str>,
    /// The matched rule's SNI pattern (`default` for the default target).
    pub rule: Option<Arc<str>>,
    /// The client's address.
    pub client: SocketAddr,
    /// The server name of the ClientHello.
    pub sni: Option<LogText>,
    /// ALPN: negotiated (terminate) or the client's first offer (passthrough).
    pub alpn: Option<LogText<SHORT_INLINE_BYTES>>,
    /// The target instance (names without captures are shared with the route table).
    pub instance: Option<LogText<SHORT_INLINE_BYTES>>,
    /// The backend address.
    pub backend: Option<SocketAddr>,
    /// `passthrough` or `terminate`.
    pub mode: Option<Mode>,
    /// From accept (refusals) or hand-off (flows) to the end, in microseconds.
    pub duration_micros: u64,
    /// Flow or refusal.
    pub outcome: Outcome,
}

impl Record {
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

/// Records waiting for the writer and flushes waiting for their answer.
#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    flushes: Vec<oneshot::Sender<()>>,
}

/// What the data path and the writer share.
struct Shared {
    queue: Mutex<Queue>,
    /// Wall clock minus monotonic clock, in microseconds, refreshed by the writer on each
    /// batch: a record's time costs one monotonic clock read (which the data path usually
    /// already has) instead of a second, wall-clock read and its conversion.
    wall_offset_micros: AtomicU64,
    /// The monotonic clock's origin for `wall_offset_micros`.
    origin: Instant,
}

impl Shared {
    fn new() -> Self {
        Self {
            queue: Mutex::default(),
            wall_offset_micros: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a queue that is still consistent (pushes and
        // swaps are whole), so a poisoned lock is taken as it is.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_wall_offset(&self) {
        let wall = unix_micros(SystemTime::now());
        let mono = micros(self.origin.elapsed());
        self.wall_offset_micros
            .store(wall.wrapping_sub(mono), Ordering::Relaxed);
    }
}

/// A duration in whole microseconds (saturating after ~584,000 years).
#[inline]
fn micros(d: Duration) -> u64 {
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
                .wrapping_add(micros(at.saturating_duration_since(shared.origin))),
            None => unix_micros(SystemTime::now()),
        }
    }

    /// Queues a record without waiting; a full queue drops it (counted).
    #[inline]
    pub fn log(&self, record: Record) {
        let Some(shared) = &self.shared else { return };
        let mut queue = shared.lock();
        if queue.records.len() < QUEUE_RECORDS {
            queue.records.push(record);
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
        shared.lock().flushes.push(done);
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
    let mut buf = Vec::with_capacity(64 << 10);
    let mut format = line::Line::new();
    let mut taken = Queue::default();
    let mut failed_before = false;
    loop {
        // Woken on a short period instead of per record: a busy data path then never pays for
        // a wake-up, and lines still reach the file within `BATCH_INTERVAL`.
        std::thread::sleep(BATCH_INTERVAL);
        shared.refresh_wall_offset();
        // Every handle but this one gone: what is queued now is the last of it.
        let last = Arc::strong_count(shared) == 1;
        {
            // One swap under the lock: the data path never waits for formatting or I/O.
            let mut queue = shared.lock();
            std::mem::swap(&mut queue.records, &mut taken.records);
            std::mem::swap(&mut queue.flushes, &mut taken.flushes);
        }
        let mut lines = 0u64;
        // Formatted where they lie (not moved out one by one), then dropped together.
        for record in &taken.records {
            format.write(record, &mut buf);
            lines += 1;
            if buf.len() >= (60 << 10) {
                write_batch(
                    &mut sink,
                    &mut buf,
                    &mut lines,
                    counters,
                    &mut failed_before,
                );
            }
        }
        write_batch(
            &mut sink,
            &mut buf,
            &mut lines,
            counters,
            &mut failed_before,
        );
        taken.records.clear();
        // Records queued before a flush was asked for were taken with it, and are written.
        for done in taken.flushes.drain(..) {
            let _ = done.send(());
        }
        // A burst's queue is not kept for good.
        if taken.records.capacity() > SPARE_RECORDS {
            taken.records.shrink_to(SPARE_RECORDS);
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

    #[test]
    fn a_record_fits_a_loop_free_memcpy() {
        // glibc copies up to eight 32-byte vectors without a loop; a record is copied into
        // the queue and out of it.
        assert!(size_of::<Record>() <= 256, "{}", size_of::<Record>());
    }

    fn refusal(time_micros: u64) -> Record {
        Record {
            time_micros,
            ingress: Arc::from("db"),
            rule: None,
            client: "127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: Some("x.example.com".into()),
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
    fn a_full_queue_drops_and_counts_without_waiting() {
        // No writer: nothing takes the queue while it fills.
        let metrics = Metrics::new();
        let log = AccessLog {
            shared: Some(Arc::new(Shared::new())),
            metrics: metrics.clone(),
        };
        for i in 0..QUEUE_RECORDS + 3 {
            log.log(refusal(i as u64));
        }
        let queued = log.shared.as_ref().map_or(0, |s| s.lock().records.len());
        assert_eq!(queued, QUEUE_RECORDS);
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
        for _ in 0..3 {
            log.log(refusal(derived));
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
        let record = refusal(1_700_000_000_000_000);
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
        let record = Record {
            time_micros: unix_micros(
                SystemTime::UNIX_EPOCH + Duration::new(951_782_400, 123_456_789),
            ),
            ingress: Arc::from("db"),
            rule: Some(Arc::from("{name}.example.com")),
            client: "[::1]:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: Some("a.example.com".into()),
            alpn: Some(LogText::copy(b"we\"ird\\\x01\xc3\xa9\xff")),
            instance: Some("a".into()),
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
