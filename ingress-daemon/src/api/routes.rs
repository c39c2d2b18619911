//! The route table: every operation is registered through [`Routes::op`], which adds it to the
//! router and records its method and path, so the served operations can be listed (axum's
//! `Router` cannot be asked for its routes) and compared with the OpenAPI document.
use axum::Router;
use axum::handler::Handler;
use axum::routing::{MethodFilter, on};

use super::AppState;

/// An HTTP method the API routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Self::Get => MethodFilter::GET,
            Self::Post => MethodFilter::POST,
            Self::Put => MethodFilter::PUT,
            Self::Delete => MethodFilter::DELETE,
        }
    }

    /// The method's name, upper-case.
    #[cfg(test)]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

/// A router under construction and the operations registered on it.
pub(crate) struct Routes {
    /// The router (state not yet supplied).
    pub(crate) router: Router<AppState>,
    /// Every `(method, path)` registered, in registration order.
    pub(crate) served: Vec<(Verb, &'static str)>,
}

impl Routes {
    pub(crate) fn new() -> Self {
        Self {
            router: Router::new(),
            served: Vec::new(),
        }
    }

    /// Routes `verb path` to `handler` (axum merges the methods of one path).
    pub(crate) fn op<H, T>(mut self, verb: Verb, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.router = self.router.route(path, on(verb.filter(), handler));
        self.served.push((verb, path));
        self
    }
}
