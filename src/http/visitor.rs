//! The visitor's requests. `GET /f/{site}/{form}?k=<open key>` (the link in the chat) spends
//! nothing: link previews, mail scanners and HEAD requests fetch it freely and get a page with one
//! button. The visitor's click, `POST /f/{site}/{form}/open`, spends an open (up to the reopen limit)
//! and shows the form with a fresh submit key; `POST /f/{site}/{form}` validates, seals and produces
//! the answers, then thanks the visitor. Every refused key gets a clear page that reveals nothing,
//! and a KeyRefused audit event (none for HEAD, which must change nothing). The decisions are the use
//! cases in [`crate::app::visitor`]; this file parses, calls and renders.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::AppState;
use super::pages::{FormPage, MessagePage, OpenPage};
use crate::app::visitor::{self as app, VisitorRefusal};
use crate::domain::otk::OtkSecret;
use crate::domain::visitor::KeyRefusal;

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

/// Per client address: caps what one client can send, key or not.
fn client_limited(state: &AppState, addr: &SocketAddr) -> bool {
    state.per_client.check_key(&addr.ip().to_string()).is_err()
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
    let presented = query.get("k").and_then(|k| OtkSecret::parse(k));
    let audit = method != axum::http::Method::HEAD;
    match app::look(&state.node, &state.gateway, &site, &form, presented.as_ref(), &app::client_ref(&addr), audit).await
    {
        Ok(page) => html(
            StatusCode::OK,
            OpenPage::new(
                &page.title,
                format!("{}/open", action(&site, &form)),
                presented.map(|k| k.expose().to_string()).unwrap_or_default(),
                page.opens_left,
            ),
        ),
        Err(refusal) => refused(refusal, &site, &form, None),
    }
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
    let presented = pairs.iter().find(|(k, _)| k == "k").and_then(|(_, v)| OtkSecret::parse(v));
    match app::open(&state.node, &state.gateway, &site, &form, presented.as_ref(), &app::client_ref(&addr)).await {
        Ok(opened) => html(
            StatusCode::OK,
            FormPage::new(
                &opened.template,
                action(&site, &form),
                opened.submit_key.expose().to_string(),
                &BTreeMap::new(),
                &[],
            ),
        ),
        Err(refusal) => refused(refusal, &site, &form, None),
    }
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
    let mut presented = None;
    let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in pairs {
        if k == "k" {
            presented = OtkSecret::parse(&v);
        } else {
            raw.entry(k).or_default().push(v);
        }
    }
    let client = app::client_ref(&addr);
    match app::submit(&state.node, &state.gateway, &site, &form, presented.as_ref(), &raw, &client).await {
        Ok(_) => message(
            StatusCode::OK,
            "Thank you, your answers were sent",
            &[
                "They went securely to your agent and are not stored in the chat.",
                "You can close this window and return to the chat.",
            ],
        ),
        Err(refusal) => {
            let again = presented.map(|k| (k.expose().to_string(), &raw));
            refused(refusal, &site, &form, again)
        }
    }
}

/// A use case's refusal as the visitor sees it: a page that says what to do, with the status set
/// in [`VisitorRefusal::status`]. `again` (the submit key and the answers as sent) re-renders the
/// form when the answers did not validate.
fn refused(
    refusal: VisitorRefusal,
    site: &str,
    form: &str,
    again: Option<(String, &BTreeMap<String, Vec<String>>)>,
) -> Response {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match refusal {
        VisitorRefusal::Key(r) => refused_page(r),
        VisitorRefusal::TooMany => too_many(),
        VisitorRefusal::UnknownField(k) => {
            bad_request(status, &format!("The form sent a field it does not have ({k:?})."))
        }
        VisitorRefusal::Invalid { template, errors } => {
            let (key, raw) = again.map(|(k, r)| (k, r.clone())).unwrap_or_default();
            html(status, FormPage::new(&template, action(site, form), key, &raw, &errors))
        }
        VisitorRefusal::TemplateGone => {
            message(status, "This form is not available", &["Ask your agent in the chat to send the form again."])
        }
        VisitorRefusal::Unavailable | VisitorRefusal::CatchingUp => {
            try_again_shortly("The form cannot be used right now")
        }
    }
}

pub async fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Page not found", &["Open the form from the link your agent sent in the chat."])
}
