//! One record as one JSON line, in as few copies as the values allow.
//!
//! Each copy into the line costs a capacity check and a length update besides the bytes, and
//! a copy of variable size a call to `memcpy`: writing key, quote, value and quote separately
//! was most of the line's cost. Here the keys, the quotes around values and the names (the
//! daemon's: mode, path, end, reason; the route table's: ingress, rule, instance) are written
//! in [`Run`]s of constant size: constant runs where nothing varies, runs built once per writer
//! ([`Line::new`]) where a name of the daemon's follows a key, and runs built once per name
//! ([`Names`]) for the route table's names. A refusal whose target was never known writes its
//! three `null` fields as one run.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use super::{
    Name, Outcome, Record,
    json::{self, Run},
};
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
    refusal_modes: [Run; MODE_SLOTS],
    /// `,"mode":…,"path":"…","client_to_backend_bytes":` of a flow, by [`mode_slot`] and path.
    flow_modes: [[Run; PATHS.len()]; MODE_SLOTS],
    /// `,"reason":"…"}` and the newline, by [`Reason::index`].
    reasons: [Run; Reason::ALL.len()],
    /// `,"end":"…"}` and the newline, by `FlowEnd as usize`.
    ends: [Run; FlowEnd::ALL.len()],
    /// By ingress: `","event":"flow","ingress":"…","flow_id":` and
    /// `","event":"refused","ingress":"…`.
    ingresses: Names<[Run; 2], 16>,
    /// By rule: `,"rule":"…","client":` (flows) and `","rule":"…","client":` (refusals).
    rules: Names<[Run; 2], 64>,
    /// By shared instance name: `,"instance":"…"`.
    instances: Names<Run, 64>,
    /// The last client and backend IPv4 addresses, formatted up to the port.
    client_ip: LastIp,
    backend_ip: LastIp,
}

/// The last IPv4 address written in a field and the start of its quoted socket addresses.
type LastIp = Option<(Ipv4Addr, json::V4Head)>;

/// A quoted socket address or `null`; an IPv4 address like the last one is not formatted again.
#[inline(always)]
fn addr(last: &mut LastIp, out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        Some(SocketAddr::V4(addr)) => {
            let ip = *addr.ip();
            let head = match last {
                Some((held, head)) if *held == ip => head,
                _ => &last.insert((ip, json::V4Head::new(ip))).1,
            };
            head.write(out, addr.port());
        }
        other => json::addr(out, other),
    }
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

fn run(s: &str) -> Run {
    Run::new(s.as_bytes())
}

/// `head`, a name escaped as a JSON string's contents, then `tail`.
fn named(head: &[u8], name: &[u8], tail: &[u8]) -> Run {
    let mut bytes = head.to_vec();
    json::body(&mut bytes, name);
    bytes.extend_from_slice(tail);
    Run::new(&bytes)
}

/// What was built from each of the last names of the route table seen, in a few slots chosen
/// by the name's address. A slot holds its name, so the address cannot be reused by another
/// name while the slot holds it; a route table's names are few and live long, so a line
/// almost always finds its runs built.
#[derive(Debug)]
struct Names<T, const SLOTS: usize> {
    slots: [Option<(Arc<str>, T)>; SLOTS],
}

impl<T, const SLOTS: usize> Names<T, SLOTS> {
    fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| None),
        }
    }

    /// What `build` made of `name`, built now if the slot holds another name.
    #[inline(always)]
    fn get(&mut self, name: &Arc<str>, build: impl FnOnce(&[u8]) -> T) -> &T {
        // Heap addresses are 16-byte aligned: the bits above choose the slot.
        let slot = &mut self.slots[(Arc::as_ptr(name).cast::<u8>().addr() >> 4) % SLOTS];
        if let Some((held, _)) = slot
            && !Arc::ptr_eq(held, name)
        {
            *slot = None;
        }
        &slot
            .get_or_insert_with(|| (name.clone(), build(name.as_bytes())))
            .1
    }
}

/// A key and an optional text: `open` (the key and the opening quote), the text and the
/// closing quote, or `null` (the key and `null`).
#[inline(always)]
fn text(out: &mut Vec<u8>, open: &[u8], null: &[u8], text: Option<&[u8]>) {
    let Some(text) = text else {
        out.extend_from_slice(null);
        return;
    };
    out.extend_from_slice(open);
    json::body(out, text);
    out.push(b'"');
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
                run(&format!(",\"mode\":{},\"duration_ms\":", mode_value(slot)))
            }),
            flow_modes: std::array::from_fn(|slot| {
                std::array::from_fn(|path| {
                    let path = PATHS.get(path).copied().unwrap_or_default();
                    run(&format!(
                        ",\"mode\":{},\"path\":\"{path}\",\"client_to_backend_bytes\":",
                        mode_value(slot)
                    ))
                })
            }),
            reasons: Reason::ALL
                .map(|reason| run(&format!(",\"reason\":\"{}\"}}\n", reason.as_str()))),
            ends: FlowEnd::ALL.map(|end| run(&format!(",\"end\":\"{}\"}}\n", end.as_str()))),
            ingresses: Names::new(),
            rules: Names::new(),
            instances: Names::new(),
            client_ip: None,
            backend_ip: None,
        }
    }

    /// Appends `record` as one JSON line (with its newline) to `out`.
    pub(super) fn write(&mut self, record: &Record<'_>, out: &mut Vec<u8>) {
        // Typical lines are ~400 bytes, and a run copies up to 96: one capacity check that
        // succeeds instead of growth.
        out.reserve(640);
        out.extend_from_slice(&self.dates.head(record.time_micros));
        let event = usize::from(matches!(record.outcome, Outcome::Refused { .. }));
        let ingress = self.ingresses.get(record.ingress, |name| {
            [
                named(
                    b"\",\"event\":\"flow\",\"ingress\":\"",
                    name,
                    b"\",\"flow_id\":",
                ),
                named(b"\",\"event\":\"refused\",\"ingress\":\"", name, b""),
            ]
        });
        if let Some(run) = ingress.get(event) {
            run.append(out);
        }
        if let Outcome::Flow { id, .. } = record.outcome {
            json::uint(out, id);
        }
        match record.rule {
            Some(rule) => {
                let runs = self.rules.get(rule, |name| {
                    [
                        named(b",\"rule\":\"", name, b"\",\"client\":"),
                        named(b"\",\"rule\":\"", name, b"\",\"client\":"),
                    ]
                });
                if let Some(run) = runs.get(event) {
                    run.append(out);
                }
            }
            None if event == 0 => out.extend_from_slice(b",\"rule\":null,\"client\":"),
            None => out.extend_from_slice(b"\",\"rule\":null,\"client\":"),
        }
        addr(&mut self.client_ip, out, Some(record.client));
        text(
            out,
            b",\"sni\":\"",
            b",\"sni\":null",
            record.sni.map(str::as_bytes),
        );
        if record.alpn.is_none() && record.instance.is_none() && record.backend.is_none() {
            out.extend_from_slice(b",\"alpn\":null,\"instance\":null,\"backend\":null");
        } else {
            text(out, b",\"alpn\":\"", b",\"alpn\":null", record.alpn);
            match record.instance {
                Some(Name::Shared(name)) => self
                    .instances
                    .get(name, |name| named(b",\"instance\":\"", name, b"\""))
                    .append(out),
                Some(Name::Text(name)) => {
                    text(out, b",\"instance\":\"", b"", Some(name.as_bytes()));
                }
                None => out.extend_from_slice(b",\"instance\":null"),
            }
            out.extend_from_slice(b",\"backend\":");
            addr(&mut self.backend_ip, out, record.backend);
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
                if let Some(run) = self.flow_run(slot, *path) {
                    run.append(out);
                }
                json::uint(out, *client_to_backend_bytes);
                out.extend_from_slice(b",\"backend_to_client_bytes\":");
                json::uint(out, *backend_to_client_bytes);
                out.extend_from_slice(b",\"relayed_bytes\":");
                json::uint(out, *relayed_bytes);
                out.extend_from_slice(b",\"duration_ms\":");
                json::millis(out, record.duration_micros);
                if let Some(run) = self.ends.get(*end as usize) {
                    run.append(out);
                }
            }
            Outcome::Refused { reason } => {
                if let Some(run) = self.refusal_modes.get(slot) {
                    run.append(out);
                }
                json::millis(out, record.duration_micros);
                if let Some(run) = self.reasons.get(reason.index()) {
                    run.append(out);
                }
            }
        }
    }

    fn flow_run(&self, slot: usize, path: FlowPath) -> Option<&Run> {
        self.flow_modes
            .get(slot)
            .and_then(|paths| paths.get(path as usize))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn record(ingress: &Arc<str>, mode: Option<Mode>, outcome: Outcome) -> Record<'_> {
        Record {
            time_micros: 1_700_000_000_000_000,
            ingress,
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

    fn parsed(line: &mut Line, record: &Record<'_>) -> serde_json::Value {
        let mut out = Vec::new();
        line.write(record, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap_or_default()
    }

    #[test]
    fn every_name_of_the_daemon_is_written_where_it_belongs() {
        let mut line = Line::new();
        let db: Arc<str> = Arc::from("db");
        let modes = [None, Some(Mode::Passthrough), Some(Mode::Terminate)];
        for mode in modes {
            for reason in Reason::ALL {
                let json = parsed(&mut line, &record(&db, mode, Outcome::Refused { reason }));
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
                    let json = parsed(&mut line, &record(&db, mode, outcome));
                    assert_eq!(json["end"], end.as_str());
                    assert_eq!(json["path"], path.as_str());
                    assert_eq!(json["mode"], serde_json::json!(mode.map(metrics::mode_str)));
                    assert_eq!(json["client_to_backend_bytes"], 1);
                    assert_eq!(json["relayed_bytes"], 3);
                }
            }
        }
    }

    #[test]
    fn names_and_addresses_are_never_mixed_up_or_left_unescaped() {
        let mut line = Line::new();
        // More names than slots, so slots are taken over; one needs escaping, one is longer
        // than a run held in place, and every other one is a different name of equal text.
        let names: Vec<Arc<str>> = (0..300)
            .map(|i| match i % 5 {
                0 => Arc::from(format!("we\"ird\\{i}")),
                1 => Arc::from(format!("{i}-{}", "long".repeat(40))),
                _ => Arc::from(format!("name-{}", i / 2)),
            })
            .collect();
        for round in 0..3 {
            for (i, name) in names.iter().enumerate() {
                let rule = names.get((i + round + 1) % names.len());
                let instance = names.get((i + round + 2) % names.len());
                // Clients and backends alternate between a few addresses.
                let client: SocketAddr = format!("10.{}.0.{}:{}", i % 3, i % 2, 1000 + i)
                    .parse()
                    .unwrap_or_else(|_| unreachable!());
                let backend: SocketAddr = format!("192.168.{}.7:{}", i % 2, 5432 + i % 4)
                    .parse()
                    .unwrap_or_else(|_| unreachable!());
                let refused = Record {
                    rule,
                    client,
                    ..record(
                        name,
                        None,
                        Outcome::Refused {
                            reason: Reason::UnknownSni,
                        },
                    )
                };
                let flow = Record {
                    rule,
                    client,
                    instance: instance.map(Name::Shared),
                    backend: Some(backend),
                    ..record(
                        name,
                        Some(Mode::Passthrough),
                        Outcome::Flow {
                            id: 9,
                            path: FlowPath::Sockmap,
                            client_to_backend_bytes: 1,
                            backend_to_client_bytes: 2,
                            relayed_bytes: 0,
                            end: FlowEnd::Closed,
                        },
                    )
                };
                for record in [refused, flow] {
                    let json = parsed(&mut line, &record);
                    assert_eq!(json["ingress"], &**name);
                    assert_eq!(json["rule"], serde_json::json!(rule.map(|r| &**r)));
                    if let Some(Name::Shared(instance)) = record.instance {
                        assert_eq!(json["instance"], &**instance);
                    }
                    assert_eq!(json["client"], client.to_string());
                    if record.backend.is_some() {
                        assert_eq!(json["backend"], backend.to_string());
                    }
                }
            }
        }
    }
}
