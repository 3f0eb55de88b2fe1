//! The retrieval projection: which retrieve key is valid for which submission, which keys were
//! spent, and each form's submit key (to name the misuse when one is used to retrieve). Fed by
//! FormReady and FormRetrieved (agent-events) and FormOpened (submissions).

use crate::domain::otk::{OtkSecret, Purpose};
use crate::events::Event;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::Tx;
use crate::topics::Topic;
use crate::vault::detokenize::{RetrieveKeyState, retrieval_trees as trees};
use crate::vault::record::submission_key;

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
                let mut k = o.header.site_id.as_bytes().to_vec();
                k.push(0);
                k.extend_from_slice(o.form_id.as_bytes());
                tx.insert(trees::SUBMIT_KEYS, k, o.submit_key_hash.as_bytes().to_vec());
                Ok(vec![])
            }
            _ => Ok(vec![]),
        }
    }
}
