//! The agent API (seed steps 6-7): retrieve a submission with its one-time key, ask for a fresh key,
//! and the manager's conversation history. Every retrieval attempt, granted or denied, emits exactly
//! one FormRetrieved (the audit trail); answers never go into events or logs.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{AgentClaims, AuthFailure};
use crate::domain::access::{
    Conversation, MANAGER_ROLE, Requester, SubmissionOwner, may_retrieve, may_view_responses_in_history,
};
use crate::domain::otk::OtkSecret;
use crate::events::{Event, EventHeader, EventKind, FormReady, FormRetrieved};
use crate::handlers::visibility::{VisibilityView, conversation_key, trees};
use crate::store::StoreError;
use crate::vault::detokenize::DetokenizeError;
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

/// Logs a state store failure (what to check) and answers 503.
fn store_failed(error: &dyn std::fmt::Display) -> Response {
    tracing::error!(%error, "cannot read the node's state store; check the data directory's disk");
    unavailable()
}

fn visibility(state: &AppState) -> VisibilityView {
    VisibilityView::new(state.node.visibility.clone())
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
    match visibility(state).session_ended(&claims.site, &claims.sid) {
        Ok(false) => Ok(claims),
        Ok(true) => Err(Refused::Auth(AuthFailure::SessionEnded)),
        Err(error) => {
            tracing::error!(%error, "cannot read the ended sessions; check the data directory's disk");
            Err(Refused::Unavailable)
        }
    }
}

/// Who sent a submission and the state of its conversation.
fn owner_and_conversation(
    state: &AppState,
    id: &uuid::Uuid,
) -> Result<(Option<SubmissionOwner>, Option<Conversation>), StoreError> {
    let view = visibility(state);
    let Some(owner) = view.owner(id)? else { return Ok((None, None)) };
    let conv = view.conversation(&owner.site_id, &owner.conversation_id)?;
    Ok((Some(owner), conv))
}

/// Records the audit event durably (relayed to Kafka by the audit log). Returns false when it could
/// not be recorded. `spent` is the key hash a granted retrieval spent.
async fn audit(
    state: &AppState,
    owner: Option<&SubmissionOwner>,
    submission: &str,
    agent: &str,
    session: Option<&str>,
    outcome: &str,
    reason: &str,
) -> bool {
    audit_spending(state, owner, submission, agent, session, outcome, reason, None).await
}

#[allow(clippy::too_many_arguments)]
async fn audit_spending(
    state: &AppState,
    owner: Option<&SubmissionOwner>,
    submission: &str,
    agent: &str,
    session: Option<&str>,
    outcome: &str,
    reason: &str,
    spent: Option<&str>,
) -> bool {
    let (site, conv, form) =
        owner.map(|o| (o.site_id.as_str(), o.conversation_id.as_str(), o.form_id.as_str())).unwrap_or(("", "", ""));
    let event = Event::FormRetrieved(FormRetrieved {
        header: EventHeader::new(EventKind::FormRetrieved, uuid::Uuid::new_v4(), now(state), site, conv, form),
        form_id: form.to_string(),
        submission_id: submission.to_string(),
        agent_id: agent.to_string(),
        session_id: session.map(str::to_string),
        outcome: outcome.to_string(),
        reason: reason.to_string(),
        // Linked into this node's chain when it is recorded.
        chain: None,
    });
    tracing::info!(submission_id = submission, agent_id = agent, outcome, reason, "retrieval attempt");
    state.node.metrics.retrieval(outcome == "granted", if reason.is_empty() { "ok" } else { reason });
    if spent.is_some() || ["invalid_key", "wrong_purpose", "key_expired", "key_spent"].contains(&reason) {
        state.node.metrics.otk("retrieve", if spent.is_some() { "accepted" } else { reason });
    }
    match state.node.audit.record(&event, spent).await {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, "could not record the retrieval audit event; check the data directory's disk");
            false
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
        (status = 503, description = "not_ready or unavailable: the node is catching up or cannot record the audit; retry after Retry-After", body = ApiError),
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
                let known =
                    uuid::Uuid::parse_str(&id).ok().and_then(|sid| visibility(&state).owner(&sid).ok().flatten());
                audit(&state, known.as_ref(), &id, "", None, "denied", f.code()).await;
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
    let (known, conv) = match owner_and_conversation(&state, &sid) {
        Ok(found) => found,
        Err(error) => return store_failed(&error),
    };
    let request: RetrieveRequest = match parse_json(&headers, &body) {
        Ok(r) => r,
        Err(r) => {
            audit(&state, known.as_ref(), &id, &claims.sub, Some(&claims.sid), "denied", "bad_request").await;
            return r;
        }
    };
    let who = Requester { agent_id: &claims.sub, site_id: &claims.site, permissions: &claims.permissions };
    let owner = match may_retrieve(&who, known.as_ref(), conv.as_ref()) {
        Ok(owner) => owner.clone(),
        Err(d) => {
            audit(&state, known.as_ref(), &id, &claims.sub, Some(&claims.sid), "denied", d.code()).await;
            let status = if d == crate::domain::access::Denial::UnknownSubmission {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            };
            return api_error(status, d.code(), d.message());
        }
    };
    let sent_from = match visibility(&state).sent_from_session(&owner.site_id, &owner.form_id) {
        Ok(s) => s,
        Err(error) => return store_failed(&error),
    };
    match state.node.detokenizer.detokenize_in_session(
        &claims.site,
        sid,
        &request.key,
        Some(&claims.sid),
        sent_from.as_deref(),
        now(&state),
    ) {
        Ok(got) => {
            if !audit_spending(
                &state,
                Some(&owner),
                &id,
                &claims.sub,
                Some(&claims.sid),
                "granted",
                "",
                Some(&got.spent_key_hash),
            )
            .await
            {
                // Nothing was returned, so nothing was spent: the same key works on a retry.
                state.node.detokenizer.release(&got.spent_key_hash);
                return api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "the retrieval could not be audited, so nothing was returned; try again shortly with the same key",
                );
            }
            let answers = got.answers.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect();
            // Off-the-record answers are read once: the granted retrieval that returns them forgets them.
            if matches!(&got.off_record, OffRecord::Present(a) if !a.is_empty()) {
                state.node.off_record.forget(&sid);
            }
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
        Err(DetokenizeError::Refused(r)) => {
            audit(&state, Some(&owner), &id, &claims.sub, Some(&claims.sid), "denied", r.code()).await;
            let status = if r == crate::vault::detokenize::Refusal::UnknownSubmission {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            };
            api_error(status, r.code(), &r.to_string())
        }
        Err(DetokenizeError::Store(error)) => {
            audit(&state, Some(&owner), &id, &claims.sub, Some(&claims.sid), "denied", "unavailable").await;
            store_failed(&error)
        }
        Err(error) => {
            audit(&state, Some(&owner), &id, &claims.sub, Some(&claims.sid), "denied", "internal_error").await;
            tracing::error!(%error, submission_id = %id, "detokenizing failed; check the master key and the key ring");
            api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the submission could not be opened")
        }
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
        (status = 503, description = "not_ready or unavailable: the node is catching up or cannot record the audit; retry after Retry-After", body = ApiError),
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
    let (known, conv) = match owner_and_conversation(&state, &sid) {
        Ok(found) => found,
        Err(error) => return store_failed(&error),
    };
    let who = Requester { agent_id: &claims.sub, site_id: &claims.site, permissions: &claims.permissions };
    let owner = match may_retrieve(&who, known.as_ref(), conv.as_ref()) {
        Ok(owner) => owner.clone(),
        Err(d) => {
            let status = if d == crate::domain::access::Denial::UnknownSubmission {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            };
            return api_error(status, d.code(), d.message());
        }
    };
    let request: FreshKeyRequest = match parse_json(&headers, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match state.node.detokenizer.was_issued(&owner.site_id, &sid, &request.previous_key) {
        Ok(true) => {}
        Ok(false) => {
            return api_error(
                StatusCode::FORBIDDEN,
                "invalid_key",
                "previous_key is not a retrieve key issued for this submission; a fresh key is given to the holder of one",
            );
        }
        Err(error) => return store_failed(&error),
    }
    // A key bound to another session that is still open stays with it: a token of another session
    // plus a key read off the topic get nothing. Once that session ended, the agent moves on.
    let view = visibility(&state);
    let bound = match state.node.detokenizer.key_session(&sid) {
        Ok(Some(s)) => Some(s),
        Ok(None) => match view.sent_from_session(&owner.site_id, &owner.form_id) {
            Ok(s) => s,
            Err(error) => return store_failed(&error),
        },
        Err(error) => return store_failed(&error),
    };
    if let Some(bound) = bound.filter(|b| *b != claims.sid) {
        match view.session_ended(&owner.site_id, &bound) {
            Ok(true) => {}
            Ok(false) => {
                return api_error(
                    StatusCode::FORBIDDEN,
                    "wrong_session",
                    "this submission's key belongs to another of your sessions that is still open; ask from that session",
                );
            }
            Err(error) => return store_failed(&error),
        }
    }
    let t = now(&state);
    let ttl = state.node.settings.sites.get(&owner.site_id).map(|s| s.retrieve_key_ttl_secs).unwrap_or(60);
    let record = match state.node.detokenizer.record(&sid) {
        Ok(r) => r,
        Err(error) => return store_failed(&error),
    };
    let key = OtkSecret::generate(&mut rand::rngs::StdRng::from_os_rng());
    let ready = FormReady {
        header: EventHeader::new(
            EventKind::FormReady,
            uuid::Uuid::new_v4(),
            t,
            &owner.site_id,
            &owner.conversation_id,
            &owner.form_id,
        ),
        form_id: owner.form_id.clone(),
        submission_id: id.clone(),
        agent_id: owner.sender.clone(),
        retrieve_key: key.expose().to_string(),
        retrieve_expires_at: t + (ttl as i64) * 1000,
        off_record_field_ids: record.map(|r| r.off_record_field_ids).unwrap_or_default(),
        // Usable only from the session that asked for it.
        session_id: Some(claims.sid.clone()),
    };
    // Through the same ordered log as the audit events: the projection must see an earlier
    // retrieval's FormRetrieved before this key, or it would mark the new key spent.
    if let Err(error) = state.node.audit.record(&Event::FormReady(ready.clone()), None).await {
        tracing::error!(%error, "could not record a fresh retrieve key; check the data directory's disk");
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "try again in a moment");
    }
    (
        StatusCode::CREATED,
        Json(FreshKey {
            submission_id: id,
            retrieve_key: ready.retrieve_key,
            retrieve_expires_at: ready.retrieve_expires_at,
        }),
    )
        .into_response()
}

/// A conversation's secure forms, for agent managers. Answers only with "view secure form responses
/// in conversation history" (off by default); off-the-record answers never.
#[utoipa::path(get, path = "/api/v1/conversations/{id}/history", tag = "agent", security(("agent_jwt" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "The conversation's secure forms", body = History),
        (status = 401, description = "Token refused", body = ApiError),
        (status = 403, description = "not_a_manager", body = ApiError),
        (status = 429, description = "rate_limited: too many requests from this client or for this agent; see Retry-After", body = ApiError),
        (status = 503, description = "not_ready or unavailable: the node is catching up or cannot record the audit; retry after Retry-After", body = ApiError),
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
    if !claims.roles.iter().any(|r| r == MANAGER_ROLE) {
        return api_error(StatusCode::FORBIDDEN, "not_a_manager", "conversation history is for agent managers");
    }
    let with_answers = may_view_responses_in_history(&claims.permissions);
    let mut prefix = conversation_key(&claims.site, &conv);
    prefix.push(0);
    let index = match state.node.visibility.tree(trees::BY_CONVERSATION) {
        Ok(t) => t,
        Err(error) => return store_failed(&error),
    };
    let mut items = Vec::new();
    for row in index.scan_prefix(&prefix) {
        let row = match row {
            Ok(row) => row,
            Err(error) => return store_failed(&error),
        };
        let Ok(sid) = uuid::Uuid::from_slice(&row.0[prefix.len()..]) else { continue };
        let o = match visibility(&state).owner(&sid) {
            Ok(Some(o)) => o,
            Ok(None) => continue,
            Err(error) => return store_failed(&error),
        };
        let mut item = HistoryItem {
            submission_id: sid.to_string(),
            form_id: o.form_id.clone(),
            template_id: o.template_id.clone(),
            sent_by: o.sender.clone(),
            submitted_at: o.submitted_at,
            responses_visible: with_answers,
            answers: None,
            note: None,
        };
        if with_answers {
            match state.node.detokenizer.open_for_history(&claims.site, sid) {
                Ok(answers) => {
                    // Recorded before any answer leaves the service (ADR 9); unrecorded, nothing is
                    // returned.
                    let recorded = audit(
                        &state,
                        Some(&o),
                        &sid.to_string(),
                        &claims.sub,
                        Some(&claims.sid),
                        "granted",
                        "history_view",
                    )
                    .await;
                    if !recorded {
                        return api_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "audit_unavailable",
                            "the history view could not be audited, so no answers were returned; try again shortly",
                        );
                    }
                    item.answers = Some(answers.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect());
                }
                Err(e) => item.note = Some(format!("responses unavailable: {e}")),
            }
        } else {
            item.note = Some("a secure form was submitted; responses are hidden".into());
        }
        items.push(item);
    }
    Json(History { conversation_id: conv, site_id: claims.site, secure_forms: items }).into_response()
}
