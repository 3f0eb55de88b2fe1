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

/// Orders signed milliseconds as bytes.
fn ordered_ms(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// `site \0`: the start of a site's range in [`super::trees::BY_TIME`].
pub fn time_prefix(site: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + 1);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k
}

/// The retention index key of a submission.
pub fn time_key(site: &str, submitted_at: i64, submission: &uuid::Uuid) -> Vec<u8> {
    let mut k = time_prefix(site);
    k.extend_from_slice(&ordered_ms(submitted_at));
    k.extend_from_slice(submission.as_bytes());
    k
}

/// The first key after every submission of `site` made at or before `ms`.
pub fn time_bound(site: &str, ms: i64) -> Vec<u8> {
    let mut k = time_prefix(site);
    k.extend_from_slice(&ordered_ms(ms));
    k.extend_from_slice(&[0xFF; 17]);
    k
}

/// Splits a retention index key into (site, submitted_at, submission).
pub fn parse_time_key(k: &[u8]) -> Option<(String, i64, uuid::Uuid)> {
    let zero = k.iter().position(|&b| b == 0)?;
    let site = std::str::from_utf8(&k[..zero]).ok()?.to_string();
    let ms = (u64::from_be_bytes(k.get(zero + 1..zero + 9)?.try_into().ok()?) ^ (1 << 63)) as i64;
    let id = uuid::Uuid::from_slice(k.get(zero + 9..zero + 25)?).ok()?;
    Some((site, ms, id))
}

/// `site \0 conversation \0`: a conversation's range in [`super::trees::BY_CONVERSATION`].
pub fn conversation_prefix(site: &str, conversation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + conversation.len() + 2);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(conversation.as_bytes());
    k.push(0);
    k
}

pub fn conversation_key(site: &str, conversation: &str, submission: &uuid::Uuid) -> Vec<u8> {
    let mut k = conversation_prefix(site, conversation);
    k.extend_from_slice(submission.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keys_order_by_site_then_time_and_round_trip() {
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let early = time_key("s1", 1_000, &a);
        let late = time_key("s1", 2_000, &b);
        assert!(early < late);
        assert!(late < time_key("s2", 0, &a), "sites do not interleave");
        assert!(early < time_bound("s1", 1_000) && time_bound("s1", 1_000) < late);
        assert!(time_prefix("s1") < early);
        assert_eq!(parse_time_key(&late), Some(("s1".to_string(), 2_000, b)));
        assert!(time_key("s", -5, &a) < time_key("s", 5, &a), "negative times sort first");
    }
}
