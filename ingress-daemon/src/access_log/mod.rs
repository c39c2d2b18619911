//! The access log: one JSON line per finished flow and per refused connection.
//!
//! Design: the data path never waits for it. A record is moved (not formatted) into a bounded
//! channel with `try_send`; when the channel is full the record is dropped and counted
//! (`ingressd_access_log_dropped_total`). A dedicated thread formats and writes batches: one
//! `write` per batch, flushed whenever the channel runs dry, so a line is never split and an
//! idle daemon has written everything. With `access_log = "off"` there is no channel, no thread
//! and the data path builds no record.
//!
//! Cost: a record carries no heap allocation (see [`LogText`]) and moves through the channel by
//! value; the writer formats it by hand ([`json`]). Measured with callgrind in the README's
//! "Cost" section.
//!
//! # Layout
//! - `text`: [`LogText`], the record's texts, shared or copied in place.
//! - `json`: the JSON value writers and the once-per-second date cache.

mod json;
mod text;

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot};

pub use text::{LogText, SHORT_INLINE_BYTES};

use crate::{
    config,
    metrics::{self, FlowPath, Metrics},
    model::Mode,
    proxy::Reason,
    splice::FlowEnd,
};

/// Records waiting for the writer at most; beyond, records are dropped and counted.
const QUEUE_RECORDS: usize = 16_384;

/// How often the writer takes what is queued (so at most ~160,000 records a second).
const BATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Records the writer takes from the channel at once (it frees their slots together).
const TAKE_RECORDS: usize = 256;

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
    /// mostly plain, and this is most of the access log's cost (a third of what `serde_json`
    /// took per line, measured with callgrind).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.write_line(out, &mut json::Dates::default());
    }

    fn write_line(&self, out: &mut Vec<u8>, dates: &mut json::Dates) {
        // Typical lines are ~400 bytes: one capacity check instead of growth checks that fail.
        out.reserve(512);
        out.extend_from_slice(b"{\"time\":\"");
        dates.rfc3339(out, self.time_micros);
        let event: &[u8] = match self.outcome {
            Outcome::Flow { .. } => b"\",\"event\":\"flow\",\"ingress\":",
            Outcome::Refused { .. } => b"\",\"event\":\"refused\",\"ingress\":",
        };
        out.extend_from_slice(event);
        json::string(out, &self.ingress);
        if let Outcome::Flow { id, .. } = self.outcome {
            out.extend_from_slice(b",\"flow_id\":");
            json::uint(out, id);
        }
        out.extend_from_slice(b",\"rule\":");
        json::opt_string(out, self.rule.as_deref());
        out.extend_from_slice(b",\"client\":");
        json::addr(out, Some(self.client));
        out.extend_from_slice(b",\"sni\":");
        json::opt_text(out, self.sni.as_ref().map(LogText::as_bytes));
        out.extend_from_slice(b",\"alpn\":");
        json::opt_text(out, self.alpn.as_ref().map(LogText::as_bytes));
        out.extend_from_slice(b",\"instance\":");
        json::opt_text(out, self.instance.as_ref().map(LogText::as_bytes));
        out.extend_from_slice(b",\"backend\":");
        json::addr(out, self.backend);
        out.extend_from_slice(b",\"mode\":");
        json::opt_name(out, self.mode.map(metrics::mode_str));
        match &self.outcome {
            Outcome::Flow {
                path,
                client_to_backend_bytes,
                backend_to_client_bytes,
                relayed_bytes,
                end,
                ..
            } => {
                out.extend_from_slice(b",\"path\":");
                json::name(out, path.as_str());
                out.extend_from_slice(b",\"client_to_backend_bytes\":");
                json::uint(out, *client_to_backend_bytes);
                out.extend_from_slice(b",\"backend_to_client_bytes\":");
                json::uint(out, *backend_to_client_bytes);
                out.extend_from_slice(b",\"relayed_bytes\":");
                json::uint(out, *relayed_bytes);
                out.extend_from_slice(b",\"duration_ms\":");
                json::millis(out, self.duration_micros);
                out.extend_from_slice(b",\"end\":");
                json::name(out, end.as_str());
            }
            Outcome::Refused { reason } => {
                out.extend_from_slice(b",\"duration_ms\":");
                json::millis(out, self.duration_micros);
                out.extend_from_slice(b",\"reason\":");
                json::name(out, reason.as_str());
            }
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Microseconds from the Unix epoch to `t` (0 before it, saturating far after it).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[expect(
    clippy::large_enum_variant,
    reason = "records move by value so the data path does not allocate; flushes are rare"
)]
enum Message {
    Record(Record),
    /// Answered once everything before it is written (taken by the writer).
    Flush(Option<oneshot::Sender<()>>),
}

/// The data path's handle on the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Message>>,
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
        let (tx, rx) = mpsc::channel(QUEUE_RECORDS);
        let counters = metrics.clone();
        std::thread::Builder::new()
            .name("access-log".to_owned())
            .spawn(move || write_loop(rx, sink, &counters))
            .map_err(AccessLogError::Thread)?;
        Ok(Self {
            tx: Some(tx),
            metrics,
        })
    }

    /// An access log that writes nothing.
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics }
    }

    /// Whether records are wanted (the data path builds none otherwise).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a record without waiting; a full queue drops it (counted).
    #[inline]
    pub fn log(&self, record: Record) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Message::Record(record)).is_err() {
            self.metrics
                .access_log
                .dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (up to `timeout`) until every record queued so far is written.
    pub async fn flush(&self, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        let _ = tokio::time::timeout(timeout, async {
            if tx.send(Message::Flush(Some(done))).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
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

fn write_loop(mut rx: mpsc::Receiver<Message>, mut sink: Box<dyn Write + Send>, metrics: &Metrics) {
    let counters = &metrics.access_log;
    let mut buf = Vec::with_capacity(64 << 10);
    let mut dates = json::Dates::default();
    let mut taken = Vec::with_capacity(TAKE_RECORDS);
    let mut flushes = Vec::new();
    let mut failed_before = false;
    // Nothing waits on the channel: the writer polls it (a sender's wake-up is a no-op).
    let mut cx = Context::from_waker(Waker::noop());
    let mut open = true;
    while open {
        // Polled on a short period instead of woken per record: a busy data path then never
        // pays for a wake-up, and lines still reach the file within `BATCH_INTERVAL`.
        std::thread::sleep(BATCH_INTERVAL);
        let mut lines = 0u64;
        loop {
            // Taken in groups: one release of channel slots per group, and each record is
            // formatted where it lies (a record is a few hundred bytes, each move a `memcpy`).
            match rx.poll_recv_many(&mut cx, &mut taken, TAKE_RECORDS) {
                Poll::Pending => break,
                Poll::Ready(0) => {
                    open = false;
                    break;
                }
                Poll::Ready(_) => {}
            }
            for message in &mut taken {
                match message {
                    Message::Record(record) => {
                        record.write_line(&mut buf, &mut dates);
                        lines += 1;
                    }
                    Message::Flush(done) => flushes.extend(done.take()),
                }
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
            taken.clear();
        }
        write_batch(
            &mut sink,
            &mut buf,
            &mut lines,
            counters,
            &mut failed_before,
        );
        for done in flushes.drain(..) {
            let _ = done.send(());
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
        // and out of the channel.
        assert!(size_of::<Record>() <= 256, "{}", size_of::<Record>());
    }

    #[test]
    fn a_refusal_line_has_the_reason_and_no_flow_fields() {
        let record = Record {
            time_micros: 1_700_000_000_000_000,
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
        };
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
