//! The visitor gateway over HTTP(S), with axum: the secure form page (`/f/{site}/{form}`), its
//! static assets, and security headers on every response. `router(state)` is what tests call with
//! `tower::ServiceExt::oneshot`; [`bind`] serves it with TLS or, on loopback only, plain HTTP.

pub mod agent;
pub mod auth;
pub mod openapi;
pub mod pages;
pub mod visitor;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::visitor::FormState;
use crate::service::Node;

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
    /// Form key state written by this node's requests, ahead of the projection catching up.
    pub overlay: DashMap<Vec<u8>, FormState>,
    /// One request at a time per form: open and submit are read-check-write sequences.
    pub locks: DashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>,
    pub per_client: DefaultKeyedRateLimiter<String>,
    pub per_form: DefaultKeyedRateLimiter<String>,
    /// Agent API, per client address (before authentication: every refused attempt is an audit write).
    pub api_per_client: DefaultKeyedRateLimiter<String>,
    /// Agent API, per authenticated agent (site and agent id).
    pub api_per_agent: DefaultKeyedRateLimiter<String>,
    pub https: bool,
    pub auth: auth::AgentAuth,
}

impl AppState {
    pub fn new(node: Arc<Node>, https: bool) -> Result<Arc<AppState>, HttpError> {
        let secret = std::env::var("SECUREFORMS_JWT_SECRET").ok();
        let auth = auth::AgentAuth::load(&node.settings.agent_auth, secret.as_deref())
            .map_err(|e| HttpError::Auth(e.to_string()))?;
        if !auth.is_configured() {
            tracing::warn!(
                "agent authentication is not configured: the agent API answers 401 auth_not_configured; set SECUREFORMS_JWT_SECRET or agent_auth.jwks_file"
            );
        }
        let quota = |per_minute: u32, burst: u32| {
            Quota::per_minute(NonZeroU32::new(per_minute).expect("non-zero"))
                .allow_burst(NonZeroU32::new(burst).expect("non-zero"))
        };
        Ok(Arc::new(AppState {
            auth,
            node,
            overlay: DashMap::new(),
            locks: DashMap::new(),
            per_client: RateLimiter::keyed(quota(120, 60)),
            per_form: RateLimiter::keyed(quota(30, 20)),
            // A workspace behind one address serves many agents; one agent retrieves a few forms a
            // minute. Sized for the bench's 1,000 requests/s from one client.
            api_per_client: RateLimiter::keyed(quota(120_000, 2_000)),
            api_per_agent: RateLimiter::keyed(quota(600, 60)),
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
        .route(
            "/static/form.css",
            get(|| async { static_file("text/css; charset=utf-8", include_str!("../../static/form.css")) }),
        )
        .route(
            "/static/form.js",
            get(|| async { static_file("text/javascript; charset=utf-8", include_str!("../../static/form.js")) }),
        )
        .route("/api/v1/submissions/{id}/retrieve", axum::routing::post(agent::retrieve))
        .route("/api/v1/submissions/{id}/retrieve-key", axum::routing::post(agent::fresh_key))
        .route("/api/v1/conversations/{id}/history", get(agent::history))
        .route("/healthz", get(openapi::healthz))
        .route("/readyz", get(openapi::readyz))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi::json()) }))
        .fallback(visitor::not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
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

/// Binds the operations listener on `listen` (plain HTTP) and returns it with [`ops_router`].
pub async fn bind_ops(node: Arc<Node>, listen: &str) -> Result<(tokio::net::TcpListener, Router), HttpError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| HttpError::Bind { addr: listen.to_string(), source })?;
    if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        tracing::info!(addr = %listen, "metrics listener is not on loopback: restrict who can reach it (network policy or firewall)");
    }
    Ok((listener, ops_router(node)))
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
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
    let h = response.headers_mut();
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
    if state.https {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000; includeSubDomains"));
    }
    response
}

/// A bound server, ready to run.
pub struct Server {
    addr: SocketAddr,
    kind: ServerKind,
}

enum ServerKind {
    Plain(std::net::TcpListener, Router),
    Tls(std::net::TcpListener, axum_server::tls_rustls::RustlsConfig, Router),
}

/// Closes connections that send nothing for `idle`: clients that connect and never send a request,
/// and keep-alive connections left open. A read that waits longer fails and hyper drops the
/// connection. Longer than any request takes (a submit waits at most 30 s for the broker).
#[derive(Clone, Copy)]
struct IdleTimeout(std::time::Duration);

impl<I, S> axum_server::accept::Accept<I, S> for IdleTimeout
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    type Stream = std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<I>>>;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_read_timeout(Some(self.0));
        std::future::ready(Ok((Box::pin(stream), service)))
    }
}

/// hyper applies its header read timeout only when it has a timer; without one a client that sends
/// half a request and goes silent holds the connection for ever.
fn harden<Addr: axum_server::Address, Acceptor>(
    server: &mut axum_server::Server<Addr, Acceptor>,
    header_read_timeout: std::time::Duration,
) {
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    server.http_builder().http2().timer(hyper_util::rt::TokioTimer::new());
}

/// Binds the gateway: HTTPS with the configured or a self-signed certificate, else plain HTTP
/// (allowed on loopback only; configuration refuses anything else).
pub async fn bind(node: Arc<Node>, listen: &str) -> Result<Server, HttpError> {
    // rustls needs a process-wide crypto provider before any TLS config is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = &node.settings;
    let tls = match (&s.tls_cert, &s.tls_key, s.tls_self_signed) {
        (Some(cert), Some(key), _) => Some(
            axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| HttpError::Tls(format!("{}: {e}", cert.display())))?,
        ),
        (_, _, true) => {
            let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            tracing::warn!(
                "serving HTTPS with a self-signed certificate generated at start; browsers will warn. Use tls_cert and tls_key outside local testing"
            );
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem(
                    generated.cert.pem().into_bytes(),
                    generated.signing_key.serialize_pem().into_bytes(),
                )
                .await
                .map_err(|e| HttpError::Tls(e.to_string()))?,
            )
        }
        _ => None,
    };
    let state = AppState::new(node.clone(), tls.is_some())?;
    let app = router(state);
    let bind_err = |source| HttpError::Bind { addr: listen.to_string(), source };
    match tls {
        Some(config) => {
            let listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
            listener.set_nonblocking(true).map_err(bind_err)?;
            let addr = listener.local_addr().map_err(bind_err)?;
            Ok(Server { addr, kind: ServerKind::Tls(listener, config, app) })
        }
        None => {
            let listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
            listener.set_nonblocking(true).map_err(bind_err)?;
            let addr = listener.local_addr().map_err(bind_err)?;
            tracing::warn!(%addr, "serving the visitor gateway over plain HTTP on loopback; put it behind TLS or set tls_cert and tls_key before exposing it");
            Ok(Server { addr, kind: ServerKind::Plain(listener, app) })
        }
    }
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish (10 s at most).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        header_read_timeout: std::time::Duration,
        idle_timeout: std::time::Duration,
    ) -> Result<(), HttpError> {
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        tokio::spawn(async move {
            shutdown.await;
            h.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
        });
        let serve_err = |e: std::io::Error| HttpError::Serve(e.to_string());
        match self.kind {
            ServerKind::Plain(listener, app) => {
                let mut server =
                    axum_server::from_tcp(listener).map_err(serve_err)?.acceptor(IdleTimeout(idle_timeout));
                harden(&mut server, header_read_timeout);
                server
                    .handle(handle)
                    .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                    .await
                    .map_err(serve_err)
            }
            ServerKind::Tls(listener, config, app) => {
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config).acceptor(IdleTimeout(idle_timeout));
                let mut server = axum_server::from_tcp(listener).map_err(serve_err)?.acceptor(acceptor);
                harden(&mut server, header_read_timeout);
                server
                    .handle(handle)
                    .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                    .await
                    .map_err(serve_err)
            }
        }
    }
}
