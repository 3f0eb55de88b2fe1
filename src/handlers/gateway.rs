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
        match self.store.tree(FORMS_TREE)?.get(form_key(site, form))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt { tree: FORMS_TREE.to_string(), detail: e.to_string() }),
        }
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
