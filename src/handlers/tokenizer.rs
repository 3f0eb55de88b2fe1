//! The tokenizer (seed steps 4 and 5): stores each FormSubmitted's sealed answers in the vault under
//! its submission UUID and tells the agent workspace with FormReady (UUID + a one-time retrieve key).
//! A FormSubmitted seen again changes nothing and emits nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::config::SiteConfig;
use crate::domain::otk::OtkSecret;
use crate::events::{Event, EventHeader, EventKind, FormReady, derived_event_id};
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::Tx;
use crate::topics::Topic;
use crate::vault::record::{VaultRecord, period_key, submission_key};
use crate::vault::trees;

/// Retrieve key life when the site does not say.
pub const DEFAULT_RETRIEVE_TTL_SECS: u64 = 60;

pub struct Tokenizer {
    sites: Arc<BTreeMap<String, SiteConfig>>,
    rng: StdRng,
}

impl Tokenizer {
    pub fn new(sites: Arc<BTreeMap<String, SiteConfig>>) -> Tokenizer {
        Tokenizer { sites, rng: StdRng::from_os_rng() }
    }
}

impl Handler for Tokenizer {
    fn name(&self) -> &'static str {
        "tokenizer"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::Submissions]
    }

    fn apply(&mut self, tx: &mut Tx<'_>, event: &Event, _meta: &RecordMeta, now_ms: i64) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::FormSubmitted(s) => {
                let id = uuid::Uuid::parse_str(&s.submission_id)
                    .map_err(|_| ApplyError::Unprocessable(format!("submission_id {:?} is not a UUID", s.submission_id)))?;
                let key = submission_key(&id);
                if tx.get(trees::SUBMISSIONS, &key)?.is_some() {
                    tracing::debug!(submission_id = %id, "submission already in the vault; duplicate ignored");
                    return Ok(vec![]);
                }
                let record = VaultRecord::from_event(s);
                let period = crate::crypto::period_of(record.submitted_at);
                tx.insert(trees::SUBMISSIONS, key.to_vec(), record.encode());
                tx.insert(trees::BY_PERIOD, period_key(&period, &record.site_id, &id), Vec::new());

                let ttl = self.sites.get(&s.header.site_id).map(|c| c.retrieve_key_ttl_secs).unwrap_or(DEFAULT_RETRIEVE_TTL_SECS);
                let retrieve_key = OtkSecret::generate(&mut self.rng);
                let h = &s.header;
                let ready = FormReady {
                    header: EventHeader::new(
                        EventKind::FormReady,
                        derived_event_id(&h.event_id, EventKind::FormReady),
                        now_ms,
                        &h.site_id,
                        &h.conversation_id,
                        &s.form_id,
                    ),
                    form_id: s.form_id.clone(),
                    submission_id: s.submission_id.clone(),
                    agent_id: s.agent_id.clone(),
                    retrieve_key: retrieve_key.expose().to_string(),
                    retrieve_expires_at: now_ms + (ttl as i64) * 1000,
                    off_record_field_ids: s.off_record_field_ids.clone(),
                };
                tracing::debug!(submission_id = %id, form_id = %s.form_id, site_id = %h.site_id, answers = s.answers.len(), "submission stored in the vault");
                Ok(vec![Event::FormReady(ready)])
            }
            Event::FormOpened(_) | Event::KeyRefused(_) | Event::SubmissionPurged(_) => Ok(vec![]),
            other => Err(ApplyError::Unprocessable(format!("{} does not belong on the submissions topic", other.kind().name()))),
        }
    }
}
