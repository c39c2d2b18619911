//! `/metrics` (Prometheus) and `/flows` (live flows, paged).
use std::future::Future;
use std::pin::Pin;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::ErrorBody;
use crate::error::ApiError;
use crate::metrics::{Metrics, exposition};

/// Flows listed when `limit` is not given.
pub const DEFAULT_FLOW_LIMIT: usize = 100;

/// Most flows one page lists.
pub const MAX_FLOW_LIMIT: usize = 1000;

/// What the data path shows the API (implemented by the data path; absent in builds and tests
/// without one).
pub trait Observe: Send + Sync + 'static {
    /// The metrics exposition, OpenMetrics text.
    fn metrics(&self) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
    /// At most `limit` live flows with an ID above `after`, in ID order.
    fn flows(
        &self,
        after: u64,
        limit: usize,
    ) -> Pin<Box<dyn Future<Output = Vec<FlowEntry>> + Send + '_>>;
}

/// Bytes of one direction, by who moved them.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct ByteCounts {
    /// Moved by the kernel: redirected by the eBPF program (`sockmap`, its per-flow counter) or
    /// spliced between a kTLS socket and the backend (`ktls_splice`).
    pub kernel: u64,
    /// Relayed by the daemon.
    pub relayed: u64,
}

/// A live flow.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FlowEntry {
    /// Daemon-wide flow ID (as in the access log's `flow_id`).
    pub id: u64,
    /// The ingress name.
    pub ingress: String,
    /// `passthrough` or `terminate`.
    pub mode: String,
    /// The path carrying its bytes: `sockmap`, `ktls_splice` or `userspace`.
    pub path: String,
    /// The client's address.
    pub client: Option<String>,
    /// The backend's address.
    pub backend: Option<String>,
    /// Milliseconds since the hand-off.
    pub age_ms: u64,
    /// Client → backend bytes so far.
    pub client_to_backend: ByteCounts,
    /// Backend → client bytes so far.
    pub backend_to_client: ByteCounts,
    /// Whether a direction is in backpressure (gate closed) now.
    pub gated: bool,
    /// Times the gate closed.
    pub gate_closures: u64,
    /// Version of the eBPF program that judged the flow's bytes last (`sockmap` flows; 0 when
    /// it has judged none yet, and on other paths). A flow keeps the program it started with
    /// across takeovers.
    pub program_version: u32,
}

/// A page of live flows.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowList {
    /// The flows, in ID order.
    pub flows: Vec<FlowEntry>,
    /// The `after` of the next page; `null` when this page is the last.
    pub next_after: Option<u64>,
}

/// Prometheus metrics: OpenMetrics when the client asks for it (Prometheus does), else the
/// Prometheus text format 0.0.4.
#[utoipa::path(get, path = "/metrics", tag = "health", security(()),
    responses((status = 200, description = "Prometheus text format 0.0.4, or OpenMetrics 1.0 when \
        the Accept header names application/openmetrics-text", content_type = "text/plain", body = String)))]
pub async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let openmetrics = match &s.observe {
        Some(observe) => observe.metrics().await,
        None => Metrics::new().render(None),
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if exposition::wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, exposition::OPENMETRICS_CONTENT_TYPE)],
            openmetrics,
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, exposition::TEXT_CONTENT_TYPE)],
            exposition::to_text_004(&openmetrics),
        )
            .into_response()
    }
}

fn parse_query(raw: Option<&str>) -> Result<(u64, usize), ApiError> {
    let (mut after, mut limit) = (0u64, DEFAULT_FLOW_LIMIT);
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "after" => {
                // Flow IDs are int64 in the schema (JSON clients lose precision above it).
                after = value
                    .parse::<i64>()
                    .ok()
                    .and_then(|a| u64::try_from(a).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "after: {value:?} is not a flow ID (0 to {})",
                            i64::MAX
                        ))
                    })?;
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_FLOW_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit: {value:?} is not a number from 1 to {MAX_FLOW_LIMIT}"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    Ok((after, limit))
}

/// Live flows with their counters, in ID order, paged: pass the previous page's `next_after`
/// as `after`.
#[utoipa::path(get, path = "/flows", tag = "flows",
    params(
        ("after" = Option<u64>, Query, description = "List flows with an ID above this one (default 0)."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Flows per page (default 100).")),
    responses((status = 200, body = FlowList), (status = 400, description = "bad_request", body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn flows(
    State(s): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<FlowList>, ApiError> {
    let (after, limit) = parse_query(query.as_deref())?;
    let flows = match &s.observe {
        Some(observe) => observe.flows(after, limit).await,
        None => Vec::new(),
    };
    let next_after = (flows.len() == limit)
        .then(|| flows.last().map(|f| f.id))
        .flatten();
    Ok(Json(FlowList { flows, next_after }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_queries_are_bounded() {
        assert_eq!(parse_query(None).ok(), Some((0, DEFAULT_FLOW_LIMIT)));
        assert_eq!(parse_query(Some("after=7&limit=3")).ok(), Some((7, 3)));
        for bad in [
            "limit=0",
            "limit=1001",
            "after=x",
            "after=-1",
            "after=9223372036854775808",
            "page=2",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
