//! Routing (ADR 22): any node takes any request. A request about a conversation is served where its
//! partition is owned: here when this node owns it, else forwarded to the owner the node directory
//! names, over the internal hop (`crypto::hop`), and the owner's answer is relayed as it is. What a
//! request is about comes from what it carries anyway: the partition number at the end of its
//! one-time key (`k` of a link or form, `key` or `previous_key` of the agent API) or the conversation
//! of a history path. A request that names no partition (a key from before partition hints, a
//! malformed one) is served here, where the handler answers it as on one node.
//!
//! A forwarded request is never forwarded again: its receiver serves it when it owns the partition,
//! or answers 503 with [`NOT_OWNER`] so the sender looks the owner up again. No owner known, or the
//! owner not answering, is 503 with Retry-After: trouble on our side, never the requester's fault.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, BODY_LIMIT};
use crate::crypto::hop::HEADER as HOP;
use crate::domain::otk::OtkSecret;
use crate::handlers::directory::DirectoryView;

/// Response header of a node that was forwarded a request for a partition it does not own.
pub const NOT_OWNER: &str = "x-secureforms-not-owner";

/// How long a request waits for its partition to have a known owner (a rebalance in progress).
const ROUTE_WAIT: Duration = Duration::from_secs(5);

/// How long a forwarded request may take (a submit may wait ~33 s for the brokers).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(40);

/// The HTTP client that forwards requests to other nodes: the system's roots plus
/// `cluster_ca_file`, no redirects, no proxy from the environment.
pub fn forwarder(settings: &crate::config::Settings) -> Result<reqwest::Client, super::HttpError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .timeout(FORWARD_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(30));
    if let Some(path) = &settings.cluster_ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| super::HttpError::Tls(format!("cluster_ca_file {}: {e}", path.display())))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| super::HttpError::Tls(format!("cluster_ca_file {}: {e}", path.display())))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| super::HttpError::Tls(format!("cannot build the forwarding client: {e}")))
}

/// What a request is about: the partition of its conversation and the route, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub partition: i32,
    pub route: &'static str,
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn json_field(body: &[u8], name: &str) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?.get(name)?.as_str().map(str::to_string)
}

fn key_partition(key: Option<String>) -> Option<i32> {
    OtkSecret::parse(&key?)?.partition()
}

/// The partition a request is about, when it names one.
pub fn target(partitions: i32, method: &str, path: &str, query: Option<&str>, body: &[u8]) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (partition, route) = match (method, segments.as_slice()) {
        ("GET" | "HEAD", ["f", _, _]) => (key_partition(form_field(query?.as_bytes(), "k")), "/f/{site}/{form}"),
        ("POST", ["f", _, _]) => (key_partition(form_field(body, "k")), "/f/{site}/{form}"),
        ("POST", ["f", _, _, "open"]) => (key_partition(form_field(body, "k")), "/f/{site}/{form}/open"),
        ("POST", ["api", "v1", "submissions", _, "retrieve"]) => {
            (key_partition(json_field(body, "key")), "/api/v1/submissions/{id}/retrieve")
        }
        ("POST", ["api", "v1", "submissions", _, "retrieve-key"]) => {
            (key_partition(json_field(body, "previous_key")), "/api/v1/submissions/{id}/retrieve-key")
        }
        ("GET", ["api", "v1", "conversations", conversation, "history"]) => {
            let conversation = percent_encoding::percent_decode_str(conversation).decode_utf8().ok()?;
            (
                Some(crate::topics::partition_for(conversation.as_bytes(), partitions)),
                "/api/v1/conversations/{id}/history",
            )
        }
        _ => return None,
    };
    partition.filter(|p| (0..partitions).contains(p)).map(|partition| Target { partition, route })
}

/// Whether the body must be read before routing: only the POSTs whose key is in the body, and
/// every forwarded request (its MAC covers the body).
fn needs_body(parts: &Parts) -> bool {
    parts.headers.contains_key(HOP)
        || (parts.method == axum::http::Method::POST
            && (parts.uri.path().starts_with("/f/") || parts.uri.path().starts_with("/api/v1/submissions/")))
}

fn unavailable(api: bool, code: &str, message: &str, not_owner: bool) -> Response {
    let mut r = if api {
        super::agent::api_error(StatusCode::SERVICE_UNAVAILABLE, code, message)
    } else {
        // The visitor gets the same page as for any trouble on our side: not their link's fault.
        super::visitor::try_again_shortly("The form cannot be used right now")
    };
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if not_owner {
        r.headers_mut().insert(NOT_OWNER, HeaderValue::from_static("1"));
    }
    r
}

/// The routing middleware.
pub async fn route(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let node = state.node.clone();
    let api = request.uri().path().starts_with("/api/");
    // A node that runs no conversation-keyed handler serves what it is asked (tools, tests).
    if !node.handlers.iter().any(|h| h.scope == crate::kafka::runtime::Scope::Partitioned) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let bytes = if needs_body(&parts) {
        match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                return super::framework_error(
                    api,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is over 64 KiB",
                );
            }
        }
    } else {
        // Not read here: handed on untouched.
        let target = target(node.partitions, parts.method.as_str(), parts.uri.path(), parts.uri.query(), &[]);
        return dispatch(&state, parts, body, Bytes::new(), target, next, api).await;
    };
    let path_q = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let target = target(node.partitions, parts.method.as_str(), parts.uri.path(), parts.uri.query(), &bytes);
    if let Some(hop) = parts.headers.get(HOP).cloned() {
        let verified = hop
            .to_str()
            .map_err(|_| crate::crypto::hop::HopError::Malformed)
            .and_then(|h| node.hop.verify(h, (node.clock)(), parts.method.as_str(), &path_q, &bytes));
        let hop = match verified {
            Ok(h) => h,
            Err(error) => {
                node.metrics.forwarded_in("refused");
                tracing::warn!(%error, "a request claiming to be forwarded by another node was refused; if it came from a node, check that every node has the same master key (or integrity key) and a synchronized clock");
                let message = "this request claims to come from another node of the service and could not be verified";
                return if api {
                    super::agent::api_error(StatusCode::FORBIDDEN, "invalid_hop", message)
                } else {
                    super::visitor::error_page(StatusCode::FORBIDDEN, message)
                };
            }
        };
        // The owner answers as if the client had come here: rate limits and audit see its address.
        parts.extensions.insert(ConnectInfo(SocketAddr::new(hop.client_ip, 0)));
        if let Some(t) = target
            && !owns_soon(&state, t.partition).await
        {
            node.metrics.forwarded_in("not_owner");
            return unavailable(api, "not_owner", "this node no longer owns the conversation; retry", true);
        }
        node.metrics.forwarded_in("served");
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    }
    let body = Body::from(bytes.clone());
    dispatch(&state, parts, body, bytes, target, next, api).await
}

/// Waits briefly for this node to own `partition` (a forwarded request that raced a rebalance).
async fn owns_soon(state: &AppState, partition: i32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if state.node.ownership.owns(partition) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves a request here or forwards it to the owner of its partition.
async fn dispatch(
    state: &AppState,
    parts: Parts,
    body: Body,
    bytes: Bytes,
    target: Option<Target>,
    next: Next,
    api: bool,
) -> Response {
    let node = &state.node;
    let Some(t) = target else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let client = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let directory = DirectoryView::new(node.directory.clone());
    let deadline = std::time::Instant::now() + ROUTE_WAIT;
    loop {
        if node.ownership.owns(t.partition) {
            return next.run(Request::from_parts(parts, body)).await;
        }
        match directory.owner_of(t.partition) {
            Ok(Some(owner)) if owner.node_id != node.settings.node_id => {
                let client = client.unwrap_or(IpAddr::from([127, 0, 0, 1]));
                match forward(state, &owner.url, &parts, &bytes, client).await {
                    Ok(r) if r.headers().contains_key(NOT_OWNER) => {
                        tracing::debug!(partition = t.partition, owner = %owner.node_id, "the node the directory names no longer owns the partition; looking again");
                    }
                    Ok(r) => {
                        let class = match r.status().as_u16() {
                            200..=299 => "2xx",
                            300..=399 => "3xx",
                            400..=499 => "4xx",
                            _ => "5xx",
                        };
                        node.metrics.forwarded(t.route, class);
                        return r;
                    }
                    Err(error) => {
                        node.metrics.forwarded(t.route, "unreachable");
                        tracing::warn!(%error, partition = t.partition, owner = %owner.node_id, url = %owner.url, "the node that owns this conversation does not answer; the request got 503 (its partitions move to other nodes once the group drops it)");
                        return unavailable(
                            api,
                            "owner_unavailable",
                            "the node serving this conversation is not answering; retry shortly",
                            false,
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "cannot read the node directory; check the data directory's disk");
                return unavailable(
                    api,
                    "unavailable",
                    "the service cannot route this request now; retry shortly",
                    false,
                );
            }
        }
        if std::time::Instant::now() >= deadline {
            node.metrics.forwarded(t.route, "no_owner");
            tracing::warn!(
                partition = t.partition,
                "no node owns this conversation's partition yet; the request got 503 (a rebalance is in progress, or no node runs the handlers)"
            );
            return unavailable(
                api,
                "no_owner",
                "the service is moving this conversation between nodes; retry shortly",
                false,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Headers that belong to one connection, not to the request or answer relayed.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    [
        header::CONNECTION,
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == HOP
}

/// Sends a request to the owner and turns its answer into ours.
async fn forward(
    state: &AppState,
    base: &str,
    parts: &Parts,
    body: &Bytes,
    client: IpAddr,
) -> Result<Response, reqwest::Error> {
    let node = &state.node;
    let path_q = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut request = state.forwarder.request(parts.method.clone(), format!("{base}{path_q}"));
    for (name, value) in parts.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        request = request.header(name, value);
    }
    let hop = node.hop.sign((node.clock)(), client, parts.method.as_str(), path_q, body);
    let answer = request.header(HOP, hop).body(body.clone()).send().await?;
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await?;
    let mut response = (status, bytes).into_response();
    for (name, value) in headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        response.headers_mut().append(name, value.clone());
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_routed_by_the_partition_its_key_or_conversation_names() {
        let key = "abcdefghijklmnopqrstuv.4";
        let t = |m: &str, p: &str, q: Option<&str>, b: &str| target(6, m, p, q, b.as_bytes()).map(|t| t.partition);
        assert_eq!(t("GET", "/f/acme/f1", Some(&format!("k={key}")), ""), Some(4));
        assert_eq!(t("HEAD", "/f/acme/f1", Some(&format!("k={key}")), ""), Some(4));
        assert_eq!(t("POST", "/f/acme/f1/open", None, &format!("k={key}")), Some(4));
        assert_eq!(t("POST", "/f/acme/f1", None, &format!("card=4111&k={key}")), Some(4));
        assert_eq!(t("POST", "/api/v1/submissions/x/retrieve", None, &format!(r#"{{"key":"{key}"}}"#)), Some(4));
        assert_eq!(
            t("POST", "/api/v1/submissions/x/retrieve-key", None, &format!(r#"{{"previous_key":"{key}"}}"#)),
            Some(4)
        );
        // The history path names the conversation: murmur2, as the Java client places it.
        let vectors = include_str!("../../tests/vectors/kafka-partitions.txt");
        let line = vectors.lines().find(|l| l.starts_with("conv-42 6 ")).expect("a vector for conv-42");
        let expected: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(t("GET", "/api/v1/conversations/conv-42/history", None, ""), Some(expected));
        // Nothing to route by: served where it arrived.
        assert_eq!(t("GET", "/f/acme/f1", Some("k=abcdefghijklmnopqrstuv"), ""), None, "a key without a hint");
        assert_eq!(t("GET", "/f/acme/f1", Some("k=abcdefghijklmnopqrstuv.9"), ""), None, "no partition 9 of 6");
        assert_eq!(t("POST", "/f/acme/f1", None, "not a form"), None);
        assert_eq!(t("GET", "/healthz", None, ""), None);
        assert_eq!(t("DELETE", "/f/acme/f1", Some(&format!("k={key}")), ""), None);
    }
}
