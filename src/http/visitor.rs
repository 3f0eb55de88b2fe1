//! The visitor's requests. `GET /f/{site}/{form}?k=<open key>` (the link in the chat) spends
//! nothing: link previews, mail scanners and HEAD requests fetch it freely and get a page with one
//! button. The visitor's click, `POST /f/{site}/{form}/open`, spends an open (up to the reopen limit)
//! and shows the form with a fresh submit key; `POST /f/{site}/{form}` validates, seals and produces
//! the answers, then thanks the visitor. Every refused key gets a clear page that reveals nothing,
//! and a KeyRefused audit event (none for HEAD, which must change nothing).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use super::AppState;
use super::pages::{FormPage, MessagePage, OpenPage};
use crate::domain::otk::{OtkSecret, Purpose};
use crate::domain::validate::{YearMonth, validate};
use crate::domain::visitor::{FormState, KeyRefusal, check_open, check_submit};
use crate::events::{Event, EventHeader, EventKind, FormOpened, KeyRefused};
use crate::handlers::gateway::GatewayView;
use crate::handlers::issuer::form_key;
use crate::node::Submission;
use crate::vault::offrecord::Secret;

fn html(status: StatusCode, page: impl Template) -> Response {
    match page.render() {
        Ok(body) => (status, Html(body)).into_response(),
        Err(error) => {
            tracing::error!(%error, "page failed to render; this is a bug in a template");
            (StatusCode::INTERNAL_SERVER_ERROR, "The page could not be shown. Please try again.").into_response()
        }
    }
}

fn message(status: StatusCode, heading: &str, paragraphs: &[&str]) -> Response {
    html(status, MessagePage::new(heading, paragraphs))
}

/// A page for an error the framework answered (405, 413): what is wrong and what to do.
pub fn error_page(status: StatusCode, what: &str) -> Response {
    message(
        status,
        "The request could not be used",
        &[&format!("{}.", capitalized(what)), "Open the form from the link your agent sent in the chat."],
    )
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

/// A 4xx for input the gateway cannot use, saying what is wrong.
fn bad_request(status: StatusCode, what: &str) -> Response {
    message(status, "The form could not be read", &[what, "Go back to the chat and open the form link again."])
}

fn refused_page(r: KeyRefusal) -> Response {
    match r {
        KeyRefusal::Invalid => message(
            StatusCode::FORBIDDEN,
            "This link cannot be used",
            &[
                "The link is not valid. It may have been copied incompletely.",
                "Ask your agent in the chat to send the form again.",
            ],
        ),
        KeyRefusal::Expired => message(
            StatusCode::GONE,
            "This form has expired",
            &[
                "For your security, secure forms are only open for a short time.",
                "Ask your agent in the chat to send the form again.",
            ],
        ),
        KeyRefusal::AlreadySubmitted => message(
            StatusCode::CONFLICT,
            "This form has already been sent",
            &[
                "Your answers were already sent to your agent; they were sent once.",
                "You can close this window and return to the chat.",
            ],
        ),
        KeyRefusal::ReopenLimit => message(
            StatusCode::GONE,
            "This form can no longer be opened",
            &["It has been opened the maximum number of times.", "Ask your agent in the chat to send the form again."],
        ),
    }
}

fn too_many() -> Response {
    let mut r = message(StatusCode::TOO_MANY_REQUESTS, "Too many attempts", &["Please wait a minute, then try again."]);
    r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("60"));
    r
}

/// A client reference for audit events: a hash of the address, never the address itself.
fn client_ref(addr: &SocketAddr) -> String {
    hex::encode(&Sha256::digest(format!("secureforms-client/{}", addr.ip()).as_bytes())[..8])
}

/// Per client address: caps what one client can send, key or not.
fn client_limited(state: &AppState, addr: &SocketAddr) -> bool {
    state.per_client.check_key(&addr.ip().to_string()).is_err()
}

/// Per form: counted only for requests that presented the form's valid key, so a third party
/// without the key cannot use up the visitor's allowance.
fn form_limited(state: &AppState, site: &str, form: &str) -> bool {
    state.per_form.check_key(&format!("{site}/{form}")).is_err()
}

/// The form's key state: this node's latest writes, else the projection. A store that cannot be
/// read is the service's trouble: the visitor gets 503 (try again), never "this link cannot be used".
fn form_state(state: &AppState, site: &str, form: &str) -> Result<Option<FormState>, Response> {
    if let Some(s) = state.overlay.get(&form_key(site, form)) {
        return Ok(Some(s.clone()));
    }
    GatewayView::new(state.node.gateway.clone()).form(site, form).map_err(|error| {
        tracing::error!(%error, site_id = %site, form_id = %form, "cannot read the form's key state; check the data directory's disk");
        try_again_shortly("The form cannot be used right now")
    })
}

fn lock(state: &AppState, key: &[u8]) -> Arc<tokio::sync::Mutex<()>> {
    state.locks.entry(key.to_vec()).or_default().clone()
}

/// Records a refusal (audit) without holding up the visitor's page.
fn audit_refusal(
    state: &AppState,
    site: &str,
    form: &str,
    conversation: &str,
    purpose: Purpose,
    r: KeyRefusal,
    addr: &SocketAddr,
) {
    let now = (state.node.clock)();
    let event = Event::KeyRefused(KeyRefused {
        header: EventHeader::new(EventKind::KeyRefused, uuid::Uuid::new_v4(), now, site, conversation, form),
        form_id: form.to_string(),
        purpose: purpose.as_str().to_string(),
        reason: r.code().to_string(),
        client_ref: client_ref(addr),
    });
    tracing::info!(
        site_id = site,
        form_id = form,
        purpose = purpose.as_str(),
        reason = r.code(),
        "one-time key refused"
    );
    state.node.metrics.otk(purpose.as_str(), r.code());
    let audit = state.node.audit.clone();
    tokio::spawn(async move {
        if let Err(error) = audit.record(&event, None).await {
            tracing::warn!(%error, "could not record a key refusal; check the data directory's disk");
        }
    });
}

/// The form's template from the configuration, or the page saying the form cannot be shown.
fn template_for(state: &AppState, site: &str, fs: &FormState) -> Result<crate::domain::template::Template, Response> {
    state.node.settings.sites.get(site).and_then(|s| s.template(&fs.template_id)).cloned().ok_or_else(|| {
        tracing::error!(site_id = %site, template_id = %fs.template_id, "form refers to a template no longer configured; restore it in the config file");
        message(StatusCode::SERVICE_UNAVAILABLE, "This form is not available", &["Ask your agent in the chat to send the form again."])
    })
}

fn current_month(ms: i64) -> YearMonth {
    let dt = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    YearMonth { year: dt.year(), month: u8::from(dt.month()) }
}

fn action(site: &str, form: &str) -> String {
    format!("/f/{}/{}", urlencode(site), urlencode(form))
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The link in the chat. Spends nothing: shows a page whose button opens the form (a POST), so
/// link previews, mail scanners and HEAD requests leave the visitor's opens untouched. A key that
/// cannot open gets the refusal page at once.
#[utoipa::path(get, path = "/f/{site}/{form}", tag = "visitor",
    params(("site" = String, Path, description = "Site id"), ("form" = String, Path, description = "Form id"), ("k" = String, Query, description = "One-time open key from the link")),
    responses(
        (status = 200, description = "A page with one button that opens the form; nothing is spent", content_type = "text/html"),
        (status = 403, description = "The key is not valid (forged, cross-site, missing)", content_type = "text/html"),
        (status = 409, description = "The form was already submitted", content_type = "text/html"),
        (status = 410, description = "The key expired or the form was opened too many times", content_type = "text/html"),
        (status = 429, description = "Too many attempts; see Retry-After", content_type = "text/html"),
        (status = 503, description = "The node is catching up or cannot reach the brokers; try again after Retry-After", content_type = "text/html"),
    ))]
pub async fn link(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: axum::http::Method,
    Path((site, form)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    if client_limited(&state, &addr) {
        return too_many();
    }
    if !super::wait_ready(&state).await {
        return try_again_shortly("The form cannot be shown right now");
    }
    let now = (state.node.clock)();
    let current = match form_state(&state, &site, &form) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let presented = query.get("k").and_then(|k| OtkSecret::parse(k));
    let (fs, k) = match check_open(current.as_ref(), &site, &form, presented.as_ref(), now) {
        Ok(checked) => (checked.state.clone(), checked.key.clone()),
        Err(r) => {
            if method != axum::http::Method::HEAD {
                let conversation = current.as_ref().map(|s| s.conversation_id.clone()).unwrap_or_default();
                audit_refusal(&state, &site, &form, &conversation, Purpose::Open, r, &addr);
            }
            return refused_page(r);
        }
    };
    let title = template_for(&state, &site, &fs).map(|t| t.title).unwrap_or_else(|_| "Secure form".into());
    html(
        StatusCode::OK,
        OpenPage::new(&title, format!("{}/open", action(&site, &form)), k.expose().to_string(), fs.opens_left()),
    )
}

/// Open the secure form: the visitor's own click on the link's page. Spends one open of the link's
/// key (up to the site's reopen limit) and returns the form with a fresh submit key.
#[utoipa::path(post, path = "/f/{site}/{form}/open", tag = "visitor",
    params(("site" = String, Path, description = "Site id"), ("form" = String, Path, description = "Form id")),
    request_body(content_type = "application/x-www-form-urlencoded", description = "`k`: the one-time open key from the link"),
    responses(
        (status = 200, description = "The form", content_type = "text/html"),
        (status = 400, description = "Malformed encoding", content_type = "text/html"),
        (status = 403, description = "The key is not valid (forged, cross-site, missing)", content_type = "text/html"),
        (status = 409, description = "The form was already submitted", content_type = "text/html"),
        (status = 410, description = "The key expired or the form was opened too many times", content_type = "text/html"),
        (status = 413, description = "Body over 64 KiB", content_type = "text/html"),
        (status = 415, description = "Not application/x-www-form-urlencoded", content_type = "text/html"),
        (status = 429, description = "Too many attempts; see Retry-After", content_type = "text/html"),
        (status = 503, description = "The opening could not be recorded; try again shortly (Retry-After)", content_type = "text/html"),
    ))]
pub async fn open(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path((site, form)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if client_limited(&state, &addr) {
        return too_many();
    }
    let pairs = match parse_body(&headers, &body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !super::wait_ready(&state).await {
        return try_again_shortly("The form cannot be used right now");
    }
    let key = form_key(&site, &form);
    let guard = lock(&state, &key);
    let _held = guard.lock().await;
    let now = (state.node.clock)();
    let current = match form_state(&state, &site, &form) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let presented = pairs.iter().find(|(k, _)| k == "k").and_then(|(_, v)| OtkSecret::parse(v));
    let mut fs = match check_open(current.as_ref(), &site, &form, presented.as_ref(), now) {
        Ok(checked) => checked.state.clone(),
        Err(r) => {
            let conversation = current.as_ref().map(|s| s.conversation_id.clone()).unwrap_or_default();
            audit_refusal(&state, &site, &form, &conversation, Purpose::Open, r, &addr);
            return refused_page(r);
        }
    };
    if form_limited(&state, &site, &form) {
        return too_many();
    }
    let template = match template_for(&state, &site, &fs) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let submit_ttl = state.node.settings.sites.get(&site).map(|s| s.submit_key_ttl_secs).unwrap_or(1800);
    let submit_key = OtkSecret::generate(&mut rand::rngs::StdRng::from_os_rng());
    let opened = FormOpened {
        header: EventHeader::new(EventKind::FormOpened, uuid::Uuid::new_v4(), now, &site, &fs.conversation_id, &form),
        form_id: form.clone(),
        open_count: fs.open_count + 1,
        submit_key_hash: submit_key.hash(Purpose::Submit, &site, &form),
        submit_expires_at: now + (submit_ttl as i64) * 1000,
    };
    if let Err(error) = state.node.producer.send(&Event::FormOpened(opened.clone())).await {
        tracing::error!(%error, "could not record the form opening; check the brokers");
        return try_again_shortly("The form cannot be opened right now");
    }
    fs.opened(&opened);
    state.overlay.insert(key, fs);
    state.node.metrics.otk("open", "accepted");
    html(
        StatusCode::OK,
        FormPage::new(&template, action(&site, &form), submit_key.expose().to_string(), &BTreeMap::new(), &[]),
    )
}

/// Infrastructure trouble (the brokers away): 503 with Retry-After, never the visitor's fault.
pub(crate) fn try_again_shortly(heading: &str) -> Response {
    let mut r = message(
        StatusCode::SERVICE_UNAVAILABLE,
        heading,
        &["This is a problem on our side, not with your link.", "Please try again in a minute."],
    );
    r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("30"));
    r
}

/// Parses an `application/x-www-form-urlencoded` body into field -> values.
fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Vec<(String, String)>, Response> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(bad_request(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "The form must be sent as application/x-www-form-urlencoded, the way the page sends it.",
        ));
    }
    parse_urlencoded(body).ok_or_else(|| {
        bad_request(StatusCode::BAD_REQUEST, "The form data is not correctly encoded (it must be URL-encoded UTF-8).")
    })
}

/// Strict `application/x-www-form-urlencoded` parsing: any byte sequence that is not valid UTF-8
/// once decoded is refused instead of being replaced.
fn parse_urlencoded(body: &[u8]) -> Option<Vec<(String, String)>> {
    let decode = |part: &[u8]| -> Option<String> {
        let plus_as_space: Vec<u8> = part.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect();
        percent_encoding::percent_decode(&plus_as_space).decode_utf8().ok().map(|c| c.into_owned())
    };
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |&b| b == b'=');
            let k = decode(kv.next().unwrap_or_default())?;
            let v = decode(kv.next().unwrap_or_default())?;
            Some((k, v))
        })
        .collect()
}

/// Submit the answers with the page's submit key `k`. Valid answers are sealed and stored before
/// the thank-you page; invalid ones re-render the form with an error summary.
#[utoipa::path(post, path = "/f/{site}/{form}", tag = "visitor",
    params(("site" = String, Path, description = "Site id"), ("form" = String, Path, description = "Form id")),
    request_body(content_type = "application/x-www-form-urlencoded", description = "`k` (the submit key) and one field per question id (several for multiple choice)"),
    responses(
        (status = 200, description = "Thank-you page: the answers were sealed and stored", content_type = "text/html"),
        (status = 400, description = "Unknown field or malformed encoding", content_type = "text/html"),
        (status = 403, description = "The submit key is not valid", content_type = "text/html"),
        (status = 409, description = "Already submitted", content_type = "text/html"),
        (status = 410, description = "The submit key expired", content_type = "text/html"),
        (status = 413, description = "Body over 64 KiB", content_type = "text/html"),
        (status = 415, description = "Not application/x-www-form-urlencoded", content_type = "text/html"),
        (status = 422, description = "Answers do not validate; the form again with an error summary", content_type = "text/html"),
        (status = 429, description = "Too many attempts; see Retry-After", content_type = "text/html"),
        (status = 503, description = "The node is catching up or cannot reach the brokers; nothing was sent; try again after Retry-After", content_type = "text/html"),
    ))]
pub async fn submit(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path((site, form)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if client_limited(&state, &addr) {
        return too_many();
    }
    let pairs = match parse_body(&headers, &body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !super::wait_ready(&state).await {
        return try_again_shortly("The form cannot be used right now");
    }
    let key = form_key(&site, &form);
    let guard = lock(&state, &key);
    let _held = guard.lock().await;
    let now = (state.node.clock)();
    let current = match form_state(&state, &site, &form) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let presented = pairs.iter().find(|(k, _)| k == "k").and_then(|(_, v)| OtkSecret::parse(v));
    let (mut fs, k) = match check_submit(current.as_ref(), &site, &form, presented.as_ref(), now) {
        Ok(checked) => (checked.state.clone(), checked.key.clone()),
        Err(r) => {
            let conversation = current.as_ref().map(|s| s.conversation_id.clone()).unwrap_or_default();
            audit_refusal(&state, &site, &form, &conversation, Purpose::Submit, r, &addr);
            return refused_page(r);
        }
    };
    if form_limited(&state, &site, &form) {
        return too_many();
    }
    let template = match template_for(&state, &site, &fs) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in pairs {
        if k == "k" {
            continue;
        }
        if !template.questions.iter().any(|q| q.id == k) {
            return bad_request(StatusCode::BAD_REQUEST, &format!("The form sent a field it does not have ({k:?})."));
        }
        raw.entry(k).or_default().push(v);
    }
    let answers = match validate(&template, &raw, current_month(now)) {
        Ok(a) => a,
        Err(errors) => {
            return html(
                StatusCode::UNPROCESSABLE_ENTITY,
                FormPage::new(&template, action(&site, &form), k.expose().to_string(), &raw, &errors),
            );
        }
    };
    drop(raw);
    let secrets: BTreeMap<String, Secret> = answers.into_iter().map(|(k, v)| (k, Secret::new(v))).collect();
    let submission = Submission {
        site_id: &site,
        conversation_id: &fs.conversation_id,
        form_id: &form,
        agent_id: &fs.agent_id,
        template: &template,
        answers: secrets,
    };
    match state.node.submit(submission).await {
        Ok(_) => {
            state.node.metrics.otk("submit", "accepted");
            fs.submitted = true;
            state.overlay.insert(key, fs);
            message(
                StatusCode::OK,
                "Thank you, your answers were sent",
                &[
                    "They went securely to your agent and are not stored in the chat.",
                    "You can close this window and return to the chat.",
                ],
            )
        }
        Err(error) => {
            tracing::error!(%error, site_id = %site, form_id = %form, "submission could not be stored; check the brokers and the master key");
            let mut r = message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Your answers could not be sent",
                &["This is a problem on our side. Nothing was sent.", "Please try again in a minute."],
            );
            r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("30"));
            r
        }
    }
}

pub async fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Page not found", &["Open the form from the link your agent sent in the chat."])
}
