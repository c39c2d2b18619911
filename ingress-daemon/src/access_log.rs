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

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{config, metrics::Metrics};

/// Records waiting for the writer at most; beyond, records are dropped and counted.
const QUEUE_RECORDS: usize = 8192;

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

/// The JSON shape of a line.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    event: &'static str,
    ingress: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    flow_id: Option<u64>,
    rule: Option<&'a str>,
    client: SocketAddr,
    sni: Option<&'a str>,
    alpn: Option<&'a str>,
    instance: Option<&'a str>,
    backend: Option<SocketAddr>,
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_to_backend_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_to_client_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_bytes: Option<u64>,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

impl Record {
    fn line(&self) -> Line<'_> {
        let time = time::OffsetDateTime::from(self.time)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut line = Line {
            time,
            event: "flow",
            ingress: &self.ingress,
            flow_id: None,
            rule: self.rule.as_deref(),
            client: self.client,
            sni: self.sni.as_deref(),
            alpn: self.alpn.as_deref(),
            instance: self.instance.as_deref(),
            backend: self.backend,
            mode: self.mode,
            path: None,
            client_to_backend_bytes: None,
            backend_to_client_bytes: None,
            relayed_bytes: None,
            duration_ms: (self.duration.as_micros() as f64) / 1000.0,
            end: None,
            reason: None,
        };
        match &self.outcome {
            Outcome::Flow {
                id,
                path,
                client_to_backend_bytes,
                backend_to_client_bytes,
                relayed_bytes,
                end,
            } => {
                line.flow_id = Some(*id);
                line.path = Some(path);
                line.client_to_backend_bytes = Some(*client_to_backend_bytes);
                line.backend_to_client_bytes = Some(*backend_to_client_bytes);
                line.relayed_bytes = Some(*relayed_bytes);
                line.end = Some(end);
            }
            Outcome::Refused { reason } => {
                line.event = "refused";
                line.reason = Some(reason);
            }
        }
        line
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
    while let Some(first) = rx.blocking_recv() {
        let mut lines = 0u64;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Record(record) => {
                    if serde_json::to_writer(&mut buf, &record.line()).is_ok() {
                        buf.push(b'\n');
                        lines += 1;
                    } else {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Message::Flush(done) => flushes.push(done),
            }
            if buf.len() < (60 << 10) {
                next = rx.try_recv().ok();
            }
        }
        let written = sink.write_all(&buf).and_then(|()| sink.flush());
        buf.clear();
        match written {
            Ok(()) => {
                counters.written.fetch_add(lines, Ordering::Relaxed);
                failed_before = false;
            }
            Err(err) => {
                counters.dropped.fetch_add(lines, Ordering::Relaxed);
                if !failed_before {
                    tracing::warn!(error = %err, "writing the access log failed; dropping lines");
                }
                failed_before = true;
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
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
        let json = serde_json::to_value(record.line()).unwrap_or_default();
        assert_eq!(json["time"], "2023-11-14T22:13:20Z");
        assert_eq!(json["event"], "refused");
        assert_eq!(json["reason"], "unknown_sni");
        assert_eq!(json["duration_ms"], 1.5);
        assert!(json.get("end").is_none() && json.get("flow_id").is_none());
    }
}
