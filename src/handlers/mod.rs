//! Event handlers: adapters that put the pure domain decisions on the consumer runtime. One file per
//! handler, named after it.

pub mod directory;
pub mod gateway;
pub mod issuer;
pub mod keys;
pub mod retrieval;
pub mod sessions;
pub mod tokenizer;
pub mod visibility;

/// Given/when/then for handlers on an in-memory store, with no broker: given the events a handler
/// has applied, when one more arrives, then these outputs and this state (read through the
/// handler's own view).
#[cfg(test)]
pub(crate) mod given {
    use crate::events::{Event, EventHeader, EventKind, FormSubmitted};
    use crate::kafka::{ApplyError, Handler, RecordMeta};
    use crate::store::Store;

    pub struct Given<H: Handler> {
        pub handler: H,
        pub store: Store,
        pub now_ms: i64,
        offset: i64,
    }

    impl<H: Handler> Given<H> {
        pub fn new(handler: H) -> Given<H> {
            Given { handler, store: Store::temporary().expect("a temporary store"), now_ms: 1_000_000, offset: 0 }
        }

        /// Applies events as history; each must apply.
        pub fn given(mut self, events: impl IntoIterator<Item = Event>) -> Given<H> {
            for e in events {
                self.when(&e).unwrap_or_else(|err| panic!("given {}: {err}", e.kind().name()));
            }
            self
        }

        /// Applies one event and commits its writes, as the runtime does for a batch of one.
        pub fn when(&mut self, event: &Event) -> Result<Vec<Event>, ApplyError> {
            let meta = RecordMeta { topic: event.kind().topic(), partition: 0, offset: self.offset, replay: false };
            self.offset += 1;
            let mut tx = self.store.begin();
            let out = self.handler.apply(&mut tx, event, &meta, self.now_ms)?;
            futures::executor::block_on(self.store.commit(tx)).expect("commit");
            Ok(out)
        }
    }

    pub fn header(kind: EventKind, site: &str, conversation: &str, correlation: &str) -> EventHeader {
        EventHeader::new(kind, uuid::Uuid::new_v4(), 1_000, site, conversation, correlation)
    }

    /// A FormSubmitted of site acme with no answers (a test sets the fields it needs).
    pub fn form_submitted(conversation: &str, form: &str, id: uuid::Uuid, agent: &str) -> FormSubmitted {
        FormSubmitted {
            header: header(EventKind::FormSubmitted, "acme", conversation, form),
            form_id: form.into(),
            submission_id: id.to_string(),
            agent_id: agent.into(),
            template_id: "card-payment".into(),
            template_version: 1,
            key_id: "acme.2026-11.g1".into(),
            answers: vec![],
            off_record_field_ids: vec![],
            off_record_node: String::new(),
        }
    }
}
