//! The gateway projection: every issued form's key state (open key, opens, submit key, submitted),
//! rebuilt from FormIssued (form-links) and FormOpened / FormSubmitted (submissions), so a visitor
//! mid-form survives a restart of the service.

use crate::domain::visitor::FormState;
use crate::events::Event;
use crate::handlers::issuer::form_key;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;

/// `site \0 form` -> [`FormState`] (JSON).
pub const FORMS_TREE: &str = "gateway.forms";

/// The projection's read side: a form's key state. A store that cannot be read is an error (the
/// gateway answers 503), never "no such form".
#[derive(Clone)]
pub struct GatewayView {
    store: Store,
}

impl GatewayView {
    pub fn new(store: Store) -> GatewayView {
        GatewayView { store }
    }

    /// The key state of a form, if it was issued.
    pub fn form(&self, site: &str, form: &str) -> Result<Option<FormState>, StoreError> {
        self.store.get_json(FORMS_TREE, &form_key(site, form))
    }
}

#[derive(Default)]
pub struct GatewayProjection;

impl Handler for GatewayProjection {
    fn name(&self) -> &'static str {
        "gateway"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::FormLinks, Topic::Submissions]
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        _meta: &RecordMeta,
        _now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::FormIssued(e) => {
                let key = form_key(&e.header.site_id, &e.form_id);
                if tx.get(FORMS_TREE, &key)?.is_none() {
                    tx.insert_json(FORMS_TREE, key, &FormState::issued(e));
                }
            }
            Event::FormOpened(e) => {
                let key = form_key(&e.header.site_id, &e.form_id);
                if let Some(mut s) = tx.get_json::<FormState>(FORMS_TREE, &key)? {
                    s.opened(e);
                    tx.insert_json(FORMS_TREE, key, &s);
                }
            }
            Event::FormSubmitted(e) => {
                let key = form_key(&e.header.site_id, &e.form_id);
                if let Some(mut s) = tx.get_json::<FormState>(FORMS_TREE, &key)? {
                    s.submitted = true;
                    tx.insert_json(FORMS_TREE, key, &s);
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
    use crate::domain::otk::{OtkSecret, Purpose};
    use crate::events::{EventKind, FormIssued, FormOpened};
    use crate::handlers::given::{Given, form_submitted, header};

    fn issued(form: &str, open: &OtkSecret) -> Event {
        Event::FormIssued(FormIssued {
            header: header(EventKind::FormIssued, "acme", "c1", form),
            form_id: form.into(),
            agent_id: "alice".into(),
            template_id: "card-payment".into(),
            template_version: 1,
            link: String::new(),
            open_key_hash: open.hash(Purpose::Open, "acme", form),
            open_expires_at: 5_000,
            reopen_limit: 3,
        })
    }

    fn opened(form: &str, count: i32) -> Event {
        Event::FormOpened(FormOpened {
            header: header(EventKind::FormOpened, "acme", "c1", form),
            form_id: form.into(),
            open_count: count,
            submit_key_hash: format!("submit-{count}"),
            submit_expires_at: 9_000,
        })
    }

    fn submitted(form: &str) -> Event {
        Event::FormSubmitted(form_submitted("c1", form, uuid::Uuid::new_v4(), "alice"))
    }

    #[test]
    fn an_issued_form_is_opened_and_submitted_and_a_second_issue_changes_nothing() {
        let open = OtkSecret::parse(&"o".repeat(22)).unwrap();
        let mut g = Given::new(GatewayProjection).given([issued("f1", &open)]);
        let view = GatewayView::new(g.store.clone());
        let s = view.form("acme", "f1").unwrap().expect("issued");
        assert_eq!((s.open_count, s.submitted, s.conversation_id.as_str()), (0, false, "c1"));

        let other = OtkSecret::parse(&"x".repeat(22)).unwrap();
        assert!(g.when(&issued("f1", &other)).unwrap().is_empty(), "the gateway emits nothing");
        let s = view.form("acme", "f1").unwrap().unwrap();
        assert_eq!(s.open_key_hash, open.hash(Purpose::Open, "acme", "f1"), "the first issue stands");

        g.when(&opened("f1", 1)).unwrap();
        let s = view.form("acme", "f1").unwrap().unwrap();
        assert_eq!((s.open_count, s.submit_key_hash.as_deref()), (1, Some("submit-1")));
        g.when(&submitted("f1")).unwrap();
        assert!(view.form("acme", "f1").unwrap().unwrap().submitted);
    }

    #[test]
    fn events_for_a_form_never_issued_leave_no_state() {
        let mut g = Given::new(GatewayProjection);
        g.when(&opened("ghost", 1)).unwrap();
        g.when(&submitted("ghost")).unwrap();
        assert_eq!(GatewayView::new(g.store.clone()).form("acme", "ghost").unwrap(), None);
    }
}
