//! The tokenizer (seed steps 4 and 5): stores each FormSubmitted's sealed answers in the vault under
//! its submission UUID and tells the agent workspace with FormReady (UUID + a one-time retrieve key).
//! A FormSubmitted seen again changes nothing and emits nothing.
//!
//! It also owns removal: a SubmissionPurged (retention or erasure) removes the listed submissions
//! (and, for an erasure, every submission of that conversation) and leaves a tombstone. A
//! FormSubmitted that is already purged is skipped, whichever comes first on replay: tombstoned,
//! past its site's retention as of the processing clock, or sealed with a destroyed data key.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::SiteConfig;
use crate::crypto::KeyRing;
use crate::events::{Event, EventHeader, EventKind, FormReady, derived_event_id};
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::store::Tx;
use crate::topics::Topic;
use crate::vault::record::{VaultRecord, conversation_key, conversation_prefix, submission_key, time_key};
use crate::vault::trees;

/// Retrieve key life when the site does not say.
pub const DEFAULT_RETRIEVE_TTL_SECS: u64 = 60;

pub struct Tokenizer {
    sites: Arc<BTreeMap<String, SiteConfig>>,
    ring: Arc<KeyRing>,
    metrics: Arc<Metrics>,
    /// Derives each FormReady's retrieve key from its FormSubmitted: applying a submission again (on
    /// the node that takes over its partition) gives the key the workspace already has.
    keys: Arc<crate::crypto::KeyDeriver>,
}

impl Tokenizer {
    pub fn new(
        sites: Arc<BTreeMap<String, SiteConfig>>,
        ring: Arc<KeyRing>,
        metrics: Arc<Metrics>,
        keys: Arc<crate::crypto::KeyDeriver>,
    ) -> Tokenizer {
        Tokenizer { sites, ring, metrics, keys }
    }

    fn retention_months(&self, site: &str) -> u32 {
        self.sites.get(site).map(|c| c.retention_months).unwrap_or(crate::config::DEFAULT_RETENTION_MONTHS)
    }

    /// Why a FormSubmitted must not enter the vault, if it must not.
    fn purged_reason(
        &self,
        tx: &mut Tx<'_>,
        id: &uuid::Uuid,
        s: &crate::events::FormSubmitted,
        now_ms: i64,
    ) -> Result<Option<&'static str>, StoreError> {
        if tx.get(trees::PURGED, &submission_key(id))?.is_some() {
            return Ok(Some("tombstone"));
        }
        if crate::domain::retention::is_expired(s.header.occurred_at, self.retention_months(&s.header.site_id), now_ms)
        {
            return Ok(Some("retention"));
        }
        if matches!(self.ring.get(&s.key_id), Err(crate::crypto::KeyError::Destroyed(_))) {
            return Ok(Some("key_destroyed"));
        }
        Ok(None)
    }
}

/// Removes one submission from the vault and its indexes, and leaves a tombstone. Returns whether it
/// was there.
pub fn remove_submission(tx: &mut Tx<'_>, id: &uuid::Uuid, reason: &str) -> Result<bool, StoreError> {
    let key = submission_key(id);
    let existing = tx.get(trees::SUBMISSIONS, &key)?;
    if let Some(raw) = &existing
        && let Ok(record) = VaultRecord::decode(raw)
    {
        tx.remove(trees::BY_TIME, time_key(&record.site_id, record.submitted_at, id));
        tx.remove(trees::BY_CONVERSATION, conversation_key(&record.site_id, &record.conversation_id, id));
        let mut form_key = record.site_id.as_bytes().to_vec();
        form_key.push(0);
        form_key.extend_from_slice(record.form_id.as_bytes());
        if tx.get(trees::BY_FORM, &form_key)?.is_some_and(|v| v == id.as_bytes()) {
            tx.remove(trees::BY_FORM, form_key);
        }
    }
    tx.remove(trees::SUBMISSIONS, key.to_vec());
    tx.insert(trees::PURGED, key.to_vec(), reason.as_bytes().to_vec());
    Ok(existing.is_some())
}

impl Handler for Tokenizer {
    fn name(&self) -> &'static str {
        "tokenizer"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::Submissions]
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        meta: &RecordMeta,
        now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::FormSubmitted(s) => {
                let id = uuid::Uuid::parse_str(&s.submission_id).map_err(|_| {
                    ApplyError::Unprocessable(format!("submission_id {:?} is not a UUID", s.submission_id))
                })?;
                let key = submission_key(&id);
                if tx.get(trees::SUBMISSIONS, &key)?.is_some() {
                    tracing::debug!(submission_id = %id, "submission already in the vault; duplicate ignored");
                    return Ok(vec![]);
                }
                let mut form_key = s.header.site_id.as_bytes().to_vec();
                form_key.push(0);
                form_key.extend_from_slice(s.form_id.as_bytes());
                if let Some(first) = tx.get(trees::BY_FORM, &form_key)?
                    && first != id.as_bytes()
                {
                    let first = uuid::Uuid::from_slice(&first).map(|u| u.to_string()).unwrap_or_default();
                    return Err(ApplyError::Unprocessable(format!(
                        "a second submission ({id}) for form {} of site {}; the form's submission is {first}: one form, one submission",
                        s.form_id, s.header.site_id
                    )));
                }
                if let Some(why) = self.purged_reason(tx, &id, s, now_ms)? {
                    tracing::debug!(submission_id = %id, why, "submission already purged; not stored");
                    if why != "tombstone" {
                        tx.insert(trees::PURGED, key.to_vec(), b"retention".to_vec());
                    }
                    self.metrics.skipped_purged.inc();
                    return Ok(vec![]);
                }
                let record = VaultRecord::from_event(s);
                // A purge removes this again (no trace of a purged form stays in the vault).
                tx.insert(trees::BY_FORM, form_key, id.as_bytes().to_vec());
                tx.insert(trees::SUBMISSIONS, key.to_vec(), record.encode());
                tx.insert(trees::BY_TIME, time_key(&record.site_id, record.submitted_at, &id), Vec::new());
                tx.insert(
                    trees::BY_CONVERSATION,
                    conversation_key(&record.site_id, &record.conversation_id, &id),
                    Vec::new(),
                );

                let ttl = self
                    .sites
                    .get(&s.header.site_id)
                    .map(|c| c.retrieve_key_ttl_secs)
                    .unwrap_or(DEFAULT_RETRIEVE_TTL_SECS);
                let h = &s.header;
                let retrieve_key = self.keys.otk(crate::domain::otk::Purpose::Retrieve, &h.event_id, meta.partition);
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
                    // Bound at use to the session the form was sent from (FormSent v3, the visibility
                    // view); fresh keys carry the session that asked for them.
                    session_id: None,
                };
                tracing::debug!(submission_id = %id, form_id = %s.form_id, site_id = %h.site_id, answers = s.answers.len(), "submission stored in the vault");
                Ok(vec![Event::FormReady(ready)])
            }
            Event::SubmissionPurged(p) => {
                let mut ids = std::collections::BTreeSet::new();
                for raw in &p.submission_ids {
                    ids.insert(uuid::Uuid::parse_str(raw).map_err(|_| {
                        ApplyError::Unprocessable(format!("SubmissionPurged lists {raw:?}, which is not a UUID"))
                    })?);
                }
                if p.reason == "erasure" && !p.header.conversation_id.is_empty() {
                    // Everything of the conversation up to this point of its partition, listed or not.
                    let prefix = conversation_prefix(&p.header.site_id, &p.header.conversation_id);
                    for k in tx.scan_prefix_keys(trees::BY_CONVERSATION, &prefix)? {
                        if let Ok(id) = uuid::Uuid::from_slice(&k[prefix.len()..]) {
                            ids.insert(id);
                        }
                    }
                }
                let mut removed = 0u64;
                for id in &ids {
                    if remove_submission(tx, id, &p.reason)? {
                        removed += 1;
                    }
                }
                if removed > 0 {
                    self.metrics.purged(&p.reason, removed);
                }
                tracing::info!(reason = %p.reason, listed = p.submission_ids.len(), removed, site_id = %p.header.site_id, "submissions purged from the vault");
                Ok(vec![])
            }
            Event::FormOpened(_) | Event::KeyRefused(_) => Ok(vec![]),
            other => Err(ApplyError::Unprocessable(format!(
                "{} does not belong on the submissions topic",
                other.kind().name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{FormSubmitted, SealedAnswer, SubmissionPurged};
    use crate::handlers::given::{Given, form_submitted, header};
    use crate::store::Store;
    use crate::vault::detokenize::Detokenizer;
    use crate::vault::offrecord::OffRecordStore;

    use crate::domain::otk::OtkSecret;

    fn tokenizer() -> Tokenizer {
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        tokenizer_of(master)
    }

    fn tokenizer_of(master: crate::crypto::MasterKey) -> Tokenizer {
        let keys = crate::crypto::KeyDeriver::new(&crate::crypto::IntegrityKey::from_master(&master));
        Tokenizer::new(
            Arc::new(BTreeMap::new()),
            Arc::new(KeyRing::new(master)),
            Arc::new(Metrics::new()),
            Arc::new(keys),
        )
    }

    #[test]
    fn a_node_that_applies_a_submission_again_sends_the_retrieve_key_the_first_one_sent() {
        // Two nodes of one deployment (one master key), each applying the same FormSubmitted from
        // empty state, as the node taking over a dead node's partition does.
        let text = crate::crypto::MasterKey::generate_base64();
        let node = || Given::new(tokenizer_of(crate::crypto::MasterKey::from_base64(&text).unwrap()));
        let s = Event::FormSubmitted(submitted("f1", uuid::Uuid::new_v4()));
        let ready = |out: Vec<Event>| match out.as_slice() {
            [Event::FormReady(r)] => (r.header.event_id.clone(), r.retrieve_key.clone()),
            other => panic!("one FormReady, got {other:?}"),
        };
        let (first, second) = (ready(node().when(&s).unwrap()), ready(node().when(&s).unwrap()));
        assert_eq!(first, second, "same event id, same key");
        // Another submission, another key; another deployment, another key for the same event.
        assert_ne!(
            ready(node().when(&Event::FormSubmitted(submitted("f2", uuid::Uuid::new_v4()))).unwrap()).1,
            first.1
        );
        assert_ne!(ready(Given::new(tokenizer()).when(&s).unwrap()).1, first.1);
    }

    fn submitted(form: &str, id: uuid::Uuid) -> FormSubmitted {
        FormSubmitted {
            answers: vec![SealedAnswer { field_id: "pan".into(), ciphertext: vec![7; 32] }],
            off_record_field_ids: vec!["cvv".into()],
            off_record_node: "node-a".into(),
            ..form_submitted("c1", form, id, "alice")
        }
    }

    fn vault_record(g: &Given<Tokenizer>, id: &uuid::Uuid) -> Option<VaultRecord> {
        let ring = Arc::new(KeyRing::new(
            crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap(),
        ));
        Detokenizer::new(g.store.clone(), Store::temporary().unwrap(), ring, Arc::new(OffRecordStore::new()))
            .record(id)
            .unwrap()
    }

    #[test]
    fn a_submission_is_stored_once_and_answered_with_one_form_ready() {
        let id = uuid::Uuid::new_v4();
        let s = submitted("f1", id);
        let mut g = Given::new(tokenizer());
        let out = g.when(&Event::FormSubmitted(s.clone())).unwrap();
        let [Event::FormReady(ready)] = out.as_slice() else { panic!("one FormReady, got {out:?}") };
        assert_eq!((ready.submission_id.as_str(), ready.agent_id.as_str()), (id.to_string().as_str(), "alice"));
        assert_eq!(ready.off_record_field_ids, vec!["cvv".to_string()]);
        assert_eq!(
            ready.header.event_id,
            derived_event_id(&s.header.event_id, EventKind::FormReady).to_string(),
            "a replayed submission yields the same event id"
        );
        assert!(OtkSecret::parse(&ready.retrieve_key).is_some());
        let record = vault_record(&g, &id).expect("in the vault");
        assert_eq!((record.form_id.as_str(), record.agent_id.as_str()), ("f1", "alice"));

        assert!(g.when(&Event::FormSubmitted(s)).unwrap().is_empty(), "the same submission again: nothing");
        let second = g.when(&Event::FormSubmitted(submitted("f1", uuid::Uuid::new_v4())));
        assert!(
            matches!(&second, Err(ApplyError::Unprocessable(m)) if m.contains("one form, one submission")),
            "{second:?}"
        );
    }

    #[test]
    fn a_purged_submission_leaves_the_vault_and_does_not_come_back() {
        let id = uuid::Uuid::new_v4();
        let s = Event::FormSubmitted(submitted("f1", id));
        let mut g = Given::new(tokenizer()).given([s.clone()]);
        g.when(&Event::SubmissionPurged(SubmissionPurged {
            header: header(EventKind::SubmissionPurged, "acme", "c1", "purge"),
            submission_ids: vec![id.to_string()],
            reason: "retention".into(),
            destroyed_key_ids: vec![],
            as_of: 0,
            count: 1,
        }))
        .unwrap();
        assert!(vault_record(&g, &id).is_none());
        assert!(g.when(&s).unwrap().is_empty(), "replayed after the purge: not stored, no FormReady");
        assert!(vault_record(&g, &id).is_none());
    }
}
