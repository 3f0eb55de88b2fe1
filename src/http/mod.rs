//! The visitor gateway over HTTP(S), with axum: the secure form page (`/f/{site}/{form}`), its
//! static assets, and security headers on every response. `router(state)` is what tests call with
//! `tower::ServiceExt::oneshot`; [`listener`] serves it with TLS or, on loopback only, plain HTTP.

pub mod agent;
pub mod auth;
pub mod listener;
pub mod openapi;
pub mod pages;
pub mod route;
pub mod visitor;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::node::Node;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}; is another process using it?")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the TLS certificate or key: {0}; tls_cert and tls_key must be PEM files")]
    Tls(String),
    #[error("http server failed: {0}")]
    Serve(String),
    #[error("agent authentication is misconfigured: {0}")]
    Auth(String),
}

/// Largest request body the gateway reads (a 20-question form is a few KiB).
pub const BODY_LIMIT: usize = 64 * 1024;

/// What every request handler shares.
pub struct AppState {
    pub node: Arc<Node>,
    /// The visitor use cases' working state: form key state ahead of the projection, per-form locks
    /// and rate limit.
    pub gateway: crate::app::visitor::Gateway,
    pub per_client: DefaultKeyedRateLimiter<String>,
    /// Agent API, per client address (before authentication: every refused attempt is an audit write).
    pub api_per_client: DefaultKeyedRateLimiter<String>,
    /// Agent API, per authenticated agent (site and agent id).
    pub api_per_agent: DefaultKeyedRateLimiter<String>,
    pub https: bool,
    pub auth: auth::AgentAuth,
    /// Forwards requests to the node that owns their conversation (`route`).
    pub forwarder: reqwest::Client,
}

impl AppState {
    pub fn new(node: Arc<Node>, https: bool) -> Result<Arc<AppState>, HttpError> {
        let secret = crate::secrets::jwt_secret();
        let auth = auth::AgentAuth::load(&node.settings.agent_auth, secret.as_ref().map(|v| v.as_str()))
            .map_err(|e| HttpError::Auth(e.to_string()))?;
        if !auth.is_configured() {
            tracing::warn!(
                "agent authentication is not configured: the agent API answers 401 auth_not_configured; set SECUREFORMS_JWT_SECRET or agent_auth.jwks_file"
            );
        }
        // Configuration refuses zero rates; a zero here would be a bug, so it is clamped, not a panic.
        let quota = |rate: crate::config::Rate| {
            Quota::per_minute(NonZeroU32::new(rate.per_minute).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN))
        };
        let limits = node.settings.rate_limits.clone();
        Ok(Arc::new(AppState {
            auth,
            forwarder: route::forwarder(&node.settings)?,
            node,
            gateway: crate::app::visitor::Gateway::new(limits.visitor_per_form),
            per_client: RateLimiter::keyed(quota(limits.visitor_per_client)),
            api_per_client: RateLimiter::keyed(quota(limits.api_per_client)),
            api_per_agent: RateLimiter::keyed(quota(limits.api_per_agent)),
            https,
        }))
    }
}

/// How long a request waits for the node to become ready (caught up with the topics, brokers
/// answering) before it is answered 503 with Retry-After.
const READY_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits up to [`READY_GRACE`] for the node to be ready; false means answer 503.
pub(crate) async fn wait_ready(state: &AppState) -> bool {
    let deadline = std::time::Instant::now() + READY_GRACE;
    while !state.node.metrics.is_ready() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/f/{site}/{form}", get(visitor::link).post(visitor::submit))
        .route("/f/{site}/{form}/open", axum::routing::post(visitor::open))
        .route("/static/form.css", get(|| async { static_asset("/static/form.css").unwrap_or_default() }))
        .route("/static/form.js", get(|| async { static_asset("/static/form.js").unwrap_or_default() }))
        .route("/api/v1/submissions/{id}/retrieve", axum::routing::post(agent::retrieve))
        .route("/api/v1/submissions/{id}/retrieve-key", axum::routing::post(agent::fresh_key))
        .route("/api/v1/conversations/{id}/history", get(agent::history))
        .route("/healthz", get(openapi::healthz))
        .route("/readyz", get(openapi::readyz))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi::json()) }))
        .fallback(visitor::not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), route::route))
        .layer(middleware::from_fn(framework_errors))
        .layer(middleware::from_fn_with_state(state.clone(), security_headers))
        .layer(middleware::from_fn_with_state(state.clone(), record_latency))
        .with_state(state)
}

/// The operations listener (`metrics_listen`): `/metrics`, `/healthz`, `/readyz`. Kept off the
/// public gateway so visitors cannot read operational figures.
pub fn ops_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(openapi::healthz))
        .route("/readyz", get(openapi::ops_readyz))
        .with_state(node)
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.render())
        .into_response()
}

/// HTTP latency per method, route template (never the concrete path: it holds ids) and status.
async fn record_latency(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = std::time::Instant::now();
    let response = next.run(request).await;
    state.node.metrics.http(&method, &route, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

/// The page's stylesheet and script, served even before the node has started (error pages use them).
pub(crate) fn static_asset(path: &str) -> Option<Response> {
    let (content_type, body) = match path {
        "/static/form.css" => ("text/css; charset=utf-8", include_str!("../../static/form.css")),
        "/static/form.js" => ("text/javascript; charset=utf-8", include_str!("../../static/form.js")),
        _ => return None,
    };
    Some(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The frame-ancestors sources for a path: a form may be framed by its site's chat origins only.
fn frame_ancestors(state: &AppState, path: &str) -> String {
    let site = path.strip_prefix("/f/").and_then(|rest| rest.split('/').next());
    let origins =
        site.and_then(|s| state.node.settings.sites.get(s)).map(|s| s.allowed_origins.clone()).unwrap_or_default();
    if origins.is_empty() { "'none'".to_string() } else { origins.join(" ") }
}

/// Requests and answers the framework handles before (or instead of) a handler get a body in the
/// format of their route: HTTP/1.1 requests without `Host` are refused (RFC 9112 3.2), and 405 and
/// 413 answers say what is wrong, as JSON on the agent API and as a page elsewhere.
async fn framework_errors(request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/api/");
    if request.version() == axum::http::Version::HTTP_11 && !request.headers().contains_key(header::HOST) {
        return framework_error(
            api,
            axum::http::StatusCode::BAD_REQUEST,
            "missing_host",
            "an HTTP/1.1 request must carry a Host header",
        );
    }
    let response = next.run(request).await;
    match response.status() {
        axum::http::StatusCode::METHOD_NOT_ALLOWED => {
            let allow = response.headers().get(header::ALLOW).cloned();
            let mut r = framework_error(
                api,
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this address does not take that method",
            );
            if let Some(allow) = allow {
                r.headers_mut().insert(header::ALLOW, allow);
            }
            r
        }
        axum::http::StatusCode::PAYLOAD_TOO_LARGE if api => framework_error(
            true,
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is over 64 KiB",
        ),
        _ => response,
    }
}

fn framework_error(api: bool, status: axum::http::StatusCode, code: &str, message: &str) -> Response {
    if api { agent::api_error(status, code, message) } else { visitor::error_page(status, message) }
}

/// Security headers on every response, errors included.
async fn security_headers(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let ancestors = frame_ancestors(&state, request.uri().path());
    let mut response = next.run(request).await;
    set_security_headers(response.headers_mut(), &ancestors, state.https);
    response
}

/// The security headers of every answer: the page's CSP with its frame ancestors, no caching, no
/// referrer, no sniffing, its own browsing context, and HSTS over HTTPS.
pub(crate) fn set_security_headers(h: &mut axum::http::HeaderMap, ancestors: &str, https: bool) {
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    if https {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000; includeSubDomains"));
    }
}
