//! The API's stable error codes and the error every control-plane operation returns.
//!
//! Design: one table ([`ErrorCode::ALL`], [`ErrorCode::as_str`], [`ErrorCode::status`]) maps each
//! snake_case code to its HTTP status. Codes are a public contract: add, never rename. Every
//! subsystem error (store, certificates, listeners, validation) is turned into an [`ApiError`]
//! carrying a code and a message that names the offending field.
use serde::Serialize;

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed JSON, wrong types, unknown fields or an out-of-range value.
    BadRequest,
    /// A resource name does not match `^[a-z0-9]([a-z0-9-]*[a-z0-9])?$` (1–63).
    InvalidName,
    /// An SNI pattern or target template is invalid.
    InvalidPattern,
    /// A literal target names an instance that does not exist.
    InstanceNotFound,
    /// A terminate-mode rule has no stored certificate covering its SNI.
    NoCertificate,
    /// A backend address is outside the allowed networks.
    BackendNotAllowed,
    /// A certificate chain or private key cannot be used.
    InvalidCertificate,
    /// A bearer token is required and was missing or wrong.
    Unauthorized,
    /// No such resource or route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// A resource with this name (or a claim on this port) already exists.
    AlreadyExists,
    /// The port is owned by something else (another ingress, a claim or another process).
    PortInUse,
    /// The port is reserved.
    PortReserved,
    /// Two SNI patterns on one port can match the same hostname.
    SniConflict,
    /// An ID prefix matches several resources.
    Ambiguous,
    /// The resource is still referenced by an ingress.
    InUse,
    /// The request body exceeds the configured limit.
    TooLarge,
    /// An internal failure (storage, sockets); the message says which.
    InternalError,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [Self; 18] = [
        Self::BadRequest,
        Self::InvalidName,
        Self::InvalidPattern,
        Self::InstanceNotFound,
        Self::NoCertificate,
        Self::BackendNotAllowed,
        Self::InvalidCertificate,
        Self::Unauthorized,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::AlreadyExists,
        Self::PortInUse,
        Self::PortReserved,
        Self::SniConflict,
        Self::Ambiguous,
        Self::InUse,
        Self::TooLarge,
        Self::InternalError,
    ];

    /// The wire form of the code.
    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    /// The HTTP status code that goes with the code.
    pub fn status(self) -> u16 {
        self.entry().1
    }

    fn entry(self) -> (&'static str, u16) {
        match self {
            Self::BadRequest => ("bad_request", 400),
            Self::InvalidName => ("invalid_name", 400),
            Self::InvalidPattern => ("invalid_pattern", 400),
            Self::InstanceNotFound => ("instance_not_found", 400),
            Self::NoCertificate => ("no_certificate", 400),
            Self::BackendNotAllowed => ("backend_not_allowed", 400),
            Self::InvalidCertificate => ("invalid_certificate", 400),
            Self::Unauthorized => ("unauthorized", 401),
            Self::NotFound => ("not_found", 404),
            Self::MethodNotAllowed => ("method_not_allowed", 405),
            Self::AlreadyExists => ("already_exists", 409),
            Self::PortInUse => ("port_in_use", 409),
            Self::PortReserved => ("port_reserved", 409),
            Self::SniConflict => ("sni_conflict", 409),
            Self::Ambiguous => ("ambiguous", 409),
            Self::InUse => ("in_use", 409),
            Self::TooLarge => ("too_large", 413),
            Self::InternalError => ("internal_error", 500),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An operation's failure: a stable code plus a human message naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong, naming the offending field or resource.
    pub message: String,
}

impl ApiError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// A `not_found` error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// An `internal_error`; the caller logs the detail.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InternalError, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_map_to_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "duplicate {s}");
            assert!(s.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{s}");
            assert!((400..600).contains(&code.status()), "{s}");
        }
        assert_eq!(ErrorCode::SniConflict.status(), 409);
        assert_eq!(ErrorCode::TooLarge.as_str(), "too_large");
    }
}
