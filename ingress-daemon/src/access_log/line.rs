//! One record as one JSON line, in as few copies as the values allow.
//!
//! Each copy into the line costs a capacity check and a length update besides the bytes, and
//! a line has 17 keys: writing key, quote, value and quote separately was most of the line's
//! cost. Here the keys, the quotes around values and the daemon's own names (mode, path, end,
//! reason) are written in runs: constant runs where nothing varies, and runs built once per
//! writer ([`Line::new`]) where a name of the daemon's follows a key. A refusal whose target
//! was never known writes its four `null` fields as one run. The format is unchanged.

use super::{Outcome, Record, json};
use crate::{
    metrics::{self, FlowPath, PATHS},
    model::Mode,
    proxy::Reason,
    splice::FlowEnd,
};

/// The writer's formatting state: the date cache and the runs built once.
#[derive(Debug)]
pub(super) struct Line {
    dates: json::Dates,
    /// `,"mode":…,"duration_ms":` of a refusal, by [`mode_slot`].
    refusal_modes: [Box<[u8]>; MODE_SLOTS],
    /// `,"mode":…,"path":"…","client_to_backend_bytes":` of a flow, by [`mode_slot`] and path.
    flow_modes: [[Box<[u8]>; PATHS.len()]; MODE_SLOTS],
    /// `,"reason":"…"}` and the newline, by [`Reason::index`].
    reasons: [Box<[u8]>; Reason::ALL.len()],
    /// `,"end":"…"}` and the newline, by `FlowEnd as usize`.
    ends: [Box<[u8]>; FlowEnd::ALL.len()],
}

/// No mode (refused before a rule matched), then each mode.
const MODE_SLOTS: usize = 1 + metrics::MODES.len();

fn mode_slot(mode: Option<Mode>) -> usize {
    mode.map_or(0, |m| 1 + metrics::mode_index(m))
}

/// The JSON value of a mode slot.
fn mode_value(slot: usize) -> String {
    match slot.checked_sub(1).and_then(|i| metrics::MODES.get(i)) {
        Some(name) => format!("\"{name}\""),
        None => "null".to_owned(),
    }
}

fn run(s: String) -> Box<[u8]> {
    s.into_bytes().into_boxed_slice()
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// Builds the runs (a few dozen small allocations, once per writer).
    pub(super) fn new() -> Self {
        Self {
            dates: json::Dates::default(),
            refusal_modes: std::array::from_fn(|slot| {
                run(format!(",\"mode\":{},\"duration_ms\":", mode_value(slot)))
            }),
            flow_modes: std::array::from_fn(|slot| {
                std::array::from_fn(|path| {
                    let path = PATHS.get(path).copied().unwrap_or_default();
                    run(format!(
                        ",\"mode\":{},\"path\":\"{path}\",\"client_to_backend_bytes\":",
                        mode_value(slot)
                    ))
                })
            }),
            reasons: Reason::ALL
                .map(|reason| run(format!(",\"reason\":\"{}\"}}\n", reason.as_str()))),
            ends: FlowEnd::ALL.map(|end| run(format!(",\"end\":\"{}\"}}\n", end.as_str()))),
        }
    }

    /// Appends `record` as one JSON line (with its newline) to `out`.
    pub(super) fn write(&mut self, record: &Record, out: &mut Vec<u8>) {
        // Typical lines are ~400 bytes: one capacity check that succeeds instead of growth.
        out.reserve(512);
        out.extend_from_slice(&self.dates.head(record.time_micros));
        let rule = record.rule.as_deref().map(str::as_bytes);
        match record.outcome {
            Outcome::Flow { id, .. } => {
                out.extend_from_slice(b"\",\"event\":\"flow\",\"ingress\":\"");
                json::body(out, record.ingress.as_bytes());
                out.extend_from_slice(b"\",\"flow_id\":");
                json::uint(out, id);
                json::field(out, b",\"rule\":\"", b",\"rule\":null", rule);
            }
            Outcome::Refused { .. } => {
                out.extend_from_slice(b"\",\"event\":\"refused\",\"ingress\":\"");
                json::body(out, record.ingress.as_bytes());
                json::field(out, b"\",\"rule\":\"", b"\",\"rule\":null", rule);
            }
        }
        out.extend_from_slice(b",\"client\":");
        json::addr(out, Some(record.client));
        json::field(
            out,
            b",\"sni\":\"",
            b",\"sni\":null",
            record.sni.as_ref().map(|t| t.as_bytes()),
        );
        if record.alpn.is_none() && record.instance.is_none() && record.backend.is_none() {
            out.extend_from_slice(b",\"alpn\":null,\"instance\":null,\"backend\":null");
        } else {
            json::field(
                out,
                b",\"alpn\":\"",
                b",\"alpn\":null",
                record.alpn.as_ref().map(|t| t.as_bytes()),
            );
            json::field(
                out,
                b",\"instance\":\"",
                b",\"instance\":null",
                record.instance.as_ref().map(|t| t.as_bytes()),
            );
            out.extend_from_slice(b",\"backend\":");
            json::addr(out, record.backend);
        }
        let slot = mode_slot(record.mode);
        match &record.outcome {
            Outcome::Flow {
                path,
                client_to_backend_bytes,
                backend_to_client_bytes,
                relayed_bytes,
                end,
                ..
            } => {
                out.extend_from_slice(self.flow_run(slot, *path));
                json::uint(out, *client_to_backend_bytes);
                out.extend_from_slice(b",\"backend_to_client_bytes\":");
                json::uint(out, *backend_to_client_bytes);
                out.extend_from_slice(b",\"relayed_bytes\":");
                json::uint(out, *relayed_bytes);
                out.extend_from_slice(b",\"duration_ms\":");
                json::millis(out, record.duration_micros);
                out.extend_from_slice(self.ends.get(*end as usize).map_or(&[], |r| r));
            }
            Outcome::Refused { reason } => {
                out.extend_from_slice(self.refusal_modes.get(slot).map_or(&[], |r| r));
                json::millis(out, record.duration_micros);
                out.extend_from_slice(self.reasons.get(reason.index()).map_or(&[], |r| r));
            }
        }
    }

    fn flow_run(&self, slot: usize, path: FlowPath) -> &[u8] {
        self.flow_modes
            .get(slot)
            .and_then(|paths| paths.get(path as usize))
            .map_or(&[], |r| r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn record(mode: Option<Mode>, outcome: Outcome) -> Record {
        Record {
            time_micros: 1_700_000_000_000_000,
            ingress: Arc::from("db"),
            rule: None,
            client: "127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()),
            sni: None,
            alpn: None,
            instance: None,
            backend: None,
            mode,
            duration_micros: 0,
            outcome,
        }
    }

    fn parsed(line: &mut Line, record: &Record) -> serde_json::Value {
        let mut out = Vec::new();
        line.write(record, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap_or_default()
    }

    #[test]
    fn every_name_of_the_daemon_is_written_where_it_belongs() {
        let mut line = Line::new();
        let modes = [None, Some(Mode::Passthrough), Some(Mode::Terminate)];
        for mode in modes {
            for reason in Reason::ALL {
                let json = parsed(&mut line, &record(mode, Outcome::Refused { reason }));
                assert_eq!(json["reason"], reason.as_str());
                assert_eq!(json["mode"], serde_json::json!(mode.map(metrics::mode_str)));
                assert_eq!(json["duration_ms"], 0.0);
            }
            for path in [FlowPath::Sockmap, FlowPath::KtlsSplice, FlowPath::Userspace] {
                for end in FlowEnd::ALL {
                    let outcome = Outcome::Flow {
                        id: 7,
                        path,
                        client_to_backend_bytes: 1,
                        backend_to_client_bytes: 2,
                        relayed_bytes: 3,
                        end,
                    };
                    let json = parsed(&mut line, &record(mode, outcome));
                    assert_eq!(json["end"], end.as_str());
                    assert_eq!(json["path"], path.as_str());
                    assert_eq!(json["mode"], serde_json::json!(mode.map(metrics::mode_str)));
                    assert_eq!(json["client_to_backend_bytes"], 1);
                    assert_eq!(json["relayed_bytes"], 3);
                }
            }
        }
    }
}
