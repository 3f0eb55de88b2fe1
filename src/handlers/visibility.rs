//! The visibility projection: who sent each form and in which conversation, which conversations are
//! live (and who holds them after transfers), and which submissions belong to each conversation.
//! (Ended agent sessions are the sessions projection's: every node needs them whole.) Fed by the chat bus's events and FormSubmitted.

use crate::events::Event;
use crate::handlers::issuer::form_key;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;

pub mod trees {
    /// `site \0 conversation` -> [`super::Conversation`].
    pub const CONVERSATIONS: &str = "vis.conversations";
    /// submission UUID (16 bytes) -> [`super::SubmissionOwner`].
    pub const SUBMISSIONS: &str = "vis.submissions";
    /// `site \0 conversation \0 submission` -> empty: a conversation's submissions, for history.
    pub const BY_CONVERSATION: &str = "vis.by_conversation";
    /// `site \0 visitor_ref \0 conversation` -> empty: a visitor's conversations (FormSent v2), for
    /// erasure on request.
    pub const VISITOR_REFS: &str = "vis.visitor_refs";
    /// submission UUID -> empty: purged submissions, so a FormSubmitted applied after its receipt
    /// (receipts and submissions sit on different partitions) does not bring it back.
    pub const PURGED: &str = "vis.purged";
    /// `site \0 form` -> the agent session the form was sent from (FormSent v3), first write wins.
    pub const FORM_SESSIONS: &str = "vis.form_sessions";
}

/// `site \0 visitor_ref \0`: a visitor's range in [`trees::VISITOR_REFS`].
pub fn visitor_prefix(site: &str, visitor_ref: &str) -> Vec<u8> {
    let mut k = form_key(site, visitor_ref);
    k.push(0);
    k
}

pub use crate::domain::access::{Conversation, SubmissionOwner};

pub fn conversation_key(site: &str, conversation: &str) -> Vec<u8> {
    form_key(site, conversation)
}

/// The projection's read side: typed answers from its trees. A store that cannot be read is an
/// error (the caller answers 503), never "unknown" or "not ended".
#[derive(Clone)]
pub struct VisibilityView {
    store: Store,
}

impl VisibilityView {
    pub fn new(store: Store) -> VisibilityView {
        VisibilityView { store }
    }

    /// Who sent a submission, in which conversation.
    pub fn owner(&self, submission: &uuid::Uuid) -> Result<Option<SubmissionOwner>, StoreError> {
        self.store.get_json(trees::SUBMISSIONS, submission.as_bytes())
    }

    /// A conversation's state (live, current agent).
    pub fn conversation(&self, site: &str, conversation: &str) -> Result<Option<Conversation>, StoreError> {
        self.store.get_json(trees::CONVERSATIONS, &conversation_key(site, conversation))
    }

    /// Whether the projection knows a conversation.
    pub fn knows_conversation(&self, site: &str, conversation: &str) -> Result<bool, StoreError> {
        Ok(self.store.tree(trees::CONVERSATIONS)?.contains_key(conversation_key(site, conversation))?)
    }

    /// The conversations the chat bus tagged with a visitor reference (FormSent v2), for erasure.
    pub fn visitor_conversations(&self, site: &str, visitor_ref: &str) -> Result<Vec<String>, StoreError> {
        let prefix = visitor_prefix(site, visitor_ref);
        let mut out = Vec::new();
        for row in self.store.tree(trees::VISITOR_REFS)?.scan_prefix(&prefix) {
            let (k, _) = row?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).to_string());
        }
        Ok(out)
    }

    /// A conversation's submissions (for history), in key order.
    pub fn submissions_in(&self, site: &str, conversation: &str) -> Result<Vec<uuid::Uuid>, StoreError> {
        let mut prefix = conversation_key(site, conversation);
        prefix.push(0);
        let mut out = Vec::new();
        for row in self.store.tree(trees::BY_CONVERSATION)?.scan_prefix(&prefix) {
            let (k, _) = row?;
            if let Ok(id) = uuid::Uuid::from_slice(&k[prefix.len()..]) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The agent session a form was sent from, when the chat bus said (FormSent v3).
    pub fn sent_from_session(&self, site: &str, form: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .tree(trees::FORM_SESSIONS)?
            .get(form_key(site, form))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

#[derive(Default)]
pub struct VisibilityProjection;

impl Handler for VisibilityProjection {
    fn name(&self) -> &'static str {
        "visibility"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::ChatEvents, Topic::Submissions]
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        _meta: &RecordMeta,
        _now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        let h = event.header();
        let ckey = conversation_key(&h.site_id, &h.conversation_id);
        match event {
            Event::FormSent(e) => {
                let mut c = tx
                    .get_json::<Conversation>(trees::CONVERSATIONS, &ckey)?
                    .unwrap_or(Conversation { live: true, current_agent: None });
                if c.current_agent.is_none() {
                    c.current_agent = Some(e.agent_id.clone());
                }
                tx.insert_json(trees::CONVERSATIONS, ckey, &c);
                if let Some(session) = e.agent_session_id.as_deref().filter(|s| !s.is_empty()) {
                    let k = form_key(&h.site_id, &e.form_id);
                    // First write wins: a later FormSent cannot move the form to another session.
                    if tx.get(trees::FORM_SESSIONS, &k)?.is_none() {
                        tx.insert(trees::FORM_SESSIONS, k, session.as_bytes().to_vec());
                    }
                }
                if let Some(visitor) = e.visitor_ref.as_deref().filter(|v| !v.is_empty()) {
                    let mut k = visitor_prefix(&h.site_id, visitor);
                    k.extend_from_slice(h.conversation_id.as_bytes());
                    tx.insert(trees::VISITOR_REFS, k, Vec::new());
                }
            }
            Event::ConversationTransferred(e) => {
                let mut c = tx
                    .get_json::<Conversation>(trees::CONVERSATIONS, &ckey)?
                    .unwrap_or(Conversation { live: true, current_agent: None });
                c.current_agent = Some(e.to_agent_id.clone());
                tx.insert_json(trees::CONVERSATIONS, ckey, &c);
            }
            Event::ConversationClosed(_) => {
                let mut c = tx
                    .get_json::<Conversation>(trees::CONVERSATIONS, &ckey)?
                    .unwrap_or(Conversation { live: false, current_agent: None });
                c.live = false;
                tx.insert_json(trees::CONVERSATIONS, ckey, &c);
            }
            Event::FormSubmitted(s) => {
                let Ok(id) = uuid::Uuid::parse_str(&s.submission_id) else { return Ok(vec![]) };
                if tx.get(trees::PURGED, id.as_bytes())?.is_some() {
                    return Ok(vec![]);
                }
                // First write wins: who sent a submission is never changed by a later event.
                if tx.get(trees::SUBMISSIONS, id.as_bytes())?.is_some() {
                    tracing::debug!(submission_id = %id, "owner already recorded; a later FormSubmitted changes nothing");
                    return Ok(vec![]);
                }
                let owner = SubmissionOwner {
                    site_id: h.site_id.clone(),
                    conversation_id: h.conversation_id.clone(),
                    form_id: s.form_id.clone(),
                    sender: s.agent_id.clone(),
                    submitted_at: h.occurred_at,
                    template_id: s.template_id.clone(),
                };
                tx.insert_json(trees::SUBMISSIONS, id.as_bytes().to_vec(), &owner);
                let mut k = ckey;
                k.push(0);
                k.extend_from_slice(id.as_bytes());
                tx.insert(trees::BY_CONVERSATION, k, Vec::new());
            }
            Event::SubmissionPurged(p) => {
                // Who sent what stays out of reach once the answers are gone.
                for raw in &p.submission_ids {
                    let Ok(id) = uuid::Uuid::parse_str(raw) else { continue };
                    if let Some(owner) = tx.get_json::<SubmissionOwner>(trees::SUBMISSIONS, id.as_bytes())? {
                        tx.remove(trees::FORM_SESSIONS, form_key(&owner.site_id, &owner.form_id));
                        let mut k = conversation_key(&owner.site_id, &owner.conversation_id);
                        k.push(0);
                        k.extend_from_slice(id.as_bytes());
                        tx.remove(trees::BY_CONVERSATION, k);
                    }
                    tx.remove(trees::SUBMISSIONS, id.as_bytes().to_vec());
                    tx.insert(trees::PURGED, id.as_bytes().to_vec(), Vec::new());
                }
                if p.reason == "erasure" && !h.conversation_id.is_empty() {
                    let mut prefix = ckey;
                    prefix.push(0);
                    for k in tx.scan_prefix_keys(trees::BY_CONVERSATION, &prefix)? {
                        tx.remove(trees::SUBMISSIONS, k[prefix.len()..].to_vec());
                        tx.insert(trees::PURGED, k[prefix.len()..].to_vec(), Vec::new());
                        tx.remove(trees::BY_CONVERSATION, k);
                    }
                }
            }
            _ => {}
        }
        Ok(vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ConversationClosed, ConversationTransferred, EventKind, FormSent, SubmissionPurged};
    use crate::handlers::given::{Given, form_submitted, header};

    fn sent(conv: &str, form: &str, agent: &str, session: Option<&str>) -> Event {
        Event::FormSent(FormSent {
            header: header(EventKind::FormSent, "acme", conv, form),
            form_id: form.into(),
            agent_id: agent.into(),
            agent_profile: "agent".into(),
            template_id: "card-payment".into(),
            visitor_ref: None,
            agent_session_id: session.map(str::to_string),
        })
    }

    fn submitted(conv: &str, form: &str, id: uuid::Uuid, agent: &str) -> Event {
        Event::FormSubmitted(form_submitted(conv, form, id, agent))
    }

    #[test]
    fn the_first_sender_and_the_first_session_stand() {
        let id = uuid::Uuid::new_v4();
        let mut g = Given::new(VisibilityProjection)
            .given([sent("c1", "f1", "alice", Some("s-desk")), submitted("c1", "f1", id, "alice")]);
        let view = VisibilityView::new(g.store.clone());
        g.when(&sent("c1", "f1", "mallory", Some("s-evil"))).unwrap();
        g.when(&submitted("c1", "f1", id, "mallory")).unwrap();
        assert_eq!(view.owner(&id).unwrap().unwrap().sender, "alice");
        assert_eq!(view.sent_from_session("acme", "f1").unwrap().as_deref(), Some("s-desk"));
        assert_eq!(view.conversation("acme", "c1").unwrap().unwrap().current_agent.as_deref(), Some("alice"));
    }

    #[test]
    fn transfers_and_close_are_what_the_view_answers() {
        let mut g = Given::new(VisibilityProjection).given([sent("c1", "f1", "alice", None)]);
        let view = VisibilityView::new(g.store.clone());
        g.when(&Event::ConversationTransferred(ConversationTransferred {
            header: header(EventKind::ConversationTransferred, "acme", "c1", "c1"),
            from_agent_id: "alice".into(),
            to_agent_id: "bob".into(),
            kind: "transfer".into(),
        }))
        .unwrap();
        let c = view.conversation("acme", "c1").unwrap().unwrap();
        assert_eq!((c.live, c.current_agent.as_deref()), (true, Some("bob")));
        g.when(&Event::ConversationClosed(ConversationClosed {
            header: header(EventKind::ConversationClosed, "acme", "c1", "c1"),
            closed_by: "visitor".into(),
            reason: "done".into(),
        }))
        .unwrap();
        assert!(!view.conversation("acme", "c1").unwrap().unwrap().live);
    }

    #[test]
    fn a_purged_submission_stays_gone_even_when_its_form_submitted_comes_later() {
        let id = uuid::Uuid::new_v4();
        let purge = Event::SubmissionPurged(SubmissionPurged {
            header: header(EventKind::SubmissionPurged, "acme", "c1", "purge"),
            submission_ids: vec![id.to_string()],
            reason: "retention".into(),
            destroyed_key_ids: vec![],
            as_of: 0,
            count: 1,
        });
        let mut g = Given::new(VisibilityProjection).given([sent("c1", "f1", "alice", Some("s-1"))]);
        g.when(&purge).unwrap();
        g.when(&submitted("c1", "f1", id, "alice")).unwrap();
        assert_eq!(VisibilityView::new(g.store.clone()).owner(&id).unwrap(), None);
    }
}
