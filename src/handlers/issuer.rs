//! The issuer: consumes the chat bus's events and answers each FormSent with FormIssued or
//! FormRejected (step 1 of the flow).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::SiteConfig;
use crate::domain::issue::{IssueInput, decide};
use crate::events::Event;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::Tx;
use crate::topics::Topic;

/// `site \0 form` -> what the issuer decided, so a FormSent the chat bus sends twice is answered once.
pub const FORMS_TREE: &str = "issuer.forms";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedForm {
    pub conversation_id: String,
    pub agent_id: String,
    pub outcome_event_id: String,
    pub issued: bool,
}

pub struct Issuer {
    sites: Arc<BTreeMap<String, SiteConfig>>,
    public_url: String,
    keys: Arc<crate::crypto::KeyDeriver>,
}

impl Issuer {
    /// `keys` derives each link's open key from its FormSent, so applying a FormSent again (on the
    /// node that takes over its partition) gives the same link.
    pub fn new(
        sites: Arc<BTreeMap<String, SiteConfig>>,
        public_url: String,
        keys: Arc<crate::crypto::KeyDeriver>,
    ) -> Issuer {
        Issuer { sites, public_url, keys }
    }
}

pub fn form_key(site: &str, form: &str) -> Vec<u8> {
    let mut k = site.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(form.as_bytes());
    k
}

impl Handler for Issuer {
    fn name(&self) -> &'static str {
        "issuer"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::ChatEvents]
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        meta: &RecordMeta,
        now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::FormSent(sent) => {
                let key = form_key(&sent.header.site_id, &sent.form_id);
                if let Some(prev) = tx.get_json::<IssuedForm>(FORMS_TREE, &key)? {
                    tracing::info!(form_id = %sent.form_id, previous = %prev.outcome_event_id, "form already answered; duplicate FormSent ignored");
                    return Ok(vec![]);
                }
                if sent.form_id.is_empty() || sent.header.conversation_id.is_empty() {
                    return Err(ApplyError::Unprocessable("FormSent needs a form_id and a conversation_id".into()));
                }
                let open_key = self.keys.otk(crate::domain::otk::Purpose::Open, &sent.header.event_id, meta.partition);
                let outcome = decide(
                    &self.sites,
                    &IssueInput { sent, now_ms, open_key: &open_key, public_url: &self.public_url },
                );
                let issued = matches!(outcome, Event::FormIssued(_));
                match &outcome {
                    Event::FormRejected(r) => {
                        tracing::debug!(form_id = %sent.form_id, site_id = %sent.header.site_id, reason = %r.reason, "form rejected")
                    }
                    _ => tracing::debug!(form_id = %sent.form_id, site_id = %sent.header.site_id, "form issued"),
                }
                tx.insert_json(
                    FORMS_TREE,
                    key,
                    &IssuedForm {
                        conversation_id: sent.header.conversation_id.clone(),
                        agent_id: sent.agent_id.clone(),
                        outcome_event_id: outcome.header().event_id.clone(),
                        issued,
                    },
                );
                Ok(vec![outcome])
            }
            Event::ConversationTransferred(_) | Event::ConversationClosed(_) | Event::AgentSessionEnded(_) => {
                Ok(vec![])
            }
            other if other.kind().topic() != meta.topic => Err(ApplyError::Unprocessable(format!(
                "{} does not belong on {}; it is produced to {}",
                other.kind().name(),
                meta.topic.suffix(),
                other.kind().topic().suffix()
            ))),
            _ => Ok(vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, FormSent};
    use crate::handlers::given::{Given, header};

    fn issuer() -> Issuer {
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
        let settings = crate::config::Settings::load(Some(&example), &serde_json::json!({})).unwrap();
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        let keys = crate::crypto::KeyDeriver::new(&crate::crypto::IntegrityKey::from_master(&master));
        Issuer::new(Arc::new(settings.sites), "https://forms.example".into(), Arc::new(keys))
    }

    fn sent(site: &str, form: &str, template: &str) -> Event {
        Event::FormSent(FormSent {
            header: header(EventKind::FormSent, site, "c1", form),
            form_id: form.into(),
            agent_id: "alice".into(),
            agent_profile: "agent".into(),
            template_id: template.into(),
            visitor_ref: None,
            agent_session_id: None,
        })
    }

    #[test]
    fn a_form_sent_is_answered_once_issued_or_rejected_with_the_reason() {
        let mut g = Given::new(issuer());
        let out = g.when(&sent("acme", "f1", "card-payment")).unwrap();
        let [Event::FormIssued(issued)] = out.as_slice() else { panic!("one FormIssued, got {out:?}") };
        assert!(issued.link.starts_with("https://forms.example/f/acme/f1?k="), "{}", issued.link);
        assert!(!issued.link.contains(&issued.open_key_hash), "the link carries the key, the event its hash");
        assert!(g.when(&sent("acme", "f1", "card-payment")).unwrap().is_empty(), "a duplicate is answered once");

        let out = g.when(&sent("acme", "f2", "no-such-template")).unwrap();
        assert!(matches!(out.as_slice(), [Event::FormRejected(r)] if !r.reason.is_empty()), "{out:?}");
        let out = g.when(&sent("nowhere", "f3", "card-payment")).unwrap();
        assert!(matches!(out.as_slice(), [Event::FormRejected(_)]), "{out:?}");
        assert!(matches!(g.when(&sent("acme", "", "card-payment")), Err(ApplyError::Unprocessable(_))));
    }
}
