//! The route table: every route is added through [`Routes`], which records its method, path
//! and who may call it while it builds the router. `origin routes` prints that record, and the
//! access tests walk it, so a route added without its guard cannot go unnoticed.

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware;
use axum::routing::{MethodFilter, on};
use serde::Serialize;

use super::AppState;
use super::admin::{AdminGuard, require_admin};
use super::error::Envelope;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Needs an admin token (`Authorization: Bearer`).
    Admin,
    /// Needs an HMAC signature by the edge (`x-latchkey-signature`).
    Signed,
    /// Needs GitHub's ECDSA signature (`Github-Public-Key-Signature`).
    Github,
    /// Open to anyone: health and metrics, which show counts only.
    Open,
}

/// One registered route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    /// The HTTP method.
    pub method: String,
    /// The path pattern, with `{id}` for a key id.
    pub path: String,
    /// Who may call it.
    pub access: Access,
}

/// Builds the router and the list of its routes together.
pub struct Routes {
    router: Router<AppState>,
    listed: Vec<RouteInfo>,
    guard: AdminGuard,
}

impl Routes {
    /// An empty table whose admin routes are guarded by `guard`.
    pub fn new(guard: AdminGuard) -> Self {
        Self {
            router: Router::new(),
            listed: Vec::new(),
            guard,
        }
    }

    /// Adds an admin route; its errors (401, 429) use envelope `E`.
    pub fn admin<E: Envelope, H, T>(self, method: Method, path: &str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let guard = self.guard.clone();
        self.add(Access::Admin, method, path, handler, move |route| {
            route.route_layer(middleware::from_fn_with_state(guard, require_admin::<E>))
        })
    }

    /// Adds a route whose handler checks the edge's signature itself.
    pub fn signed<H, T>(self, method: Method, path: &str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Access::Signed, method, path, handler, |route| route)
    }

    /// Adds a route whose handler checks GitHub's signature itself; its bodies may be larger
    /// ([`super::github::BODY_MAX_BYTES`]).
    pub fn github<H, T>(self, method: Method, path: &str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let max = super::github::BODY_MAX_BYTES;
        self.add(Access::Github, method, path, handler, move |route| {
            route
                .route_layer(axum::Extension(super::extract::BodyLimit(max)))
                .route_layer(axum::extract::DefaultBodyLimit::max(max))
        })
    }

    /// Adds a route open to anyone.
    pub fn open<H, T>(self, method: Method, path: &str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Access::Open, method, path, handler, |route| route)
    }

    fn add<H, T>(
        mut self,
        access: Access,
        method: Method,
        path: &str,
        handler: H,
        guard: impl FnOnce(
            axum::routing::MethodRouter<AppState>,
        ) -> axum::routing::MethodRouter<AppState>,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        #[allow(
            clippy::expect_used,
            reason = "only the standard methods are used here, at start-up"
        )]
        let filter = MethodFilter::try_from(method.clone()).expect("a standard HTTP method");
        // Axum merges method routers registered on the same path.
        self.router = self.router.route(path, guard(on(filter, handler)));
        self.listed.push(RouteInfo {
            method: method.to_string(),
            path: path.to_owned(),
            access,
        });
        self
    }

    /// The router and the list of its routes.
    pub fn finish(self) -> (Router<AppState>, Vec<RouteInfo>) {
        (self.router, self.listed)
    }
}
