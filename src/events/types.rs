//! Typed events, one struct per schema in `schemas/`. Field names and order match the `.avsc` files;
//! `tests` in `codec.rs` round-trip every one of them through its schema.

use serde::{Deserialize, Serialize};

/// Fields every event carries (the `EventHeader` record inside each schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHeader {
    pub event_id: String,
    pub event_type: String,
    pub schema_version: i32,
    /// Milliseconds since the Unix epoch, UTC.
    pub occurred_at: i64,
    pub site_id: String,
    pub conversation_id: String,
    pub correlation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormSent {
    pub header: EventHeader,
    pub form_id: String,
    pub agent_id: String,
    pub agent_profile: String,
    pub template_id: String,
    pub visitor_ref: Option<String>,
    /// The sending agent's session (v3): the FormReady key is bound to it.
    pub agent_session_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormIssued {
    pub header: EventHeader,
    pub form_id: String,
    pub agent_id: String,
    pub template_id: String,
    pub template_version: i32,
    pub link: String,
    pub open_key_hash: String,
    pub open_expires_at: i64,
    pub reopen_limit: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormRejected {
    pub header: EventHeader,
    pub form_id: String,
    pub agent_id: String,
    pub template_id: String,
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormOpened {
    pub header: EventHeader,
    pub form_id: String,
    pub open_count: i32,
    pub submit_key_hash: String,
    pub submit_expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRefused {
    pub header: EventHeader,
    pub form_id: String,
    pub purpose: String,
    pub reason: String,
    pub client_ref: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedAnswer {
    pub field_id: String,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormSubmitted {
    pub header: EventHeader,
    pub form_id: String,
    pub submission_id: String,
    pub agent_id: String,
    pub template_id: String,
    pub template_version: i32,
    pub key_id: String,
    pub answers: Vec<SealedAnswer>,
    pub off_record_field_ids: Vec<String>,
    pub off_record_node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormReady {
    pub header: EventHeader,
    pub form_id: String,
    pub submission_id: String,
    pub agent_id: String,
    pub retrieve_key: String,
    pub retrieve_expires_at: i64,
    pub off_record_field_ids: Vec<String>,
    /// The agent session a fresh key was issued to; None for the tokenizer's key.
    #[serde(default)]
    pub session_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormRetrieved {
    pub header: EventHeader,
    pub form_id: String,
    pub submission_id: String,
    pub agent_id: String,
    pub session_id: Option<String>,
    pub outcome: String,
    pub reason: String,
    /// The recording node's chain link (see `audit::AuditChain`); None before schema version 2.
    #[serde(default)]
    pub chain: Option<AuditLink>,
}

/// One link of a node's tamper-evident chain of FormRetrieved records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLink {
    pub node_id: String,
    pub seq: i64,
    pub prev: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationTransferred {
    pub header: EventHeader,
    pub from_agent_id: String,
    pub to_agent_id: String,
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationClosed {
    pub header: EventHeader,
    pub closed_by: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSessionEnded {
    pub header: EventHeader,
    pub agent_id: String,
    pub session_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    pub id: String,
    pub label: String,
    pub kind: String,
    pub required: bool,
    pub masked: bool,
    pub off_record: bool,
    pub help: Option<String>,
    pub min_length: Option<i32>,
    pub max_length: Option<i32>,
    pub pattern: Option<String>,
    pub choices: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormTemplateDefined {
    pub header: EventHeader,
    pub template_id: String,
    pub version: i32,
    pub title: String,
    pub instructions: String,
    pub questions: Vec<Question>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionPurged {
    pub header: EventHeader,
    pub submission_ids: Vec<String>,
    pub reason: String,
    pub destroyed_key_ids: Vec<String>,
    pub as_of: i64,
    pub count: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyCreated {
    pub header: EventHeader,
    pub key_id: String,
    pub period: String,
    pub generation: i32,
    pub master_key_id: String,
    #[serde(with = "serde_bytes")]
    pub wrapped_key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyDestroyed {
    pub header: EventHeader,
    pub key_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub header: EventHeader,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    #[serde(with = "serde_bytes")]
    pub source_key: Option<Vec<u8>>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub error_kind: String,
    pub reason: String,
    pub consumer_group: String,
    pub redrive_count: i32,
    /// The original record's `secureforms-mac` header, if it had one.
    #[serde(default)]
    pub source_mac: Option<String>,
}

/// A node says where other nodes reach it and which conversation partitions it owns now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnounced {
    pub header: EventHeader,
    pub node_id: String,
    pub url: String,
    pub partitions: Vec<i32>,
    pub partition_count: i32,
    pub leaving: bool,
}
