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

/// Whatever the chat bus sends, in whatever order, the handlers that read it answer or refuse it
/// (a dead letter), never fail the batch or panic: a record that did would stop its consumer, or
/// make a node crash on it at every start.
#[cfg(test)]
mod chat_bus_fuzz {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::given::{Given, header};
    use crate::events::{
        AgentSessionEnded, Codec, ConversationClosed, ConversationTransferred, Event, EventKind, FormSent,
    };
    use crate::kafka::ApplyError;

    /// Values that mean something to the handlers, and values that mean nothing.
    fn text() -> BoxedStrategy<String> {
        prop_oneof![
            3 => prop::sample::select(vec!["", "acme", "weakco", "c1", "c2", "f1", "f2", "alice", "bob", "agent", "manager", "card-payment", "s-1", "transfer", "reassign"]).prop_map(str::to_string),
            1 => "[a-z0-9/?&#%\\\\. \\x00\\n\u{e9}\u{1F600}-]{0,40}",
        ]
        .boxed()
    }

    /// Mostly `value` (so the paths past the first checks run), sometimes anything.
    fn likely(value: &'static str) -> BoxedStrategy<String> {
        prop_oneof![3 => Just(value.to_string()), 1 => text()].boxed()
    }

    fn head() -> (BoxedStrategy<String>, BoxedStrategy<String>, BoxedStrategy<String>) {
        (text(), text(), text())
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (
                (likely("acme"), text(), text()),
                text(),
                text(),
                likely("agent"),
                likely("card-payment"),
                proptest::option::of(text()),
                proptest::option::of(text()),
            )
                .prop_map(|((site, conv, corr), form, agent, profile, template, visitor, session)| Event::FormSent(FormSent {
                    header: header(EventKind::FormSent, &site, &conv, &corr),
                    form_id: form,
                    agent_id: agent,
                    agent_profile: profile,
                    template_id: template,
                    visitor_ref: visitor,
                    agent_session_id: session,
                })),
            1 => (head(), text(), text(), text()).prop_map(|((site, conv, corr), from, to, kind)| {
                Event::ConversationTransferred(ConversationTransferred {
                    header: header(EventKind::ConversationTransferred, &site, &conv, &corr),
                    from_agent_id: from,
                    to_agent_id: to,
                    kind,
                })
            }),
            1 => (head(), text(), text()).prop_map(|((site, conv, corr), by, reason)| {
                Event::ConversationClosed(ConversationClosed {
                    header: header(EventKind::ConversationClosed, &site, &conv, &corr),
                    closed_by: by,
                    reason,
                })
            }),
            1 => (head(), text(), text(), text()).prop_map(|((site, conv, corr), agent, session, reason)| {
                Event::AgentSessionEnded(AgentSessionEnded {
                    header: header(EventKind::AgentSessionEnded, &site, &conv, &corr),
                    agent_id: agent,
                    session_id: session,
                    reason,
                })
            }),
        ]
    }

    fn issuer() -> super::issuer::Issuer {
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
        let settings = crate::config::Settings::load(Some(&example), &serde_json::json!({})).unwrap();
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        let keys = crate::crypto::KeyDeriver::new(&crate::crypto::IntegrityKey::from_master(&master));
        super::issuer::Issuer::new(Arc::new(settings.sites), "https://forms.example".into(), Arc::new(keys))
    }

    fn answered_or_refused<H: crate::kafka::Handler>(g: &mut Given<H>, e: &Event) -> Result<(), TestCaseError> {
        match g.when(e) {
            Ok(outputs) => {
                for o in &outputs {
                    prop_assert!(Codec::get().encode(o).is_ok(), "an output that cannot be encoded: {o:?}");
                }
                Ok(())
            }
            Err(ApplyError::Unprocessable(reason)) => {
                prop_assert!(!reason.is_empty());
                Ok(())
            }
            Err(ApplyError::Store(e)) => Err(TestCaseError::fail(format!("a store error failed the batch: {e}"))),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn the_chat_bus_cannot_make_a_handler_fail_its_batch(events in proptest::collection::vec(event(), 1..25)) {
            let mut issuer = Given::new(issuer());
            let mut visibility = Given::new(super::visibility::VisibilityProjection);
            let mut sessions = Given::new(super::sessions::SessionsProjection);
            for e in &events {
                answered_or_refused(&mut issuer, e)?;
                answered_or_refused(&mut visibility, e)?;
                answered_or_refused(&mut sessions, e)?;
            }
        }
    }
}
