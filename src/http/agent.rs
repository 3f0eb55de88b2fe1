//! The agent API (seed steps 6-7) over HTTP: admits a request (rate limits, token, ended session),
//! parses it, calls the use case in [`crate::app::agent`] and renders its answer or its refusal.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{AgentClaims, AuthFailure};
use crate::app::agent as app;
use crate::domain::access::may_view_responses_in_history;
use crate::handlers::sessions::SessionsView;
use crate::vault::offrecord::OffRecord;

/// Every error of the agent API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    /// Stable reason code (also in the FormRetrieved audit event).
    pub error: String,
    pub message: String,
}

/// A fresh retrieve key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FreshKey {
    pub submission_id: String,
    pub retrieve_key: String,
    /// ms since the Unix epoch.
    pub retrieve_expires_at: i64,
}

/// One secure form in a conversation's history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryItem {
    pub submission_id: String,
    pub form_id: String,
    pub template_id: String,
    pub sent_by: String,
    pub submitted_at: i64,
    /// Whether the manager's token carries "view secure form responses in conversation history".
    pub responses_visible: bool,
    /// Stored answers (never off-the-record ones); only when `responses_visible`.
    pub answers: Option<BTreeMap<String, String>>,
    pub note: Option<String>,
}

/// A conversation's secure forms.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct History {
    pub conversation_id: String,
    pub site_id: String,
    pub secure_forms: Vec<HistoryItem>,
}

/// `{"error": code, "message": ...}` with a status.
/// A 503 (infrastructure trouble, never a refusal) carries `Retry-After`.
pub fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (status, Json(ApiError { error: code.to_string(), message: message.to_string() })).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
    }
    r
}

/// 429 with Retry-After: too many agent API requests from one client or for one agent.
fn too_many() -> Response {
    let mut r = api_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many requests; retry after the Retry-After seconds",
    );
    r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("10"));
    r
}

/// Why a request was not let in: over a rate limit, its token was refused, or the node could not
/// read whether its session ended (503, never a pass).
enum Refused {
    Limited,
    Auth(AuthFailure),
    Unavailable,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Limited => too_many(),
            Refused::Auth(f) => api_error(StatusCode::UNAUTHORIZED, f.code(), f.message()),
            Refused::Unavailable => unavailable(),
        }
    }
}

/// 503 for a state store that cannot be read: infrastructure trouble, never a refusal or a grant.
fn unavailable() -> Response {
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "this node cannot read its state store; retry after the Retry-After seconds",
    )
}

/// The agent the verified token names, as the use cases take it.
fn agent(claims: &AgentClaims) -> app::Agent<'_> {
    app::Agent {
        id: &claims.sub,
        site: &claims.site,
        session: &claims.sid,
        roles: &claims.roles,
        permissions: &claims.permissions,
    }
}

/// A use case's refusal as the API answers it: the status and the reason code decided in
/// [`crate::app::Refusal`], with Retry-After on a 503.
fn refused(refusal: &crate::app::Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    api_error(status, refusal.code(), &refusal.message())
}

/// The gate every agent API request passes: the per-client limit (before authentication: a refused
/// attempt is an audit write), the token, then the per-agent limit.
fn admit(state: &AppState, addr: &std::net::SocketAddr, headers: &HeaderMap) -> Result<AgentClaims, Refused> {
    if client_limited(state, addr) {
        return Err(Refused::Limited);
    }
    let claims = authenticate(state, headers)?;
    if agent_limited(state, &claims) {
        return Err(Refused::Limited);
    }
    Ok(claims)
}

fn client_limited(state: &AppState, addr: &std::net::SocketAddr) -> bool {
    state.api_per_client.check_key(&addr.ip().to_string()).is_err()
}

fn agent_limited(state: &AppState, claims: &AgentClaims) -> bool {
    state.api_per_agent.check_key(&format!("{}/{}", claims.site, claims.sub)).is_err()
}

/// 503 while the node has not caught up with the topics or cannot reach the brokers: an answer from
/// stale state could be a false refusal.
fn not_ready() -> Response {
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "this node is catching up with the event log or cannot reach the brokers; retry after the Retry-After seconds",
    )
}

fn now(state: &AppState) -> i64 {
    (state.node.clock)()
}

/// Verifies the token and that its session is still open. A session store that cannot be read is
/// 503: never taken as "still open".
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<AgentClaims, Refused> {
    let claims = state.auth.verify(headers, now(state)).map_err(Refused::Auth)?;
    match SessionsView::new(state.node.sessions.clone()).ended(&claims.site, &claims.sid) {
        Ok(false) => Ok(claims),
        Ok(true) => Err(Refused::Auth(AuthFailure::SessionEnded)),
        Err(error) => {
            tracing::error!(%error, "cannot read the ended sessions; check the data directory's disk");
            Err(Refused::Unavailable)
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrieveRequest {
    /// The one-time retrieve key from FormReady.
    pub key: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OffRecordView {
    /// `present`, or `expired` (the agent must resend the form to ask again).
    pub state: &'static str,
    pub answers: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RetrieveResponse {
    pub submission_id: String,
    pub form_id: String,
    pub conversation_id: String,
    pub template_id: String,
    pub submitted_at: i64,
    pub answers: BTreeMap<String, String>,
    pub off_record_field_ids: Vec<String>,
    pub off_record: OffRecordView,
}

fn parse_json<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, Response> {
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with("application/json") {
        return Err(api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_content_type",
            "send the body as application/json",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| api_error(StatusCode::BAD_REQUEST, "bad_body", &format!("the JSON body is not valid: {e}")))
}

/// Retrieve a submission's answers with its one-time retrieve key (from FormReady). Only the agent
/// who sent the form, with "use secure form within a conversation", while the conversation is live.
/// Every attempt emits one FormRetrieved (granted or denied with the reason code).
#[utoipa::path(post, path = "/api/v1/submissions/{id}/retrieve", tag = "agent", security(("agent_jwt" = [])),
    params(("id" = uuid::Uuid, Path, description = "Submission UUID")),
    request_body = RetrieveRequest,
    responses(
        (status = 200, description = "The answers, and the off-the-record ones if still in memory", body = RetrieveResponse),
        (status = 400, description = "Bad submission id or body", body = ApiError),
        (status = 401, description = "token_missing, token_invalid, token_expired, session_ended, auth_not_configured", body = ApiError),
        (status = 403, description = "wrong_site, permission_denied, not_sender, conversation_closed, invalid_key, wrong_purpose, key_expired, key_spent, wrong_session, purged", body = ApiError),
        (status = 404, description = "unknown_submission", body = ApiError),
        (status = 413, description = "body_too_large: the body is over 64 KiB", body = ApiError),
        (status = 415, description = "Not application/json", body = ApiError),
        (status = 429, description = "rate_limited: too many requests from this client or for this agent; see Retry-After", body = ApiError),
        (status = 503, description = "not_ready, catching_up, unavailable, audit_unavailable, owner_unavailable or no_owner: the node (or the node that owns the conversation) is catching up, moving, not answering, or cannot record the audit; retry after Retry-After", body = ApiError),
    ))]
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let claims = match admit(&state, &addr, &headers) {
        Ok(c) => c,
        Err(refused) => {
            if let Refused::Auth(f) = &refused {
                app::record_refused_attempt(&state.node, &id, None, f.code()).await;
            }
            return refused.into_response();
        }
    };
    let Ok(sid) = uuid::Uuid::parse_str(&id) else {
        return api_error(StatusCode::BAD_REQUEST, "bad_submission_id", "the submission id must be a UUID");
    };
    if !super::wait_ready(&state).await {
        return not_ready();
    }
    let request: RetrieveRequest = match parse_json(&headers, &body) {
        Ok(r) => r,
        Err(r) => {
            app::record_refused_attempt(&state.node, &id, Some((&claims.sub, &claims.sid)), "bad_request").await;
            return r;
        }
    };
    match app::retrieve(&state.node, &agent(&claims), sid, &request.key).await {
        Ok(app::Retrieval { retrieved: got }) => {
            let answers = got.answers.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect();
            let off_record = match &got.off_record {
                OffRecord::Present(a) => OffRecordView {
                    state: "present",
                    answers: a.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect(),
                },
                OffRecord::Expired => OffRecordView { state: "expired", answers: BTreeMap::new() },
            };
            Json(RetrieveResponse {
                submission_id: id,
                form_id: got.record.form_id.clone(),
                conversation_id: got.record.conversation_id.clone(),
                template_id: got.record.template_id.clone(),
                submitted_at: got.record.submitted_at,
                answers,
                off_record_field_ids: got.record.off_record_field_ids.clone(),
                off_record,
            })
            .into_response()
        }
        Err(refusal) => refused(&refusal),
    }
}

/// What a caller presents to be given a fresh retrieve key: proof that it holds what the agent
/// workspace received, not only the agent's token.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FreshKeyRequest {
    /// A retrieve key issued for this submission (from FormReady or an earlier fresh key; spent or
    /// expired is fine).
    pub previous_key: String,
}

/// A fresh one-time retrieve key for the sender, while the conversation is live, for a caller that
/// holds a key issued for this submission before. Delivered in the response and as a new FormReady.
#[utoipa::path(post, path = "/api/v1/submissions/{id}/retrieve-key", tag = "agent", security(("agent_jwt" = [])),
    params(("id" = uuid::Uuid, Path, description = "Submission UUID")),
    request_body = FreshKeyRequest,
    responses(
        (status = 201, description = "The new key", body = FreshKey),
        (status = 400, description = "bad_submission_id: the id is not a UUID; bad_body", body = ApiError),
        (status = 401, description = "Token refused", body = ApiError),
        (status = 403, description = "Not the sender, no permission, other site or conversation closed; invalid_key: previous_key was never issued for this submission; wrong_session: the key belongs to another open session of the agent", body = ApiError),
        (status = 415, description = "Not application/json", body = ApiError),
        (status = 404, description = "unknown_submission", body = ApiError),
        (status = 429, description = "rate_limited: too many requests from this client or for this agent; see Retry-After", body = ApiError),
        (status = 503, description = "not_ready, catching_up, unavailable, audit_unavailable, owner_unavailable or no_owner: the node (or the node that owns the conversation) is catching up, moving, not answering, or cannot record the audit; retry after Retry-After", body = ApiError),
    ))]
pub async fn fresh_key(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let claims = match admit(&state, &addr, &headers) {
        Ok(c) => c,
        Err(refused) => return refused.into_response(),
    };
    let Ok(sid) = uuid::Uuid::parse_str(&id) else {
        return api_error(StatusCode::BAD_REQUEST, "bad_submission_id", "the submission id must be a UUID");
    };
    if !super::wait_ready(&state).await {
        return not_ready();
    }
    let request: FreshKeyRequest = match parse_json(&headers, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match app::fresh_key(&state.node, &agent(&claims), sid, &request.previous_key).await {
        Ok(key) => (
            StatusCode::CREATED,
            Json(FreshKey {
                submission_id: id,
                retrieve_key: key.retrieve_key,
                retrieve_expires_at: key.retrieve_expires_at,
            }),
        )
            .into_response(),
        Err(refusal) => refused(&refusal),
    }
}

/// A conversation's secure forms, for agent managers. Answers only with "view secure form responses
/// in conversation history" (off by default); off-the-record answers never.
#[utoipa::path(get, path = "/api/v1/conversations/{id}/history", tag = "agent", security(("agent_jwt" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "The conversation's secure forms", body = History),
        (status = 401, description = "Token refused", body = ApiError),
        (status = 403, description = "not_a_manager; invalid_hop: the request claims to be forwarded by another node and its x-secureforms-hop header does not verify", body = ApiError),
        (status = 429, description = "rate_limited: too many requests from this client or for this agent; see Retry-After", body = ApiError),
        (status = 503, description = "not_ready, catching_up, unavailable, audit_unavailable, owner_unavailable or no_owner: the node (or the node that owns the conversation) is catching up, moving, not answering, or cannot record the audit; retry after Retry-After", body = ApiError),
    ))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>,
    Path(conv): Path<String>,
    headers: HeaderMap,
) -> Response {
    let claims = match admit(&state, &addr, &headers) {
        Ok(c) => c,
        Err(refused) => return refused.into_response(),
    };
    if !super::wait_ready(&state).await {
        return not_ready();
    }
    let entries = match app::history(&state.node, &agent(&claims), &conv).await {
        Ok(e) => e,
        Err(refusal) => return refused(&refusal),
    };
    let with_answers = may_view_responses_in_history(&claims.permissions);
    let secure_forms = entries
        .into_iter()
        .map(|e| HistoryItem {
            submission_id: e.submission_id.to_string(),
            form_id: e.owner.form_id,
            template_id: e.owner.template_id,
            sent_by: e.owner.sender,
            submitted_at: e.owner.submitted_at,
            responses_visible: with_answers,
            answers: e.answers.map(|a| a.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect()),
            note: e.note,
        })
        .collect();
    Json(History { conversation_id: conv, site_id: claims.site, secure_forms }).into_response()
}
