//! Handlers for `/port-claims`, `/ports`, `/instances` and `/certificates`.
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::AppState;
use super::error::{ApiJson, ErrorBody};
use crate::error::ApiError;
use crate::model::{
    Certificate, CertificateSpec, Instance, InstanceSpec, PortClaim, PortClaimSpec, PortEntry,
};

fn parse_port(raw: &str) -> Result<u16, ApiError> {
    raw.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
        ApiError::bad_request(format!("port: {raw:?} is not a port number (1-65535)"))
    })
}

fn created(is_new: bool) -> StatusCode {
    if is_new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// Claim a port for an external owner (idempotent for the same owner).
#[utoipa::path(put, path = "/port-claims/{port}", tag = "ports", request_body = PortClaimSpec,
    params(("port" = u16, Path, minimum = 1, maximum = 65535)),
    responses((status = 201, body = PortClaim), (status = 200, body = PortClaim),
        (status = 400, description = "bad_request, invalid_name", body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "already_exists, port_in_use, port_reserved", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn put_claim(
    State(s): State<AppState>,
    Path(port): Path<String>,
    ApiJson(spec): ApiJson<PortClaimSpec>,
) -> Result<(StatusCode, Json<PortClaim>), ApiError> {
    let (claim, is_new) = s.control.put_claim(parse_port(&port)?, spec).await?;
    Ok((created(is_new), Json(claim)))
}

/// Release an external port claim.
#[utoipa::path(delete, path = "/port-claims/{port}", tag = "ports",
    params(("port" = u16, Path, minimum = 1, maximum = 65535)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_claim(
    State(s): State<AppState>,
    Path(port): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.control.delete_claim(parse_port(&port)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every owned port: reserved, claimed, and TCP ingress listeners.
#[utoipa::path(get, path = "/ports", tag = "ports",
    responses((status = 200, body = Vec<PortEntry>), (status = 401, body = ErrorBody)))]
pub async fn ports(State(s): State<AppState>) -> Json<Vec<PortEntry>> {
    Json(s.control.ports().await)
}

/// Register or move a static instance.
#[utoipa::path(put, path = "/instances/{name}", tag = "instances", request_body = InstanceSpec,
    params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", min_length = 1, max_length = 63)),
    responses((status = 201, body = Instance), (status = 200, body = Instance),
        (status = 400, description = "bad_request, invalid_name, backend_not_allowed", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn put_instance(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<InstanceSpec>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let (inst, is_new) = s.control.put_instance(&name, spec).await?;
    Ok((created(is_new), Json(inst)))
}

/// Get a static instance.
#[utoipa::path(get, path = "/instances/{name}", tag = "instances", params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", min_length = 1, max_length = 63)),
    responses((status = 200, body = Instance), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_instance(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Instance>, ApiError> {
    Ok(Json(s.control.get_instance(&name)?))
}

/// List static instances.
#[utoipa::path(get, path = "/instances", tag = "instances",
    responses((status = 200, body = Vec<Instance>), (status = 401, body = ErrorBody)))]
pub async fn list_instances(State(s): State<AppState>) -> Json<Vec<Instance>> {
    Json(s.control.list_instances())
}

/// Remove a static instance.
#[utoipa::path(delete, path = "/instances/{name}", tag = "instances", params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", min_length = 1, max_length = 63)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_instance(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.control.delete_instance(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Store a certificate chain and key for terminate mode; the key is never returned.
#[utoipa::path(post, path = "/certificates", tag = "certificates", request_body = CertificateSpec,
    responses((status = 201, body = Certificate),
        (status = 400, description = "bad_request, invalid_name, invalid_certificate", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, description = "already_exists", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn create_certificate(
    State(s): State<AppState>,
    ApiJson(spec): ApiJson<CertificateSpec>,
) -> Result<(StatusCode, Json<Certificate>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(s.control.create_certificate(spec).await?),
    ))
}

/// List certificates.
#[utoipa::path(get, path = "/certificates", tag = "certificates",
    responses((status = 200, body = Vec<Certificate>), (status = 401, body = ErrorBody)))]
pub async fn list_certificates(State(s): State<AppState>) -> Json<Vec<Certificate>> {
    Json(s.control.list_certificates())
}

/// Get a certificate's metadata.
#[utoipa::path(get, path = "/certificates/{name}", tag = "certificates", params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", min_length = 1, max_length = 63)),
    responses((status = 200, body = Certificate), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_certificate(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Certificate>, ApiError> {
    Ok(Json(s.control.get_certificate(&name)?))
}

/// Delete a certificate unless a terminate rule still needs it.
#[utoipa::path(delete, path = "/certificates/{name}", tag = "certificates", params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", min_length = 1, max_length = 63)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "in_use", body = ErrorBody)))]
pub async fn delete_certificate(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.control.delete_certificate(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
