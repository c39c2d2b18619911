//! Router-level tests through `oneshot`: routing, the OpenAPI document against the route table
//! and the router, authentication, readiness probes.
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt as _;

use super::*;
use crate::config::ApiToken;
use crate::control::{ControlPlane, Shared};
use crate::listeners::ClosingHandler;

struct Fixture {
    state: AppState,
    dir: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fixture(token: Option<&str>) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "ingressd-api-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let config = crate::config::Config {
        data_dir: dir.clone(),
        listen_addr: "127.0.0.1".parse().unwrap(),
        api_token: token.map(ApiToken::from),
        ..Default::default()
    };
    let token = config.validate().unwrap();
    let control =
        ControlPlane::new(Shared::new(config).unwrap(), Arc::new(ClosingHandler)).unwrap();
    control.load().await;
    Fixture {
        state: AppState::new(Arc::new(control), token),
        dir,
    }
}

async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    body: Option<serde_json::Value>,
    auth: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let resp = app(state.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// `path` with each `{param}` filled in (`{port}` with a port number, the rest with `x`).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| match seg {
            "{port}" => "4000",
            s if s.starts_with('{') => "x",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_operations_the_router_serves() {
    let f = fixture(None).await;
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    // What the route table registered: the only way a route reaches the router.
    let table = route_table().served;
    let served: std::collections::BTreeSet<(String, String)> = table
        .iter()
        .map(|(verb, path)| (verb.as_str().to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(
        served.len(),
        table.len(),
        "an operation is registered twice"
    );
    assert_eq!(documented, served, "(method, path) documented vs served");

    // The router itself, probed: every documented operation is routed; any other method on a
    // routed path is 405; the collection of an item path and the items of a collection path
    // are not routed unless documented. A route added beside the table fails here too when it
    // is one of these.
    let paths: std::collections::BTreeSet<String> =
        documented.iter().map(|(_, p)| p.clone()).collect();
    let mut candidates = paths.clone();
    for path in &paths {
        match path.rsplit_once('/') {
            Some((parent, last)) if last.starts_with('{') && !parent.is_empty() => {
                candidates.insert(parent.to_owned());
            }
            _ => {
                let has_items = paths.iter().any(|p| {
                    p.strip_prefix(&format!("{path}/{{"))
                        .is_some_and(|rest| !rest.contains('/'))
                });
                if !has_items {
                    candidates.insert(format!("{path}/{{x}}"));
                }
            }
        }
    }
    assert!(candidates.contains("/port-claims") && candidates.contains("/ports/{x}"));
    for path in &candidates {
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let uri = concrete(path);
            let (status, body) = call(&f.state, method, &uri, None, None).await;
            let no_route = status == StatusCode::NOT_FOUND
                && body["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("no route");
            if documented.contains(&(method.to_owned(), path.clone())) {
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED && !no_route,
                    "{method} {path} is documented but not served: {status} {body}"
                );
            } else if paths.contains(path) {
                assert_eq!(
                    (status, body["code"].as_str()),
                    (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
                    "{method} {uri} is served but not documented: {body}"
                );
            } else {
                assert!(
                    no_route,
                    "{method} {uri} is served but not documented: {status} {body}"
                );
            }
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_error_shape() {
    let f = fixture(None).await;
    let (status, body) = call(&f.state, "GET", "/v2/things", None, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            serde_json::json!({"code": "not_found", "message": "no route for /v2/things"})
        )
    );
    let (status, body) = call(&f.state, "DELETE", "/ports", None, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"code": "method_not_allowed", "message": "method DELETE is not allowed on /ports"})
        )
    );
}

#[tokio::test]
async fn token_is_required_except_for_health() {
    let f = fixture(Some("tok")).await;
    let unauthorized =
        serde_json::json!({"code": "unauthorized", "message": "missing or wrong bearer token"});
    assert_eq!(
        call(&f.state, "GET", "/ports", None, None).await,
        (StatusCode::UNAUTHORIZED, unauthorized.clone())
    );
    assert_eq!(
        call(&f.state, "GET", "/ports", None, Some("Bearer tok2")).await,
        (StatusCode::UNAUTHORIZED, unauthorized.clone())
    );
    assert_eq!(
        call(&f.state, "GET", "/ports", None, Some("Bearer to")).await,
        (StatusCode::UNAUTHORIZED, unauthorized)
    );
    assert_eq!(
        call(&f.state, "GET", "/ports", None, Some("Bearer tok"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&f.state, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&f.state, "GET", "/readyz", None, None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn readiness_reflects_probes_and_failed_records() {
    struct Ebpf(bool);
    impl ReadinessProbe for Ebpf {
        fn name(&self) -> &'static str {
            "splice"
        }
        fn report(&self) -> ProbeReport {
            ProbeReport {
                ready: self.0,
                detail: serde_json::json!({"offload": "required"}),
            }
        }
    }
    let mut f = fixture(None).await;
    let (status, body) = call(&f.state, "GET", "/readyz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    assert_eq!(body["failed_records"], serde_json::json!([]));
    f.state.probes = Arc::new(vec![Arc::new(Ebpf(false))]);
    let (status, body) = call(&f.state, "GET", "/readyz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"))
    );
    assert_eq!(
        body["components"]["splice"],
        serde_json::json!({"ready": false, "detail": {"offload": "required"}})
    );
    f.state.probes = Arc::new(vec![Arc::new(Ebpf(true))]);
    // A corrupt record on disk, loaded by a second control plane on the same data dir.
    std::fs::write(f.dir.join("instances/bad.json"), b"{").unwrap();
    let control =
        ControlPlane::new(f.state.control.shared().clone(), Arc::new(ClosingHandler)).unwrap();
    control.load().await;
    f.state.control = Arc::new(control);
    let (status, body) = call(&f.state, "GET", "/readyz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("degraded"))
    );
    assert_eq!(body["failed_records"][0]["path"], "instances/bad.json");
    assert_eq!(
        call(&f.state, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn create_get_and_delete_through_the_router() {
    let f = fixture(None).await;
    let (status, _) = call(
        &f.state,
        "PUT",
        "/instances/db",
        Some(serde_json::json!({"address": "127.0.0.1"})),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = serde_json::json!({"name": "pg", "listen_port": port, "default_target": {"instance": "db", "port": 5432}});
    let (status, created) = call(&f.state, "POST", "/tcp-ingresses", Some(spec), None).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, got) = call(&f.state, "GET", "/tcp-ingresses/pg", None, None).await;
    assert_eq!((status, &got), (StatusCode::OK, &created));
    let (status, _) = call(
        &f.state,
        "DELETE",
        &format!("/tcp-ingresses/{}", &created["id"].as_str().unwrap()[..4]),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = call(&f.state, "GET", "/tcp-ingresses/pg", None, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn metrics_are_public_and_flows_need_the_token() {
    let f = fixture(Some("tok")).await;
    let resp = app(f.state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"],
        crate::metrics::exposition::TEXT_CONTENT_TYPE
    );
    let text = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(text.contains("# TYPE ingressd_build_info gauge"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    let resp = app(f.state.clone())
        .oneshot(
            Request::get("/metrics")
                .header("accept", "application/openmetrics-text; version=1.0.0")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        crate::metrics::exposition::OPENMETRICS_CONTENT_TYPE
    );
    assert_eq!(
        call(&f.state, "GET", "/flows", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.state, "GET", "/flows?limit=5", None, Some("Bearer tok")).await,
        (
            StatusCode::OK,
            serde_json::json!({"flows": [], "next_after": null})
        )
    );
    assert_eq!(
        call(&f.state, "GET", "/flows?limit=0", None, Some("Bearer tok"))
            .await
            .1["code"],
        "bad_request"
    );
}

#[test]
fn the_openapi_document_bounds_a_rules_alpn_list() {
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let rule = &doc["components"]["schemas"]["Rule"];
    let alpn = &rule["properties"]["alpn"];
    assert_eq!(alpn["type"], "array", "{rule}");
    assert_eq!(
        (alpn["minItems"].as_u64(), alpn["maxItems"].as_u64()),
        (Some(1), Some(8))
    );
    assert_eq!(alpn["uniqueItems"], true);
    let name = &alpn["items"];
    assert_eq!(name["type"], "string");
    assert_eq!(
        (name["minLength"].as_u64(), name["maxLength"].as_u64()),
        (Some(1), Some(255))
    );
    assert_eq!(name["pattern"], "^[\\x20-\\x7e]+$");
    let required = rule["required"].as_array().unwrap();
    assert!(!required.iter().any(|r| r == "alpn"), "{rule}");
}
