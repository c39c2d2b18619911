//! The access log: one JSON line per finished flow and per refused connection.
//!
//! Design: the data path never waits for it. A record is moved (not formatted) into a bounded
//! channel with `try_send`; when the channel is full the record is dropped and counted
//! (`ingressd_access_log_dropped_total`). A dedicated thread formats and writes batches: one
//! `write` per batch, flushed whenever the channel runs dry, so a line is never split and an
//! idle daemon has written everything. With `access_log = "off"` there is no channel, no thread
//! and the data path builds no record.

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot};

use crate::{config, metrics::Metrics};

/// Records waiting for the writer at most; beyond, records are dropped and counted.
const QUEUE_RECORDS: usize = 16_384;

/// How often the writer takes what is queued (so at most ~160,000 records a second).
const BATCH_INTERVAL: Duration = Duration::from_millis(50);

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
        path: &'static str,
        /// Client → backend bytes.
        client_to_backend_bytes: u64,
        /// Backend → client bytes.
        backend_to_client_bytes: u64,
        /// Of those, bytes the daemon relayed (the rest went through the kernel).
        relayed_bytes: u64,
        /// How it ended (`closed`, `client_reset`, ...).
        end: &'static str,
    },
    /// A connection refused before it became a flow.
    Refused {
        /// The stable refusal reason.
        reason: &'static str,
    },
}

/// One access log record: what the data path knew about the connection.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the flow ended or the connection was refused.
    pub time: SystemTime,
    /// The ingress name.
    pub ingress: Arc<str>,
    /// The matched rule's SNI pattern (`default` for the default target).
    pub rule: Option<String>,
    /// The client's address.
    pub client: SocketAddr,
    /// The server name of the ClientHello.
    pub sni: Option<String>,
    /// ALPN: negotiated (terminate) or the client's first offer (passthrough).
    pub alpn: Option<String>,
    /// The target instance.
    pub instance: Option<String>,
    /// The backend address.
    pub backend: Option<SocketAddr>,
    /// `passthrough` or `terminate`.
    pub mode: Option<&'static str>,
    /// From accept (refusals) or hand-off (flows) to the end.
    pub duration: Duration,
    /// Flow or refusal.
    pub outcome: Outcome,
}

impl Record {
    /// Appends the record as one JSON line (with its newline) to `out`.
    ///
    /// Written by hand rather than through `serde_json`: the keys are fixed and the values
    /// mostly plain, and this is the access log's whole cost (a third of what `serde_json` took
    /// per line, measured with callgrind).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        json::rfc3339(out, self.time);
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
        json::opt_string(out, self.sni.as_deref());
        out.extend_from_slice(b",\"alpn\":");
        json::opt_string(out, self.alpn.as_deref());
        out.extend_from_slice(b",\"instance\":");
        json::opt_string(out, self.instance.as_deref());
        out.extend_from_slice(b",\"backend\":");
        json::addr(out, self.backend);
        out.extend_from_slice(b",\"mode\":");
        json::opt_string(out, self.mode);
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
                json::string(out, path);
                out.extend_from_slice(b",\"client_to_backend_bytes\":");
                json::uint(out, *client_to_backend_bytes);
                out.extend_from_slice(b",\"backend_to_client_bytes\":");
                json::uint(out, *backend_to_client_bytes);
                out.extend_from_slice(b",\"relayed_bytes\":");
                json::uint(out, *relayed_bytes);
                out.extend_from_slice(b",\"duration_ms\":");
                json::millis(out, self.duration);
                out.extend_from_slice(b",\"end\":");
                json::string(out, end);
            }
            Outcome::Refused { reason } => {
                out.extend_from_slice(b",\"duration_ms\":");
                json::millis(out, self.duration);
                out.extend_from_slice(b",\"reason\":");
                json::string(out, reason);
            }
        }
        out.extend_from_slice(b"}\n");
    }
}

enum Message {
    Record(Box<Record>),
    Flush(oneshot::Sender<()>),
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
    pub fn log(&self, record: Record) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Message::Record(Box::new(record))).is_err() {
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
            if tx.send(Message::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
    }
}

/// Minimal JSON value writers for the access log.
mod json {
    use std::{
        io::Write as _,
        net::{IpAddr, SocketAddr},
        time::{Duration, SystemTime, UNIX_EPOCH},
    };

    /// An unsigned integer in decimal.
    pub(super) fn uint(out: &mut Vec<u8>, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        out.extend_from_slice(digits.get(i..).unwrap_or_default());
    }

    /// `width` decimal digits of `n`, zero-padded.
    fn padded(out: &mut Vec<u8>, n: u64, width: u32) {
        let mut div = 10u64.pow(width.saturating_sub(1));
        while div > 0 {
            out.push(b'0' + ((n / div) % 10) as u8);
            div /= 10;
        }
    }

    /// A quoted string, escaped where JSON requires it.
    pub(super) fn string(out: &mut Vec<u8>, s: &str) {
        out.push(b'"');
        let bytes = s.as_bytes();
        if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
            out.extend_from_slice(bytes);
        } else {
            for &b in bytes {
                match b {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    0..0x20 => {
                        out.extend_from_slice(b"\\u00");
                        let hex = b"0123456789abcdef";
                        out.push(hex[usize::from(b >> 4)]);
                        out.push(hex[usize::from(b & 0xf)]);
                    }
                    _ => out.push(b),
                }
            }
        }
        out.push(b'"');
    }

    /// A quoted string or `null`.
    pub(super) fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => string(out, s),
            None => out.extend_from_slice(b"null"),
        }
    }

    /// A quoted socket address (`1.2.3.4:5`, `[::1]:5`) or `null`.
    pub(super) fn addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
        let Some(addr) = addr else {
            out.extend_from_slice(b"null");
            return;
        };
        out.push(b'"');
        match addr.ip() {
            IpAddr::V4(ip) => {
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    uint(out, u64::from(octet));
                }
                out.push(b':');
                uint(out, u64::from(addr.port()));
            }
            IpAddr::V6(_) => {
                let _ = write!(out, "{addr}");
            }
        }
        out.push(b'"');
    }

    /// Milliseconds with microsecond precision (`12.345`).
    pub(super) fn millis(out: &mut Vec<u8>, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        uint(out, micros / 1000);
        out.push(b'.');
        padded(out, micros % 1000, 3);
    }

    /// RFC 3339 UTC with microseconds (`2026-01-02T03:04:05.678901Z`), without the quotes.
    pub(super) fn rfc3339(out: &mut Vec<u8>, t: SystemTime) {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        padded(out, year, 4);
        out.push(b'-');
        padded(out, month, 2);
        out.push(b'-');
        padded(out, day, 2);
        out.push(b'T');
        padded(out, rem / 3600, 2);
        out.push(b':');
        padded(out, rem % 3600 / 60, 2);
        out.push(b':');
        padded(out, rem % 60, 2);
        out.push(b'.');
        padded(out, u64::from(since.subsec_micros()), 6);
        out.push(b'Z');
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
    let mut flushes = Vec::new();
    let mut failed_before = false;
    let mut open = true;
    while open {
        // Polled on a short period instead of woken per record: a busy data path then never
        // pays for a wake-up, and lines still reach the file within `BATCH_INTERVAL`.
        std::thread::sleep(BATCH_INTERVAL);
        let mut lines = 0u64;
        loop {
            match rx.try_recv() {
                Ok(Message::Record(record)) => {
                    record.write_json(&mut buf);
                    lines += 1;
                }
                Ok(Message::Flush(done)) => flushes.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
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
    fn a_refusal_line_has_the_reason_and_no_flow_fields() {
        let record = Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            ingress: Arc::from("db"),
            rule: None,
            client: "127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: Some("x.example.com".to_owned()),
            alpn: None,
            instance: None,
            backend: None,
            mode: None,
            duration: Duration::from_micros(1500),
            outcome: Outcome::Refused {
                reason: "unknown_sni",
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
            time: SystemTime::UNIX_EPOCH + Duration::new(951_782_400, 123_456_789),
            ingress: Arc::from("db"),
            rule: Some("{name}.example.com".to_owned()),
            client: "[::1]:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: Some("a.example.com".to_owned()),
            alpn: Some("we\"ird\\\u{1}é".to_owned()),
            instance: Some("a".to_owned()),
            backend: Some("10.0.0.7:5432".parse().unwrap_or_else(|_| unreachable!())),
            mode: Some("passthrough"),
            duration: Duration::from_nanos(12_345_678_901),
            outcome: Outcome::Flow {
                id: 42,
                path: "sockmap",
                client_to_backend_bytes: 0,
                backend_to_client_bytes: u64::MAX,
                relayed_bytes: 7,
                end: "client_reset",
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
                "sni": "a.example.com", "alpn": "we\"ird\\\u{1}é", "instance": "a",
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
            json::rfc3339(&mut ours, t);
            let theirs = time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            assert_eq!(String::from_utf8_lossy(&ours), theirs);
        }
    }
}
