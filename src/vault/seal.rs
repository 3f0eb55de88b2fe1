//! Sealing at the edge: the visitor's answers become a FormSubmitted that carries only ciphertext,
//! key ids and non-sensitive metadata. Off-the-record answers are not in it at all, not even
//! encrypted: they are returned separately, for the in-memory store.

use std::collections::BTreeMap;

use crate::crypto::keyring::DataKey;
use crate::crypto::{KeyError, Recipient, answer_ad_bound};
use crate::domain::template::Template;
use crate::events::{EventHeader, EventKind, FormSubmitted, SealedAnswer};
use crate::vault::offrecord::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the template has no question {0:?}")]
    UnknownField(String),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Who and what a submission belongs to; everything but the answers.
#[derive(Debug, Clone)]
pub struct SubmissionContext<'a> {
    pub site_id: &'a str,
    pub conversation_id: &'a str,
    pub form_id: &'a str,
    pub agent_id: &'a str,
    pub template: &'a Template,
    pub submission_id: uuid::Uuid,
    pub event_id: uuid::Uuid,
    pub now_ms: i64,
    pub node_id: &'a str,
}

pub struct Sealed {
    pub event: FormSubmitted,
    pub off_record: BTreeMap<String, Secret>,
}

/// Seals every normal answer with `key`; answers to off-the-record questions are set aside. Empty
/// answers (optional questions left blank) are left out.
pub fn seal_submission(
    key: &DataKey,
    ctx: &SubmissionContext<'_>,
    answers: BTreeMap<String, Secret>,
) -> Result<Sealed, SealError> {
    let submission = ctx.submission_id.to_string();
    let mut sealed = Vec::new();
    let mut off_record = BTreeMap::new();
    for (field, _) in answers.iter() {
        if !ctx.template.questions.iter().any(|q| &q.id == field) {
            return Err(SealError::UnknownField(field.clone()));
        }
    }
    let mut answers = answers;
    for q in &ctx.template.questions {
        let Some(value) = answers.remove(&q.id) else { continue };
        if value.expose().is_empty() {
            continue;
        }
        if q.is_off_record() {
            off_record.insert(q.id.clone(), value);
        } else {
            let to = Recipient { conversation: ctx.conversation_id, agent: ctx.agent_id };
            let ad = answer_ad_bound(ctx.site_id, ctx.form_id, &submission, &q.id, &key.id, to);
            sealed.push(SealedAnswer {
                field_id: q.id.clone(),
                ciphertext: key.material.seal(&ad, value.expose().as_bytes())?,
            });
        }
    }
    let event = FormSubmitted {
        header: EventHeader::new(
            EventKind::FormSubmitted,
            ctx.event_id,
            ctx.now_ms,
            ctx.site_id,
            ctx.conversation_id,
            ctx.form_id,
        ),
        form_id: ctx.form_id.to_string(),
        submission_id: submission,
        agent_id: ctx.agent_id.to_string(),
        template_id: ctx.template.id.clone(),
        template_version: ctx.template.version,
        key_id: key.id.clone(),
        answers: sealed,
        off_record_field_ids: off_record.keys().cloned().collect(),
        off_record_node: ctx.node_id.to_string(),
    };
    Ok(Sealed { event, off_record })
}
