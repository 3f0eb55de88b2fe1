//! The HTTP listeners, bound and answering before the node they serve exists. `serve` binds them
//! first, so that while it waits for the brokers `/healthz` says the process is alive, `/readyz`
//! says it is not ready, and visitor and agent requests get 503 with Retry-After (a page that says
//! to try again shortly, or JSON on the agent API) instead of a refused connection. Once the node
//! has started, its router is installed and serves every request from then on.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::HttpError;
use crate::config::Settings;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The public gateway (`http_listen`): visitor pages and the agent API.
    Gateway,
    /// The operations listener (`metrics_listen`): metrics, health and readiness.
    Operations,
}

/// A bound listener serving the router installed in it, or the starting answers until one is.
pub struct Listener {
    role: Role,
    addr: SocketAddr,
    https: bool,
    app: Arc<RwLock<Option<Router>>>,
    shutdown: watch::Sender<bool>,
    task: tokio::sync::Mutex<Option<JoinHandle<Result<(), HttpError>>>>,
}

/// The listeners a node's settings ask for.
#[derive(Clone, Default)]
pub struct Listeners {
    pub gateway: Option<Arc<Listener>>,
    pub operations: Option<Arc<Listener>>,
}

impl Listeners {
    /// Binds `http_listen` and `metrics_listen` (each when set) and starts answering on them.
    pub async fn bind(settings: &Settings) -> Result<Listeners, HttpError> {
        let set = |l: &Option<String>| l.clone().filter(|l| !l.is_empty());
        let gateway = match set(&settings.http_listen) {
            Some(listen) => Some(Arc::new(Listener::gateway(settings, &listen).await?)),
            None => None,
        };
        let operations = match set(&settings.metrics_listen) {
            Some(listen) => Some(Arc::new(Listener::operations(settings, &listen)?)),
            None => None,
        };
        Ok(Listeners { gateway, operations })
    }

    /// Stops both, letting in-flight requests finish.
    pub async fn finish(&self) {
        for l in [&self.gateway, &self.operations].into_iter().flatten() {
            if let Err(error) = l.finish().await {
                tracing::warn!(%error, role = ?l.role, "http listener ended with an error");
            }
        }
    }
}

impl Listener {
    /// The gateway: HTTPS with the configured or a self-signed certificate, else plain HTTP
    /// (allowed on loopback only; configuration refuses anything else).
    pub async fn gateway(settings: &Settings, listen: &str) -> Result<Listener, HttpError> {
        let tls = tls_config(settings).await?;
        let listener = bind_tcp(listen)?;
        if tls.is_none() {
            tracing::warn!(addr = %listen, "serving the visitor gateway over plain HTTP on loopback; put it behind TLS or set tls_cert and tls_key before exposing it");
        }
        Listener::start(Role::Gateway, listener, tls, settings)
    }

    /// The operations listener, plain HTTP. Keep it off the public network.
    pub fn operations(settings: &Settings, listen: &str) -> Result<Listener, HttpError> {
        let listener = bind_tcp(listen)?;
        if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
            tracing::info!(addr = %listen, "metrics listener is not on loopback: restrict who can reach it (network policy or firewall)");
        }
        Listener::start(Role::Operations, listener, None, settings)
    }

    fn start(
        role: Role,
        listener: std::net::TcpListener,
        tls: Option<axum_server::tls_rustls::RustlsConfig>,
        settings: &Settings,
    ) -> Result<Listener, HttpError> {
        let addr = listener.local_addr().map_err(|e| HttpError::Serve(e.to_string()))?;
        let app: Arc<RwLock<Option<Router>>> = Arc::new(RwLock::new(None));
        let slot = app.clone();
        let https = tls.is_some();
        let outer = Router::new().fallback(move |request: Request| {
            let installed = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
            async move {
                match installed {
                    Some(router) => router.oneshot(request).await.unwrap_or_else(|never| match never {}),
                    None => starting(role, https, &request),
                }
            }
        });
        let (shutdown, mut stop) = watch::channel(false);
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            h.graceful_shutdown(Some(Duration::from_secs(10)));
        });
        let timeouts = (
            Duration::from_secs(settings.http_header_read_timeout_secs),
            Duration::from_secs(settings.http_idle_timeout_secs),
        );
        tracing::info!(role = ?role, %addr, https, "listening; answering 503 with Retry-After until the node has started");
        let task = tokio::spawn(serve(listener, tls, outer, handle, timeouts));
        Ok(Listener { role, addr, https, app, shutdown, task: tokio::sync::Mutex::new(Some(task)) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it serves HTTPS.
    pub fn https(&self) -> bool {
        self.https
    }

    /// Serves `router` from the next request on.
    pub fn install(&self, router: Router) {
        *self.app.write().unwrap_or_else(|e| e.into_inner()) = Some(router);
    }

    /// Serves until `stop` turns true (then finishes in-flight requests) or the server fails.
    pub async fn run_until(&self, mut stop: watch::Receiver<bool>) -> Result<(), HttpError> {
        let Some(mut task) = self.task.lock().await.take() else {
            return Ok(());
        };
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::select! {
            _ = stopped => {
                let _ = self.shutdown.send(true);
                joined(task.await)
            }
            ended = &mut task => match joined(ended) {
                Ok(()) => Err(HttpError::Serve("the listener stopped without being asked to".into())),
                Err(e) => Err(e),
            },
        }
    }

    /// Stops serving, letting in-flight requests finish (10 s at most).
    pub async fn finish(&self) -> Result<(), HttpError> {
        let _ = self.shutdown.send(true);
        match self.task.lock().await.take() {
            Some(task) => joined(task.await),
            None => Ok(()),
        }
    }
}

fn joined(r: Result<Result<(), HttpError>, tokio::task::JoinError>) -> Result<(), HttpError> {
    r.map_err(|e| HttpError::Serve(e.to_string()))?
}

fn bind_tcp(listen: &str) -> Result<std::net::TcpListener, HttpError> {
    let bind_err = |source| HttpError::Bind { addr: listen.to_string(), source };
    let listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

async fn tls_config(settings: &Settings) -> Result<Option<axum_server::tls_rustls::RustlsConfig>, HttpError> {
    // rustls needs a process-wide crypto provider before any TLS config is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match (&settings.tls_cert, &settings.tls_key, settings.tls_self_signed) {
        (Some(cert), Some(key), _) => Ok(Some(
            axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| HttpError::Tls(format!("{}: {e}", cert.display())))?,
        )),
        (_, _, true) => {
            let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            tracing::warn!(
                "serving HTTPS with a self-signed certificate generated at start; browsers will warn. Use tls_cert and tls_key outside local testing"
            );
            Ok(Some(
                axum_server::tls_rustls::RustlsConfig::from_pem(
                    generated.cert.pem().into_bytes(),
                    generated.signing_key.serialize_pem().into_bytes(),
                )
                .await
                .map_err(|e| HttpError::Tls(e.to_string()))?,
            ))
        }
        _ => Ok(None),
    }
}

/// What a listener answers before the node has started: alive, not ready, and 503 with
/// Retry-After for everything else, in the format of the route.
fn starting(role: Role, https: bool, request: &Request) -> Response {
    let path = request.uri().path();
    let mut response = match path {
        "/healthz" => return (StatusCode::OK, "ok").into_response(),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "starting: waiting for the brokers").into_response(),
        _ if role == Role::Operations => {
            (StatusCode::SERVICE_UNAVAILABLE, "starting: waiting for the brokers").into_response()
        }
        _ => match super::static_asset(path) {
            Some(asset) => asset,
            None if path.starts_with("/api/") => super::agent::api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the node is starting (waiting for the brokers); try again after Retry-After",
            ),
            None => super::visitor::try_again_shortly("The form cannot be used right now"),
        },
    };
    let unavailable = response.status() == StatusCode::SERVICE_UNAVAILABLE;
    let h = response.headers_mut();
    if unavailable {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    // The node's site settings are not known yet: nothing may frame these answers.
    super::set_security_headers(h, "'none'", https);
    response
}

/// Closes connections that send nothing for `idle`: clients that connect and never send a request,
/// and keep-alive connections left open. A read that waits longer fails and hyper drops the
/// connection. Longer than any request takes (a submit waits at most 30 s for the broker).
#[derive(Clone, Copy)]
struct IdleTimeout(Duration);

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
    header_read_timeout: Duration,
) {
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    server.http_builder().http2().timer(hyper_util::rt::TokioTimer::new());
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    app: Router,
    handle: axum_server::Handle<SocketAddr>,
    (header_read_timeout, idle_timeout): (Duration, Duration),
) -> Result<(), HttpError> {
    let serve_err = |e: std::io::Error| HttpError::Serve(e.to_string());
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            let mut server = axum_server::from_tcp(listener).map_err(serve_err)?.acceptor(IdleTimeout(idle_timeout));
            harden(&mut server, header_read_timeout);
            server.handle(handle).serve(service).await.map_err(serve_err)
        }
        Some(config) => {
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config).acceptor(IdleTimeout(idle_timeout));
            let mut server = axum_server::from_tcp(listener).map_err(serve_err)?.acceptor(acceptor);
            harden(&mut server, header_read_timeout);
            server.handle(handle).serve(service).await.map_err(serve_err)
        }
    }
}
