//! The metric families, written through `prometheus-client`'s encoder at scrape time.

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use super::{
    DIRECTIONS, DataPathView, FlowPath, IngressMetrics, MODES, Metrics, PATHS, ProcessSample,
    build_info,
};
use crate::{model::Mode, proxy::Reason, splice};

type Fmt = Result<(), std::fmt::Error>;

/// One scrape's worth of state; encoded once, then dropped.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    view: Option<DataPathView>,
    process: ProcessSample,
}

/// Encodes everything as OpenMetrics text.
pub(super) fn render(
    metrics: Arc<Metrics>,
    view: Option<DataPathView>,
    process: ProcessSample,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        metrics,
        view,
        process,
    }));
    let mut out = String::with_capacity(16 << 10);
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %err, "encoding metrics failed");
    }
    out
}

fn counter(mut e: MetricEncoder<'_>, value: u64) -> Fmt {
    e.encode_counter::<NoLabelSet, u64, f64>(&value, None)
}

fn gauge(mut e: MetricEncoder<'_>, value: i64) -> Fmt {
    e.encode_gauge(&value)
}

/// One family: a descriptor, then one sample per label set.
fn family<'a, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = Sample<'a, L>>,
) -> Fmt {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, write) in samples {
        write(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family with no labels and one value.
fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    write: impl FnOnce(MetricEncoder<'_>) -> Fmt,
) -> Fmt {
    write(encoder.encode_descriptor(name, help, None, kind)?)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type Sample<'a, L> = (L, Box<dyn FnOnce(MetricEncoder<'_>) -> Fmt + 'a>);

impl Scrape {
    fn per_ingress<'a, L: 'a>(
        ingresses: &'a [Arc<IngressMetrics>],
        mut each: impl FnMut(&'a IngressMetrics, &mut Vec<Sample<'a, L>>),
    ) -> Vec<Sample<'a, L>> {
        let mut samples = Vec::new();
        for m in ingresses {
            each(m, &mut samples);
        }
        samples
    }

    fn connections(&self, e: &mut DescriptorEncoder<'_>, ing: &[Arc<IngressMetrics>]) -> Fmt {
        family(
            e,
            "ingressd_connections_accepted",
            "Connections accepted on the ingress's listener.",
            MetricType::Counter,
            Self::per_ingress(ing, |m, s| {
                let v = m.accepted();
                s.push(([("ingress", &*m.name)], Box::new(move |e| counter(e, v))));
            }),
        )?;
        family(
            e,
            "ingressd_connections_routed",
            "Connections that became flows: routed, connected and handed to a path.",
            MetricType::Counter,
            Self::per_ingress(ing, |m, s| {
                let v = m.routed();
                s.push(([("ingress", &*m.name)], Box::new(move |e| counter(e, v))));
            }),
        )?;
        family(
            e,
            "ingressd_connections_refused",
            "Connections refused, by stable reason.",
            MetricType::Counter,
            Self::per_ingress(ing, |m, s| {
                for reason in Reason::ALL {
                    let v = m.refused(reason);
                    s.push((
                        [("ingress", &*m.name), ("reason", reason.as_str())],
                        Box::new(move |e| counter(e, v)),
                    ));
                }
            }),
        )?;
        family(
            e,
            "ingressd_connections_pending",
            "Connections accepted and neither routed nor refused yet (reading the hello, \
             connecting).",
            MetricType::Gauge,
            Self::per_ingress(ing, |m, s| {
                // Outcomes are read before `accepted`, so the difference is never negative.
                let done = m.routed() + Reason::ALL.iter().map(|r| m.refused(*r)).sum::<u64>();
                let v = as_i64(m.accepted().saturating_sub(done));
                s.push(([("ingress", &*m.name)], Box::new(move |e| gauge(e, v))));
            }),
        )
    }

    fn flows(&self, e: &mut DescriptorEncoder<'_>, ing: &[Arc<IngressMetrics>]) -> Fmt {
        family(
            e,
            "ingressd_flows_active",
            "Live flows by mode and by the path carrying their bytes.",
            MetricType::Gauge,
            Self::per_ingress(ing, |m, s| {
                for (mode, mode_name) in [Mode::Passthrough, Mode::Terminate].iter().zip(MODES) {
                    for (path, path_name) in
                        [FlowPath::Sockmap, FlowPath::KtlsSplice, FlowPath::Userspace]
                            .iter()
                            .zip(PATHS)
                    {
                        let v = as_i64(m.active(*mode, *path));
                        s.push((
                            [
                                ("ingress", &*m.name),
                                ("mode", mode_name),
                                ("path", path_name),
                            ],
                            Box::new(move |e| gauge(e, v)),
                        ));
                    }
                }
            }),
        )?;
        family(
            e,
            "ingressd_flows_ended",
            "Flows ended, by how they ended.",
            MetricType::Counter,
            Self::per_ingress(ing, |m, s| {
                for end in splice::FlowEnd::ALL {
                    let v = m
                        .ends
                        .get(end as usize)
                        .map_or(0, |c| c.load(Ordering::Relaxed));
                    s.push((
                        [("ingress", &*m.name), ("end", end.as_str())],
                        Box::new(move |e| counter(e, v)),
                    ));
                }
            }),
        )?;
        family(
            e,
            "ingressd_tls_key_updates",
            "TLS 1.3 KeyUpdates on terminated kTLS flows whose new keys went into the kernel, \
             by the direction the keys protect (client_to_backend: the client's KeyUpdate; \
             backend_to_client: ours, sent when the client asked for it or after half the \
             suite's usage limit). Kernels before 6.14 cannot take new keys: there a \
             client's KeyUpdate ends the flow as tls_key_update instead.",
            MetricType::Counter,
            Self::per_ingress(ing, |m, s| {
                for (d, direction) in DIRECTIONS.iter().enumerate() {
                    let v = m
                        .key_updates
                        .get(d)
                        .map_or(0, |c| c.load(Ordering::Relaxed));
                    s.push((
                        [("ingress", &*m.name), ("direction", direction)],
                        Box::new(move |e| counter(e, v)),
                    ));
                }
            }),
        )?;
        let empty = splice::Usage::default();
        let usage = self.view.as_ref().map_or(&empty, |v| &v.usage);
        family(
            e,
            "ingressd_bytes",
            "Bytes moved, by direction and by the path that carried them: sockmap bytes were \
             redirected by the kernel (read from the eBPF per-flow counters), ktls_splice bytes \
             were spliced between a kTLS socket and the backend, userspace bytes were relayed \
             by the daemon.",
            MetricType::Counter,
            Self::per_ingress(ing, |m, s| {
                let engine = usage
                    .bytes_by_tag
                    .get(m.tag as usize)
                    .copied()
                    .unwrap_or_default();
                let dirs = [engine.client_to_backend, engine.backend_to_client];
                for (d, (bytes, direction)) in dirs.iter().zip(DIRECTIONS).enumerate() {
                    let relayed =
                        bytes.relayed + m.relayed.get(d).map_or(0, |c| c.load(Ordering::Relaxed));
                    let ktls = m
                        .ktls_spliced
                        .get(d)
                        .map_or(0, |c| c.load(Ordering::Relaxed));
                    for (path, v) in [
                        ("sockmap", bytes.kernel),
                        ("ktls_splice", ktls),
                        ("userspace", relayed),
                    ] {
                        s.push((
                            [
                                ("ingress", &*m.name),
                                ("direction", direction),
                                ("path", path),
                            ],
                            Box::new(move |e| counter(e, v)),
                        ));
                    }
                }
            }),
        )
    }

    fn histograms(&self, e: &mut DescriptorEncoder<'_>, ing: &[Arc<IngressMetrics>]) -> Fmt {
        type Pick = fn(&IngressMetrics) -> &super::DurationHistogram;
        let phases: [(&str, &str, Pick); 3] = [
            (
                "ingressd_client_hello_duration_seconds",
                "Time from accept to a complete ClientHello (including a Postgres SSLRequest).",
                |m| &m.hello,
            ),
            (
                "ingressd_connect_duration_seconds",
                "Time from a complete ClientHello to a connected backend: route, resolve, \
                 policy, connect, PROXY header.",
                |m| &m.connect,
            ),
            (
                "ingressd_tls_handshake_duration_seconds",
                "Time from a complete ClientHello to a finished TLS handshake (terminate mode).",
                |m| &m.tls_handshake,
            ),
        ];
        for (name, help, pick) in phases {
            family(
                e,
                name,
                help,
                MetricType::Histogram,
                Self::per_ingress(ing, |m, s| {
                    s.push((
                        [("ingress", &*m.name)],
                        Box::new(move |e| pick(m).encode(e)),
                    ));
                }),
            )?;
        }
        family(
            e,
            "ingressd_flow_duration_seconds",
            "Time from hand-off to the end of a flow, by mode.",
            MetricType::Histogram,
            Self::per_ingress(ing, |m, s| {
                for (h, mode) in m.flow_duration.iter().zip(MODES) {
                    s.push((
                        [("ingress", &*m.name), ("mode", mode)],
                        Box::new(move |e| h.encode(e)),
                    ));
                }
            }),
        )
    }

    fn offload(&self, e: &mut DescriptorEncoder<'_>) -> Fmt {
        let v = self.view.clone().unwrap_or_default();
        single(
            e,
            "ingressd_offload_program_loaded",
            "1 when the eBPF verdict program is loaded and attached (new passthrough flows take \
             the sockmap path).",
            MetricType::Gauge,
            |e| gauge(e, i64::from(v.program_loaded)),
        )?;
        single(
            e,
            "ingressd_ebpf_program_version",
            "Version of the eBPF verdict program new passthrough flows run (0 when none is \
             loaded); live flows keep the program they started with.",
            MetricType::Gauge,
            |e| gauge(e, i64::from(v.program_version)),
        )?;
        single(
            e,
            "ingressd_ebpf_program_inherited",
            "1 when new flows run the previous daemon's verdict program because this daemon \
             could not attach its own to the handed-over maps after a takeover.",
            MetricType::Gauge,
            |e| gauge(e, i64::from(v.program_inherited)),
        )?;
        single(
            e,
            "ingressd_ktls_available",
            "1 when the kernel offers kernel TLS.",
            MetricType::Gauge,
            |e| gauge(e, i64::from(v.ktls_available)),
        )?;
        single(
            e,
            "ingressd_flows_gated",
            "Live kernel flows with a direction in backpressure (its gate closed: bytes pass \
             through the daemon until the receiver catches up).",
            MetricType::Gauge,
            |e| gauge(e, as_i64(v.usage.gated_flows)),
        )?;
        single(
            e,
            "ingressd_gate_closures",
            "Times a kernel flow's gate closed (backpressure episodes).",
            MetricType::Counter,
            |e| counter(e, v.usage.gate_closures),
        )?;
        single(
            e,
            "ingressd_retransmit_overlap_bytes",
            "Bytes the kernel path cut from the head of retransmitted segments because they \
             repeated bytes already forwarded (never forwarded twice).",
            MetricType::Counter,
            |e| counter(e, v.usage.overlap_trimmed),
        )?;
        single(
            e,
            "ingressd_sockhash_entries",
            "Sockets in the eBPF sockhash (two per kernel flow).",
            MetricType::Gauge,
            |e| gauge(e, as_i64(v.sockhash_entries)),
        )?;
        single(
            e,
            "ingressd_sockhash_capacity",
            "Sockets the eBPF sockhash can hold (0 when the program is not loaded).",
            MetricType::Gauge,
            |e| gauge(e, as_i64(v.sockhash_capacity)),
        )
    }

    fn daemon(&self, e: &mut DescriptorEncoder<'_>) -> Fmt {
        let log = &self.metrics.access_log;
        single(
            e,
            "ingressd_access_log_lines",
            "Access log lines written.",
            MetricType::Counter,
            |e| counter(e, log.written.load(Ordering::Relaxed)),
        )?;
        single(
            e,
            "ingressd_access_log_dropped",
            "Access log lines dropped because the writer fell behind or failed (the data path \
             never waits for it).",
            MetricType::Counter,
            |e| counter(e, log.dropped.load(Ordering::Relaxed)),
        )?;
        let (version, commit) = build_info();
        let build: Sample<'_, _> = (
            [("version", version), ("commit", commit)],
            Box::new(|e| gauge(e, 1)),
        );
        family(
            e,
            "ingressd_build_info",
            "The version and commit of this build (value 1).",
            MetricType::Gauge,
            [build],
        )?;
        let p = self.process;
        let gauges = [
            (
                "process_open_fds",
                "Open file descriptors.",
                p.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "The soft limit of open file descriptors.",
                p.max_fds.map(|v| v as f64),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory in bytes.",
                p.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                Some(p.start_time_seconds),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                single(e, name, help, MetricType::Gauge, |mut e| e.encode_gauge(&v))?;
            }
        }
        if let Some(cpu) = p.cpu_seconds {
            single(
                e,
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                MetricType::Counter,
                |mut e| e.encode_counter::<NoLabelSet, f64, f64>(&cpu, None),
            )?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Fmt {
        let ingresses = self.metrics.ingresses();
        self.connections(&mut encoder, &ingresses)?;
        self.flows(&mut encoder, &ingresses)?;
        self.histograms(&mut encoder, &ingresses)?;
        self.offload(&mut encoder)?;
        self.daemon(&mut encoder)
    }
}
