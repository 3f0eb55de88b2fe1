//! The vault record: a deterministic encoding of the sealed submission.

use serde::{Deserialize, Serialize};

use crate::events::FormSubmitted;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultRecord {
    pub site_id: String,
    pub conversation_id: String,
    pub form_id: String,
    pub agent_id: String,
    pub template_id: String,
    pub template_version: i32,
    pub key_id: String,
    pub submitted_at: i64,
    /// (field id, AES-SIV ciphertext), in the order the template asks them.
    pub answers: Vec<(String, Vec<u8>)>,
    pub off_record_field_ids: Vec<String>,
}

impl VaultRecord {
    pub fn from_event(e: &FormSubmitted) -> VaultRecord {
        VaultRecord {
            site_id: e.header.site_id.clone(),
            conversation_id: e.header.conversation_id.clone(),
            form_id: e.form_id.clone(),
            agent_id: e.agent_id.clone(),
            template_id: e.template_id.clone(),
            template_version: e.template_version,
            key_id: e.key_id.clone(),
            submitted_at: e.header.occurred_at,
            answers: e.answers.iter().map(|a| (a.field_id.clone(), a.ciphertext.clone())).collect(),
            off_record_field_ids: e.off_record_field_ids.clone(),
        }
    }

    /// JSON with fields in declaration order: the same record always encodes to the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("vault records serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<VaultRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The vault key of a submission: its UUID's 16 bytes.
pub fn submission_key(id: &uuid::Uuid) -> [u8; 16] {
    *id.as_bytes()
}

pub fn period_key(period: &str, site: &str, submission: &uuid::Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(period.len() + site.len() + 18);
    k.extend_from_slice(period.as_bytes());
    k.push(0);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(submission.as_bytes());
    k
}
