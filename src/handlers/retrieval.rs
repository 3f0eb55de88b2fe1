//! The retrieval projection: which retrieve key is valid for which submission, which keys were
//! spent, and each form's submit key (to name the misuse when one is used to retrieve). Fed by
//! FormReady and FormRetrieved (agent-events) and FormOpened (submissions).

use serde::{Deserialize, Serialize};

use crate::domain::otk::{OtkSecret, Purpose};
use crate::events::Event;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;
use crate::vault::record::submission_key;

/// The retrieve key state the retrieval projection keeps per submission (from FormReady).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrieveKeyState {
    pub key_hash: String,
    pub expires_at: i64,
    pub agent_id: String,
    pub form_id: String,
    pub site_id: String,
    pub conversation_id: String,
    /// The agent session the key is bound to, if any (fresh keys).
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Trees of the retrieval projection (`<data_dir>/state/retrieval`).
pub mod trees {
    /// submission UUID (16 bytes) -> [`super::RetrieveKeyState`] (JSON).
    pub const KEYS: &str = "retrieval.keys";
    /// retrieve key hash -> empty: keys already used (from FormRetrieved granted).
    pub const SPENT: &str = "retrieval.spent";
    /// `site \0 form` -> submit key hash (from FormOpened): to tell a submit key used to retrieve.
    pub const SUBMIT_KEYS: &str = "retrieval.submit_keys";
    /// `submission UUID (16 bytes) key hash` -> empty: every retrieve key issued for a submission, so
    /// a fresh key is given only to a caller who holds one of them (not to a token alone).
    pub const ISSUED: &str = "retrieval.issued";
}

/// The projection's read side. Errors are errors: an unreadable store is never "no key".
#[derive(Clone)]
pub struct RetrievalView {
    store: Store,
}

impl RetrievalView {
    pub fn new(store: Store) -> RetrievalView {
        RetrievalView { store }
    }

    /// The retrieve key in force for a submission.
    pub fn key_state(&self, submission: &uuid::Uuid) -> Result<Option<RetrieveKeyState>, StoreError> {
        self.store.get_json(trees::KEYS, &submission_key(submission))
    }

    /// Whether a granted retrieval used the key with this hash (FormRetrieved seen).
    pub fn is_spent(&self, key_hash: &str) -> Result<bool, StoreError> {
        Ok(self.store.tree(trees::SPENT)?.contains_key(key_hash.as_bytes())?)
    }

    /// The hash of a form's submit key, to name a submit key used to retrieve.
    pub fn submit_key_hash(&self, site: &str, form: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .tree(trees::SUBMIT_KEYS)?
            .get(crate::handlers::issuer::form_key(site, form))?
            .map(|h| String::from_utf8_lossy(&h).into_owned()))
    }

    /// Whether a retrieve key with this hash was ever issued for the submission.
    pub fn was_issued(&self, submission: &uuid::Uuid, key_hash: &str) -> Result<bool, StoreError> {
        let mut k = submission_key(submission).to_vec();
        k.extend_from_slice(key_hash.as_bytes());
        Ok(self.store.tree(trees::ISSUED)?.contains_key(k)?)
    }

    /// How many submissions have a retrieve key.
    pub fn known_keys(&self) -> Result<usize, StoreError> {
        Ok(self.store.tree(trees::KEYS)?.len())
    }
}

#[derive(Default)]
pub struct RetrievalProjection;

impl Handler for RetrievalProjection {
    fn name(&self) -> &'static str {
        "retrieval"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::AgentEvents, Topic::Submissions]
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        _meta: &RecordMeta,
        _now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::FormReady(r) => {
                let id = uuid::Uuid::parse_str(&r.submission_id)
                    .map_err(|_| ApplyError::Unprocessable("FormReady.submission_id is not a UUID".into()))?;
                let key = OtkSecret::parse(&r.retrieve_key)
                    .ok_or_else(|| ApplyError::Unprocessable("FormReady.retrieve_key is not a key".into()))?;
                let state = RetrieveKeyState {
                    key_hash: key.hash(Purpose::Retrieve, &r.header.site_id, &r.submission_id),
                    expires_at: r.retrieve_expires_at,
                    agent_id: r.agent_id.clone(),
                    form_id: r.form_id.clone(),
                    site_id: r.header.site_id.clone(),
                    conversation_id: r.header.conversation_id.clone(),
                    session_id: r.session_id.clone(),
                };
                let mut issued = submission_key(&id).to_vec();
                issued.extend_from_slice(state.key_hash.as_bytes());
                tx.insert(trees::ISSUED, issued, Vec::new());
                tx.insert_json(trees::KEYS, submission_key(&id).to_vec(), &state);
                Ok(vec![])
            }
            Event::FormRetrieved(r) if r.outcome == "granted" => {
                if let Ok(id) = uuid::Uuid::parse_str(&r.submission_id)
                    && let Some(state) = tx.get_json::<RetrieveKeyState>(trees::KEYS, &submission_key(&id))?
                {
                    tx.insert(trees::SPENT, state.key_hash.into_bytes(), Vec::new());
                }
                Ok(vec![])
            }
            Event::FormOpened(o) => {
                let k = crate::handlers::issuer::form_key(&o.header.site_id, &o.form_id);
                tx.insert(trees::SUBMIT_KEYS, k, o.submit_key_hash.as_bytes().to_vec());
                Ok(vec![])
            }
            _ => Ok(vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, FormReady, FormRetrieved};
    use crate::handlers::given::{Given, header};

    fn ready(id: uuid::Uuid, key: &OtkSecret, session: Option<&str>) -> Event {
        Event::FormReady(FormReady {
            header: header(EventKind::FormReady, "acme", "c1", "f1"),
            form_id: "f1".into(),
            submission_id: id.to_string(),
            agent_id: "alice".into(),
            retrieve_key: key.expose().into(),
            retrieve_expires_at: 60_000,
            off_record_field_ids: vec![],
            session_id: session.map(str::to_string),
        })
    }

    fn retrieved(id: uuid::Uuid, outcome: &str) -> Event {
        Event::FormRetrieved(FormRetrieved {
            header: header(EventKind::FormRetrieved, "acme", "c1", "f1"),
            form_id: "f1".into(),
            submission_id: id.to_string(),
            agent_id: "alice".into(),
            session_id: Some("s-1".into()),
            outcome: outcome.into(),
            reason: String::new(),
            chain: None,
        })
    }

    fn spent(g: &Given<RetrievalProjection>, key: &OtkSecret, id: uuid::Uuid) -> bool {
        let hash = key.hash(Purpose::Retrieve, "acme", &id.to_string());
        g.store.tree(trees::SPENT).unwrap().contains_key(hash.as_bytes()).unwrap()
    }

    #[test]
    fn a_granted_retrieval_spends_the_current_key_and_every_issued_key_is_remembered() {
        let id = uuid::Uuid::new_v4();
        let first = OtkSecret::parse(&"a".repeat(22)).unwrap();
        let fresh = OtkSecret::parse(&"b".repeat(22)).unwrap();
        let mut g = Given::new(RetrievalProjection).given([ready(id, &first, None)]);
        g.when(&retrieved(id, "denied")).unwrap();
        assert!(!spent(&g, &first, id), "a denied attempt spends nothing");
        g.when(&retrieved(id, "granted")).unwrap();
        assert!(spent(&g, &first, id));
        g.when(&ready(id, &fresh, Some("s-2"))).unwrap();
        assert!(!spent(&g, &fresh, id), "the fresh key is new");
        let issued = g.store.tree(trees::ISSUED).unwrap();
        assert_eq!(issued.len(), 2, "both keys were issued for the submission");
        let state: RetrieveKeyState =
            serde_json::from_slice(&g.store.tree(trees::KEYS).unwrap().get(submission_key(&id)).unwrap().unwrap())
                .unwrap();
        assert_eq!(state.session_id.as_deref(), Some("s-2"), "the newest key is the one in force");
    }

    #[test]
    fn a_form_ready_that_is_not_well_formed_is_unprocessable() {
        let mut bad = ready(uuid::Uuid::new_v4(), &OtkSecret::parse(&"a".repeat(22)).unwrap(), None);
        if let Event::FormReady(r) = &mut bad {
            r.retrieve_key = "short".into();
        }
        let mut g = Given::new(RetrievalProjection);
        assert!(matches!(g.when(&bad), Err(ApplyError::Unprocessable(_))));
    }
}
