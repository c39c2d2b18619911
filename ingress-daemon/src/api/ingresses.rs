//! `/tcp-ingresses` handlers.
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::AppState;
use super::error::{ApiJson, ErrorBody};
use crate::error::ApiError;
use crate::model::{IngressSpec, TcpIngress};

/// List every TCP ingress.
#[utoipa::path(get, path = "/tcp-ingresses", tag = "tcp-ingresses",
    responses((status = 200, body = Vec<TcpIngress>), (status = 401, body = ErrorBody)))]
pub async fn list(State(s): State<AppState>) -> Json<Vec<TcpIngress>> {
    Json(s.control.list_ingresses().await)
}

/// Create a TCP ingress and bind its listener.
#[utoipa::path(post, path = "/tcp-ingresses", tag = "tcp-ingresses", request_body = IngressSpec,
    responses(
        (status = 201, body = TcpIngress),
        (status = 400, description = "bad_request, invalid_name, invalid_pattern, instance_not_found, no_certificate, backend_not_allowed", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "already_exists, port_in_use, port_reserved, sni_conflict", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    ApiJson(spec): ApiJson<IngressSpec>,
) -> Result<(StatusCode, Json<TcpIngress>), ApiError> {
    let ingress = s.control.create_ingress(spec).await?;
    Ok((StatusCode::CREATED, Json(ingress)))
}

/// Get a TCP ingress by ID, name or unique ID prefix.
#[utoipa::path(get, path = "/tcp-ingresses/{id}", tag = "tcp-ingresses",
    params(("id" = String, Path, description = "ID, name or unique ID prefix")),
    responses((status = 200, body = TcpIngress), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "ambiguous", body = ErrorBody)))]
pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TcpIngress>, ApiError> {
    Ok(Json(s.control.get_ingress(&id).await?))
}

/// Replace a TCP ingress (its name stays; a new `listen_port` rebinds).
#[utoipa::path(put, path = "/tcp-ingresses/{id}", tag = "tcp-ingresses", request_body = IngressSpec,
    params(("id" = String, Path, description = "ID, name or unique ID prefix")),
    responses(
        (status = 200, body = TcpIngress),
        (status = 400, description = "bad_request, invalid_name, invalid_pattern, instance_not_found, no_certificate, backend_not_allowed", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "already_exists, port_in_use, port_reserved, sni_conflict, ambiguous", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn replace(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(spec): ApiJson<IngressSpec>,
) -> Result<Json<TcpIngress>, ApiError> {
    Ok(Json(s.control.replace_ingress(&id, spec).await?))
}

/// Delete a TCP ingress; its listener closes, established connections continue.
#[utoipa::path(delete, path = "/tcp-ingresses/{id}", tag = "tcp-ingresses",
    params(("id" = String, Path, description = "ID, name or unique ID prefix")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "ambiguous", body = ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.control.delete_ingress(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
