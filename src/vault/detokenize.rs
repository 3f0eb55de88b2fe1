//! Detokenizing (seed step 7, library side): a submission UUID and a retrieve key give the answers,
//! or a typed refusal. The HTTP API and the visibility rules (who may ask) sit on top of this.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashSet;

use crate::crypto::{KeyError, KeyRing, Recipient, answer_ad, answer_ad_bound};
use crate::domain::otk::{OtkSecret, Purpose};
use crate::handlers::retrieval::RetrievalView;
pub use crate::handlers::retrieval::RetrieveKeyState;
use crate::store::{Store, StoreError};
use crate::vault::offrecord::{OffRecord, OffRecordStore, Secret};
use crate::vault::record::{VaultRecord, submission_key};
use crate::vault::trees;

/// Why a retrieval was refused. The codes go into FormRetrieved and HTTP responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no such submission")]
    UnknownSubmission,
    #[error("the submission belongs to another site")]
    WrongSite,
    #[error("the key is not a valid retrieve key for this submission")]
    InvalidKey,
    #[error("the key is a submit key; only a retrieve key can retrieve")]
    WrongPurpose,
    #[error("the retrieve key has expired; ask for a fresh one")]
    KeyExpired,
    #[error("the retrieve key was already used; ask for a fresh one")]
    KeySpent,
    #[error("the submission was purged")]
    Purged,
    #[error(
        "the retrieve key was issued to another session of the agent; use it from that session or ask for a fresh one"
    )]
    WrongSession,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::UnknownSubmission => "unknown_submission",
            Refusal::WrongSite => "wrong_site",
            Refusal::InvalidKey => "invalid_key",
            Refusal::WrongPurpose => "wrong_purpose",
            Refusal::KeyExpired => "key_expired",
            Refusal::KeySpent => "key_spent",
            Refusal::Purged => "purged",
            Refusal::WrongSession => "wrong_session",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetokenizeError {
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("vault record for {0} is corrupt: {1}")]
    Corrupt(String, String),
    #[error(transparent)]
    Key(KeyError),
}

impl From<Refusal> for DetokenizeError {
    fn from(r: Refusal) -> Self {
        DetokenizeError::Refused(r)
    }
}

#[derive(Debug)]
pub struct Retrieved {
    pub submission_id: uuid::Uuid,
    pub record: VaultRecord,
    pub answers: BTreeMap<String, Secret>,
    pub off_record: OffRecord,
    /// Hash of the key that was spent (for the FormRetrieved audit and durable spending).
    pub spent_key_hash: String,
}

pub struct Detokenizer {
    vault: Store,
    retrieval: Store,
    audit: Option<Arc<crate::audit::AuditLog>>,
    ring: Arc<KeyRing>,
    off_record: Arc<OffRecordStore>,
    /// Keys spent on this node and not yet seen back as FormRetrieved: one use, at once.
    spent_here: DashSet<String>,
}

impl Detokenizer {
    pub fn new(vault: Store, retrieval: Store, ring: Arc<KeyRing>, off_record: Arc<OffRecordStore>) -> Detokenizer {
        Detokenizer { vault, retrieval, audit: None, ring, off_record, spent_here: DashSet::new() }
    }

    /// Keys recorded as spent in this node's audit log count as spent.
    pub fn with_audit(mut self, audit: Arc<crate::audit::AuditLog>) -> Detokenizer {
        self.audit = Some(audit);
        self
    }

    /// Checks the key and, if it is good, spends it and opens the answers (no session binding;
    /// tools and tests).
    pub fn detokenize(
        &self,
        site_id: &str,
        submission_id: uuid::Uuid,
        presented_key: &str,
        now_ms: i64,
    ) -> Result<Retrieved, DetokenizeError> {
        self.detokenize_in_session(site_id, submission_id, presented_key, None, None, now_ms)
    }

    /// As [`Self::detokenize`], for a requester in agent session `session`: a key bound to another
    /// session is refused (`wrong_session`) before it is spent. A fresh key is bound to the session
    /// that asked for it; a FormReady key to `sent_from`, the session the form was sent from (when
    /// the chat bus said, FormSent v3).
    pub fn detokenize_in_session(
        &self,
        site_id: &str,
        submission_id: uuid::Uuid,
        presented_key: &str,
        session: Option<&str>,
        sent_from: Option<&str>,
        now_ms: i64,
    ) -> Result<Retrieved, DetokenizeError> {
        let record = self.existing(&submission_id)?;
        if record.site_id != site_id {
            return Err(Refusal::WrongSite.into());
        }
        let key = OtkSecret::parse(presented_key).ok_or(Refusal::InvalidKey)?;
        let submission = submission_id.to_string();
        let retrieval = RetrievalView::new(self.retrieval.clone());
        let state = retrieval.key_state(&submission_id)?;
        let Some(state) = state.filter(|s| key.verify(&s.key_hash, Purpose::Retrieve, site_id, &submission)) else {
            if let Some(h) = retrieval.submit_key_hash(site_id, &record.form_id)?
                && key.verify(&h, Purpose::Submit, site_id, &record.form_id)
            {
                return Err(Refusal::WrongPurpose.into());
            }
            return Err(Refusal::InvalidKey.into());
        };
        if now_ms >= state.expires_at {
            return Err(Refusal::KeyExpired.into());
        }
        if let (Some(bound), Some(asking)) = (state.session_id.as_deref().or(sent_from), session)
            && bound != asking
        {
            return Err(Refusal::WrongSession.into());
        }
        // The one place that decides whether a key is spent: this node's audit log (spent here,
        // durably), the projection (spent anywhere, FormRetrieved seen), and this node's in-flight set.
        let spent_here_before = self.audit.as_ref().is_some_and(|a| a.is_spent(&state.key_hash));
        if spent_here_before || retrieval.is_spent(&state.key_hash)? || !self.spent_here.insert(state.key_hash.clone())
        {
            return Err(Refusal::KeySpent.into());
        }
        // A key is spent by a retrieval that returns answers: one that cannot open them (a storage
        // or key failure) leaves it usable.
        let answers = match self.open_answers(&record, &submission) {
            Ok(a) => a,
            Err(e) => {
                self.spent_here.remove(&state.key_hash);
                return Err(e);
            }
        };
        let off_record = if record.off_record_field_ids.is_empty() {
            OffRecord::Present(BTreeMap::new())
        } else {
            self.off_record.get(&submission_id, now_ms)
        };
        Ok(Retrieved { submission_id, record, answers, off_record, spent_key_hash: state.key_hash })
    }

    /// Gives back a key a retrieval took but could not complete (its audit record was not written,
    /// so nothing was returned): the agent may try again with it.
    pub fn release(&self, key_hash: &str) {
        self.spent_here.remove(key_hash);
    }

    /// Opens a submission's stored answers without a key, for the manager's history view (the
    /// caller checks the permission). Off-the-record answers are never included.
    pub fn open_for_history(
        &self,
        site_id: &str,
        submission_id: uuid::Uuid,
    ) -> Result<BTreeMap<String, Secret>, DetokenizeError> {
        let record = self.existing(&submission_id)?;
        if record.site_id != site_id {
            return Err(Refusal::WrongSite.into());
        }
        self.open_answers(&record, &submission_id.to_string())
    }

    /// Opens every sealed answer of a record with its data key; a destroyed key means purged.
    fn open_answers(
        &self,
        record: &VaultRecord,
        submission: &str,
    ) -> Result<BTreeMap<String, Secret>, DetokenizeError> {
        let data_key = match self.ring.get(&record.key_id) {
            Ok(k) => k,
            Err(KeyError::Destroyed(_)) => return Err(Refusal::Purged.into()),
            Err(e) => return Err(DetokenizeError::Key(e)),
        };
        let mut answers = BTreeMap::new();
        for (field, ct) in &record.answers {
            // Version 2 binds the conversation and the sender; answers sealed before it open as v1.
            let to = Recipient { conversation: &record.conversation_id, agent: &record.agent_id };
            let bound = answer_ad_bound(&record.site_id, &record.form_id, submission, field, &record.key_id, to);
            let plain = match data_key.material.open(&bound, ct) {
                Ok(p) => p,
                Err(_) => {
                    let v1 = answer_ad(&record.site_id, &record.form_id, submission, field, &record.key_id);
                    data_key.material.open(&v1, ct).map_err(DetokenizeError::Key)?
                }
            };
            let text = String::from_utf8(plain.to_vec())
                .map_err(|_| DetokenizeError::Corrupt(submission.to_string(), "answer is not UTF-8".into()))?;
            answers.insert(field.clone(), Secret::new(text));
        }
        Ok(answers)
    }

    /// Whether `presented` is a retrieve key that was issued for this submission (spent, expired or
    /// current): what a caller must hold to be given a fresh one.
    pub fn was_issued(
        &self,
        site_id: &str,
        submission_id: &uuid::Uuid,
        presented: &str,
    ) -> Result<bool, DetokenizeError> {
        let Some(key) = OtkSecret::parse(presented) else { return Ok(false) };
        let hash = key.hash(Purpose::Retrieve, site_id, &submission_id.to_string());
        Ok(RetrievalView::new(self.retrieval.clone()).was_issued(submission_id, &hash)?)
    }

    /// The session the submission's newest retrieve key is bound to, if any (fresh keys are).
    pub fn key_session(&self, submission_id: &uuid::Uuid) -> Result<Option<String>, DetokenizeError> {
        Ok(RetrievalView::new(self.retrieval.clone()).key_state(submission_id)?.and_then(|s| s.session_id))
    }

    /// How many submissions have a retrieve key in the projection.
    pub fn known_keys(&self) -> usize {
        RetrievalView::new(self.retrieval.clone()).known_keys().unwrap_or(0)
    }

    /// The record, or why there is none: purged (retention or erasure) or never known.
    fn existing(&self, submission_id: &uuid::Uuid) -> Result<VaultRecord, DetokenizeError> {
        if let Some(r) = self.record(submission_id)? {
            return Ok(r);
        }
        if self.vault.tree(trees::PURGED)?.contains_key(submission_key(submission_id)).map_err(StoreError::from)? {
            return Err(Refusal::Purged.into());
        }
        Err(Refusal::UnknownSubmission.into())
    }

    pub fn record(&self, submission_id: &uuid::Uuid) -> Result<Option<VaultRecord>, DetokenizeError> {
        let raw = self.vault.tree(trees::SUBMISSIONS)?.get(submission_key(submission_id)).map_err(StoreError::from)?;
        raw.map(|v| {
            VaultRecord::decode(&v).map_err(|e| DetokenizeError::Corrupt(submission_id.to_string(), e.to_string()))
        })
        .transpose()
    }
}
