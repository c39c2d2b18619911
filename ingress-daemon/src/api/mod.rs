//! The REST API (axum): routes, authentication, readiness, and the generated OpenAPI document.
//!
//! Design: handlers are thin; every operation lives in [`ControlPlane`]. [`app`] builds the whole
//! router from an [`AppState`] so tests drive it with `oneshot` or through a real listener with
//! [`serve`]. Unknown routes and wrong methods get the API's JSON error shape; an outer
//! middleware enforces the bearer token (constant-time compare) on everything except
//! `/healthz`, `/readyz` and `/metrics`. The OpenAPI document is derived from the handlers'
//! `#[utoipa::path]` attributes; routes are added only through the route table (`routes`), which
//! records them, and a test checks the document against that record and probes the router.
pub mod error;
mod ingresses;
mod observe;
mod resources;
mod routes;

pub use observe::{ByteCounts, FlowEntry, FlowList, Observe};

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use subtle::ConstantTimeEq as _;
use utoipa::OpenApi as _;

use crate::config::ApiToken;
use crate::control::{ControlPlane, ControlStatus};
use crate::error::{ApiError, ErrorCode};
use error::ErrorBody;
use routes::{Routes, Verb};

/// Paths that never need the bearer token.
pub const PUBLIC_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// One component's readiness, as reported by a [`ReadinessProbe`].
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Whether the component is ready; any `false` makes `/readyz` answer 503.
    pub ready: bool,
    /// Detail shown under `components.<name>` in `/readyz`.
    pub detail: serde_json::Value,
}

/// A component that contributes to `/readyz` (e.g. the eBPF splice engine).
pub trait ReadinessProbe: Send + Sync + 'static {
    /// The key under `components` in `/readyz`.
    fn name(&self) -> &'static str;
    /// The component's current state.
    fn report(&self) -> ProbeReport;
}

/// Everything the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// The control plane.
    pub control: Arc<ControlPlane>,
    /// The bearer token, if one is configured.
    pub token: Option<ApiToken>,
    /// Extra readiness probes.
    pub probes: Arc<Vec<Arc<dyn ReadinessProbe>>>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The data path's metrics and live flows, when there is a data path.
    pub observe: Option<Arc<dyn Observe>>,
}

impl AppState {
    /// State with no extra probes, using the control plane's configured limits.
    pub fn new(control: Arc<ControlPlane>, token: Option<ApiToken>) -> Self {
        let max_body_bytes = control.shared().config.api_max_body_bytes;
        Self {
            control,
            token,
            probes: Arc::new(Vec::new()),
            max_body_bytes,
            observe: None,
        }
    }
}

/// Liveness: `{"status": "ok"}` (never depends on records or listeners).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// Readiness detail.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready`; `degraded` when records failed or listeners are unbound (still 200);
    /// `not_ready` when a component is not ready (503).
    pub status: String,
    /// Listeners, store and failed records.
    #[serde(flatten)]
    pub control: ControlStatus,
    /// Component probes (e.g. the eBPF splice engine).
    #[schema(value_type = Object)]
    pub components: BTreeMap<String, serde_json::Value>,
}

/// Liveness check.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()), responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Readiness check with detail.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let control = s.control.status().await;
    let mut components = BTreeMap::new();
    let mut ready = true;
    for probe in s.probes.iter() {
        let report = probe.report();
        ready &= report.ready;
        components.insert(
            probe.name().to_owned(),
            serde_json::json!({"ready": report.ready, "detail": report.detail}),
        );
    }
    let degraded = !control.failed_records.is_empty() || !control.unbound.is_empty();
    let (code, status) = match (ready, degraded) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        (true, true) => (StatusCode::OK, "degraded"),
        (true, false) => (StatusCode::OK, "ready"),
    };
    let body = Readiness {
        status: status.to_owned(),
        control,
        components,
    };
    (code, Json(body))
}

/// The OpenAPI document for this API.
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object),
        (status = 401, body = ErrorBody)))]
pub async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let body = DOC.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI description, generated from the handlers.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "ingressd", description = "SNI-routing TCP ingress control plane."),
    paths(
        ingresses::list, ingresses::create, ingresses::get, ingresses::replace, ingresses::delete,
        resources::put_claim, resources::delete_claim, resources::ports,
        resources::put_instance, resources::get_instance, resources::list_instances, resources::delete_instance,
        resources::create_certificate, resources::list_certificates, resources::get_certificate,
        resources::delete_certificate,
        healthz, readyz, openapi_json, observe::metrics, observe::flows,
    ),
    components(schemas(ErrorBody, FlowList, FlowEntry, ByteCounts)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {}", req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn authenticate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token
        && !PUBLIC_PATHS.contains(&req.uri().path())
    {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().as_bytes());
        let ok = given.is_some_and(|g| bool::from(g.ct_eq(token.as_bytes())));
        if !ok {
            let err = ApiError::new(ErrorCode::Unauthorized, "missing or wrong bearer token");
            let mut resp = err.into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    }
    next.run(req).await
}

/// Every operation of the API on its handler; the only place routes are added.
fn route_table() -> Routes {
    use Verb::{Delete, Get, Post, Put};
    Routes::new()
        .op(Get, "/tcp-ingresses", ingresses::list)
        .op(Post, "/tcp-ingresses", ingresses::create)
        .op(Get, "/tcp-ingresses/{id}", ingresses::get)
        .op(Put, "/tcp-ingresses/{id}", ingresses::replace)
        .op(Delete, "/tcp-ingresses/{id}", ingresses::delete)
        .op(Put, "/port-claims/{port}", resources::put_claim)
        .op(Delete, "/port-claims/{port}", resources::delete_claim)
        .op(Get, "/ports", resources::ports)
        .op(Get, "/instances", resources::list_instances)
        .op(Get, "/instances/{name}", resources::get_instance)
        .op(Put, "/instances/{name}", resources::put_instance)
        .op(Delete, "/instances/{name}", resources::delete_instance)
        .op(Get, "/certificates", resources::list_certificates)
        .op(Post, "/certificates", resources::create_certificate)
        .op(Get, "/certificates/{name}", resources::get_certificate)
        .op(
            Delete,
            "/certificates/{name}",
            resources::delete_certificate,
        )
        .op(Get, "/healthz", healthz)
        .op(Get, "/readyz", readyz)
        .op(Get, "/openapi.json", openapi_json)
        .op(Get, "/metrics", observe::metrics)
        .op(Get, "/flows", observe::flows)
}

/// The whole API router.
pub fn app(state: AppState) -> Router {
    route_table()
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Serves the API on a bound listener until `shutdown` resolves, then drains requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests;
