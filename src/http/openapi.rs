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
    components(schemas(super::agent::RetrieveRequest, super::agent::FreshKeyRequest, super::agent::RetrieveResponse, super::agent::OffRecordView, super::agent::ApiError, super::agent::FreshKey, super::agent::History, super::agent::HistoryItem)),
    modifiers(&BearerAuth, &VisitorBodies),
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

/// The visitor's two POST bodies are HTML form posts whose fields follow the template, which the
/// annotations cannot express: both are required, `k` is a one-time key (22 URL-safe base64
/// characters), and a submit carries one string field per question id.
struct VisitorBodies;

impl utoipa::Modify for VisitorBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::request_body::RequestBodyBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{Content, Required};
        let key = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z0-9_-]{22}$"))
                .description(Some(description))
        };
        let bodies = [
            (
                "/f/{site}/{form}/open",
                "The visitor's click on the link's page: `k`, the one-time open key from the link",
                ObjectBuilder::new()
                    .property("k", key("The open key from the link (its `k` query parameter)"))
                    .required("k"),
            ),
            (
                "/f/{site}/{form}",
                "`k` (the submit key from the form) and one field per question id (repeated for multiple choice)",
                ObjectBuilder::new()
                    .property("k", key("The submit key from the form page"))
                    .required("k")
                    .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String))),
            ),
        ];
        for (path, description, schema) in bodies {
            let Some(post) = openapi.paths.paths.get_mut(path).and_then(|item| item.post.as_mut()) else {
                continue;
            };
            post.request_body = Some(
                RequestBodyBuilder::new()
                    .description(Some(description))
                    .required(Some(Required::True))
                    .content("application/x-www-form-urlencoded", Content::new(Some(schema.build())))
                    .build()
                    .into(),
            );
        }
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
    axum::extract::State(node): axum::extract::State<std::sync::Arc<crate::node::Node>>,
) -> axum::response::Response {
    ready_response(&node)
}

/// 200 `ready` or 503, then the conversation partitions this node owns (`owns 0,1,2`; `owns none`
/// on a node of a cluster with more nodes than partitions, which forwards everything).
fn ready_response(node: &crate::node::Node) -> axum::response::Response {
    use axum::response::IntoResponse;
    let owned = node.ownership.owned();
    let owns = if owned.is_empty() {
        "none".to_string()
    } else {
        owned.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
    };
    if node.metrics.is_ready() {
        (axum::http::StatusCode::OK, format!("ready\nowns {owns}\n")).into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("catching up with the topics\nowns {owns}\n"))
            .into_response()
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
