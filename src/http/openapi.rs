//! The OpenAPI description of the whole HTTP API, generated from the handlers' annotations (utoipa),
//! served at `/openapi.json` and kept in `docs/openapi.json` (a test fails when they differ;
//! `secureforms openapi > docs/openapi.json` regenerates it).

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "secureforms",
        description = "Secure forms for live chat. The visitor pages are HTML; the agent API is JSON and needs a bearer JWT from the chat platform (claims: sub, site, roles, permissions, sid, exp).",
        license(name = "Apache-2.0")
    ),
    paths(
        super::visitor::link,
        super::visitor::open,
        super::visitor::submit,
        super::agent::retrieve,
        super::agent::fresh_key,
        super::agent::history,
        healthz,
        readyz,
    ),
    components(schemas(super::agent::RetrieveRequest, super::agent::RetrieveResponse, super::agent::OffRecordView, super::agent::ApiError, super::agent::FreshKey, super::agent::History, super::agent::HistoryItem)),
    modifiers(&BearerAuth),
    tags((name = "visitor", description = "The secure form page opened from the link in the chat"), (name = "agent", description = "Retrieval for the agent workspace and history for managers"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "agent_jwt",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 once every projection on this node has caught up with the topics as they were at
/// start (the state requests read is current), 503 until then.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Ready", body = String), (status = 503, description = "Still catching up with the topics", body = String)))]
pub async fn readyz(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<super::AppState>>,
) -> axum::response::Response {
    ready_response(&state.node)
}

pub async fn ops_readyz(
    axum::extract::State(node): axum::extract::State<std::sync::Arc<crate::service::Node>>,
) -> axum::response::Response {
    ready_response(&node)
}

fn ready_response(node: &crate::service::Node) -> axum::response::Response {
    use axum::response::IntoResponse;
    if node.metrics.is_ready() {
        (axum::http::StatusCode::OK, "ready").into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "catching up with the topics").into_response()
    }
}

pub fn json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_openapi_document_matches_the_code() {
        let committed =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap_or_default();
        assert_eq!(
            committed.trim(),
            super::json().trim(),
            "docs/openapi.json is stale: run `secureforms openapi > docs/openapi.json`"
        );
    }
}
