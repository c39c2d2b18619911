//! Why the data path refuses a connection: one stable reason per way it can say no.

use std::{borrow::Cow, fmt};

/// A refusal reason. The names are stable: metrics and access logs use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The first bytes are not a TLS handshake (nor a Postgres SSLRequest where allowed).
    NotTls,
    /// A malformed ClientHello.
    BadHello,
    /// A ClientHello above `max_hello_bytes`.
    HelloTooLarge,
    /// No complete ClientHello before the handshake timeout.
    HelloTimeout,
    /// The client closed (or reset) before its ClientHello was complete.
    ClientClosed,
    /// A ClientHello without SNI and no default target.
    NoSni,
    /// An SNI no rule matches and no default target.
    UnknownSni,
    /// A Postgres SSLRequest for a rule that is not Postgres, or the reverse.
    ProtocolMismatch,
    /// A plaintext Postgres CancelRequest (cannot be routed without SNI).
    PgCancelRequest,
    /// The instance has no address.
    ResolveFailed,
    /// The instance's address could not be resolved in time.
    ResolveTimeout,
    /// The address is not allowed by the backend policy.
    BackendNotAllowed,
    /// The backend refused or reset the connection.
    BackendUnreachable,
    /// The backend did not answer in time.
    BackendTimeout,
    /// The Postgres backend did not accept TLS.
    BackendRefusedTls,
    /// The TLS handshake with the client failed (terminate mode; e.g. no certificate).
    TlsHandshakeFailed,
    /// The daemon holds `max_flows` flows already.
    FlowLimit,
    /// A local failure (socket options, maps): the daemon's fault.
    Internal,
}

impl Reason {
    /// Every reason, for metrics that must show zero counts.
    pub const ALL: [Reason; 18] = [
        Reason::NotTls,
        Reason::BadHello,
        Reason::HelloTooLarge,
        Reason::HelloTimeout,
        Reason::ClientClosed,
        Reason::NoSni,
        Reason::UnknownSni,
        Reason::ProtocolMismatch,
        Reason::PgCancelRequest,
        Reason::ResolveFailed,
        Reason::ResolveTimeout,
        Reason::BackendNotAllowed,
        Reason::BackendUnreachable,
        Reason::BackendTimeout,
        Reason::BackendRefusedTls,
        Reason::TlsHandshakeFailed,
        Reason::FlowLimit,
        Reason::Internal,
    ];

    /// Position in [`Reason::ALL`] (for counter arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotTls => "not_tls",
            Reason::BadHello => "bad_hello",
            Reason::HelloTooLarge => "hello_too_large",
            Reason::HelloTimeout => "hello_timeout",
            Reason::ClientClosed => "client_closed",
            Reason::NoSni => "no_sni",
            Reason::UnknownSni => "unknown_sni",
            Reason::ProtocolMismatch => "protocol_mismatch",
            Reason::PgCancelRequest => "pg_cancel_request",
            Reason::ResolveFailed => "resolve_failed",
            Reason::ResolveTimeout => "resolve_timeout",
            Reason::BackendNotAllowed => "backend_not_allowed",
            Reason::BackendUnreachable => "backend_unreachable",
            Reason::BackendTimeout => "backend_timeout",
            Reason::BackendRefusedTls => "backend_refused_tls",
            Reason::TlsHandshakeFailed => "tls_handshake_failed",
            Reason::FlowLimit => "flow_limit",
            Reason::Internal => "internal",
        }
    }

    /// Maps the stable reason strings of the building blocks (`hello`, `postgres`, `connect`,
    /// `resolver`, `backend`) onto a reason.
    pub fn from_block(reason: &str) -> Self {
        match reason {
            "not_tls" => Reason::NotTls,
            "bad_hello" => Reason::BadHello,
            "hello_too_large" => Reason::HelloTooLarge,
            "hello_timeout" => Reason::HelloTimeout,
            "closed" => Reason::ClientClosed,
            "pg_cancel_request" => Reason::PgCancelRequest,
            "resolve_failed" => Reason::ResolveFailed,
            "resolve_timeout" => Reason::ResolveTimeout,
            "backend_not_allowed" => Reason::BackendNotAllowed,
            "backend_unreachable" => Reason::BackendUnreachable,
            "backend_timeout" => Reason::BackendTimeout,
            "backend_refused_tls" => Reason::BackendRefusedTls,
            _ => Reason::Internal,
        }
    }

    /// Whose fault the refusal is, for the log level: the peer's (debug) or ours (warn).
    pub fn is_internal(self) -> bool {
        self == Reason::Internal
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused connection: the reason and a human-readable detail for the debug log.
#[derive(Debug)]
pub struct Refusal {
    /// The stable reason.
    pub reason: Reason,
    /// What happened: fixed text, or an error formatted when it happened.
    pub detail: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with a detail formatted now (an error's text).
    pub fn new(reason: Reason, detail: impl fmt::Display) -> Self {
        Self {
            reason,
            detail: Cow::Owned(detail.to_string()),
        }
    }

    /// A refusal with a fixed detail: no formatting and no allocation, which matters for the
    /// refusals a client can cause at will (an unknown server name is one per connection).
    pub fn fixed(reason: Reason, detail: &'static str) -> Self {
        Self {
            reason,
            detail: Cow::Borrowed(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip_through_building_block_reasons() {
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
        for reason in Reason::ALL {
            let back = Reason::from_block(reason.as_str());
            assert!(back == reason || back == Reason::Internal, "{reason}");
        }
        assert_eq!(Reason::from_block("closed"), Reason::ClientClosed);
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason}");
        }
        assert_eq!(Reason::from_block("io_error"), Reason::Internal);
    }
}
