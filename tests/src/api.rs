//! A small blocking client for the daemon's REST API: every call returns the status and the
//! JSON body (or the raw text), so tests assert on both; transport failures are errors.
use std::{net::IpAddr, net::SocketAddr, time::Duration};

use reqwest::{Method, blocking::Client, header::CONTENT_TYPE};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// A response from the API.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The body parsed as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
    /// The body as text.
    pub text: String,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
}

impl ApiResponse {
    /// The body, after asserting the status is `status` (the panic message shows the body).
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        &self.body
    }

    /// The stable error code of an error response (`{"code": "...", "message": "..."}`).
    pub fn error_code(&self) -> Option<&str> {
        self.body.get("code")?.as_str()
    }
}

/// A client for one daemon's API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: Client,
    token: Option<String>,
}

impl ApiClient {
    /// A client for the API at `addr`.
    pub fn new(addr: SocketAddr) -> Result<Self> {
        let http = Client::builder()
            // A proxy from the environment must never see test traffic.
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| Error::Http {
                method: "build".to_owned(),
                url: addr.to_string(),
                source,
            })?;
        Ok(Self {
            base: format!("http://{addr}"),
            http,
            token: None,
        })
    }

    /// The same client sending `Authorization: Bearer <token>`.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The same client sending no token.
    #[must_use]
    pub fn without_token(mut self) -> Self {
        self.token = None;
        self
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `method path` with an optional body of `content_type`.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<ApiResponse> {
        let url = self.url(path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some((content_type, bytes)) = body {
            req = req.header(CONTENT_TYPE, content_type).body(bytes);
        }
        let fail = |source| Error::Http {
            method: method.to_string(),
            url: url.clone(),
            source,
        };
        let resp = req.send().map_err(fail)?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().map_err(fail)?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(ApiResponse {
            status,
            body,
            text,
            content_type,
        })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<ApiResponse> {
        self.request(Method::GET, path, None)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<ApiResponse> {
        self.request(Method::DELETE, path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<ApiResponse> {
        self.request(
            Method::POST,
            path,
            Some(("application/json", body.to_string().into_bytes())),
        )
    }

    /// `PUT path` with a JSON body.
    pub fn put(&self, path: &str, body: &Value) -> Result<ApiResponse> {
        self.request(
            Method::PUT,
            path,
            Some(("application/json", body.to_string().into_bytes())),
        )
    }

    /// `GET /healthz`.
    pub fn healthz(&self) -> Result<ApiResponse> {
        self.get("/healthz")
    }

    /// `GET /readyz`.
    pub fn readyz(&self) -> Result<ApiResponse> {
        self.get("/readyz")
    }

    /// `GET /metrics` (Prometheus text in [`ApiResponse::text`]).
    pub fn metrics(&self) -> Result<ApiResponse> {
        self.get("/metrics")
    }

    /// `POST /tcp-ingresses`.
    pub fn create_ingress(&self, ingress: &Value) -> Result<ApiResponse> {
        self.post("/tcp-ingresses", ingress)
    }

    /// `GET /tcp-ingresses`.
    pub fn list_ingresses(&self) -> Result<ApiResponse> {
        self.get("/tcp-ingresses")
    }

    /// `GET /tcp-ingresses/{id}` (id, name or unique id prefix).
    pub fn get_ingress(&self, id: &str) -> Result<ApiResponse> {
        self.get(&format!("/tcp-ingresses/{id}"))
    }

    /// `PUT /tcp-ingresses/{id}`: replaces the whole ingress.
    pub fn replace_ingress(&self, id: &str, ingress: &Value) -> Result<ApiResponse> {
        self.put(&format!("/tcp-ingresses/{id}"), ingress)
    }

    /// `DELETE /tcp-ingresses/{id}`.
    pub fn delete_ingress(&self, id: &str) -> Result<ApiResponse> {
        self.delete(&format!("/tcp-ingresses/{id}"))
    }

    /// `PUT /instances/{name}` `{"address": addr}`.
    pub fn put_instance(&self, name: &str, addr: impl Into<IpAddr>) -> Result<ApiResponse> {
        self.put(
            &format!("/instances/{name}"),
            &json!({ "address": addr.into().to_string() }),
        )
    }

    /// `DELETE /instances/{name}`.
    pub fn delete_instance(&self, name: &str) -> Result<ApiResponse> {
        self.delete(&format!("/instances/{name}"))
    }

    /// `PUT /port-claims/{port}` `{"owner": owner}`.
    pub fn put_port_claim(&self, port: u16, owner: &str) -> Result<ApiResponse> {
        self.put(&format!("/port-claims/{port}"), &json!({ "owner": owner }))
    }

    /// `DELETE /port-claims/{port}`.
    pub fn delete_port_claim(&self, port: u16) -> Result<ApiResponse> {
        self.delete(&format!("/port-claims/{port}"))
    }

    /// `POST /certificates` `{"name", "cert_pem", "key_pem"}`.
    pub fn add_certificate(
        &self,
        name: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<ApiResponse> {
        self.post(
            "/certificates",
            &json!({ "name": name, "cert_pem": cert_pem, "key_pem": key_pem }),
        )
    }
}
