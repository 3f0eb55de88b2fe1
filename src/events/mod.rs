//! The event contract: every event type, its Avro schema (from `schemas/`), the topic it lives on, and
//! the single-object codec that frames it on the wire.
//!
//! Adding an event: write `schemas/<name>.avsc`, add its struct to `types.rs`, add one line to the
//! `events!` table below. Evolving one: copy the old schema to `schemas/history/<name>.vN.avsc`, list
//! it in `HISTORY`, and make only compatible changes (new fields with defaults).

pub mod codec;
pub mod pcf;
mod types;

pub use codec::{Codec, CodecError};
pub use types::*;

use crate::topics::Topic;

macro_rules! events {
    ($( $variant:ident => $file:literal, v $version:literal, $topic:ident; )*) => {
        /// Every event the system produces or consumes.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event { $( $variant($variant), )* }

        /// The type of an event, without its data.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind { $( $variant, )* }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[ $( EventKind::$variant, )* ];

            /// The Avro record name (also the `event_type` header value).
            pub fn name(self) -> &'static str {
                match self { $( EventKind::$variant => stringify!($variant), )* }
            }

            /// The current schema version.
            pub fn version(self) -> i32 {
                match self { $( EventKind::$variant => $version, )* }
            }

            /// The current schema text, embedded at build time from `schemas/`.
            pub fn schema_source(self) -> &'static str {
                match self { $( EventKind::$variant => include_str!(concat!("../../schemas/", $file)), )* }
            }

            /// The schema file name under `schemas/`.
            pub fn schema_file(self) -> &'static str {
                match self { $( EventKind::$variant => $file, )* }
            }

            /// The topic events of this kind are produced to.
            pub fn topic(self) -> Topic {
                match self { $( EventKind::$variant => Topic::$topic, )* }
            }

        }

        impl Event {
            pub fn kind(&self) -> EventKind {
                match self { $( Event::$variant(_) => EventKind::$variant, )* }
            }

            pub fn header(&self) -> &EventHeader {
                match self { $( Event::$variant(e) => &e.header, )* }
            }

            /// The Avro body of this event, written straight from its fields by a writer of its
            /// kind's schema (no intermediate `Value`, no resolution pass).
            pub(crate) fn write_avro(
                &self,
                writer: &apache_avro::writer::datum::GenericDatumWriter<'_>,
            ) -> Result<Vec<u8>, apache_avro::Error> {
                match self { $( Event::$variant(e) => writer.write_ser_to_vec(e), )* }
            }

            /// The event as an Avro `Value` (the codec's tests compare this path with `write_avro`).
            #[cfg(test)]
            pub(crate) fn to_avro_value(&self) -> Result<apache_avro::types::Value, apache_avro::Error> {
                match self { $( Event::$variant(e) => apache_avro::to_value(e), )* }
            }

            pub(crate) fn from_avro_value(kind: EventKind, value: &apache_avro::types::Value) -> Result<Event, apache_avro::Error> {
                match kind { $( EventKind::$variant => Ok(Event::$variant(apache_avro::from_value(value)?)), )* }
            }
        }

        $( impl From<$variant> for Event { fn from(e: $variant) -> Event { Event::$variant(e) } } )*
    };
}

events! {
    FormSent => "form_sent.avsc", v 3, ChatEvents;
    ConversationTransferred => "conversation_transferred.avsc", v 1, ChatEvents;
    ConversationClosed => "conversation_closed.avsc", v 1, ChatEvents;
    AgentSessionEnded => "agent_session_ended.avsc", v 1, ChatEvents;
    FormIssued => "form_issued.avsc", v 1, FormLinks;
    FormRejected => "form_rejected.avsc", v 1, FormLinks;
    FormOpened => "form_opened.avsc", v 1, Submissions;
    KeyRefused => "key_refused.avsc", v 1, Submissions;
    FormSubmitted => "form_submitted.avsc", v 1, Submissions;
    SubmissionPurged => "submission_purged.avsc", v 1, Submissions;
    FormReady => "form_ready.avsc", v 2, AgentEvents;
    FormRetrieved => "form_retrieved.avsc", v 2, AgentEvents;
    FormTemplateDefined => "form_template_defined.avsc", v 1, Templates;
    DataKeyCreated => "data_key_created.avsc", v 1, Keys;
    DataKeyDestroyed => "data_key_destroyed.avsc", v 1, Keys;
    NodeAnnounced => "node_announced.avsc", v 1, Nodes;
    DeadLetter => "dead_letter.avsc", v 2, DeadLetters;
}

/// Older schema versions still readable: data written with them decodes into today's types.
pub const HISTORY: &[(EventKind, i32, &str, &str)] = &[
    (EventKind::FormSent, 1, "history/form_sent.v1.avsc", include_str!("../../schemas/history/form_sent.v1.avsc")),
    (EventKind::FormSent, 2, "history/form_sent.v2.avsc", include_str!("../../schemas/history/form_sent.v2.avsc")),
    (
        EventKind::DeadLetter,
        1,
        "history/dead_letter.v1.avsc",
        include_str!("../../schemas/history/dead_letter.v1.avsc"),
    ),
    (
        EventKind::FormRetrieved,
        1,
        "history/form_retrieved.v1.avsc",
        include_str!("../../schemas/history/form_retrieved.v1.avsc"),
    ),
    (EventKind::FormReady, 1, "history/form_ready.v1.avsc", include_str!("../../schemas/history/form_ready.v1.avsc")),
];

impl EventHeader {
    /// A header for a new event of `kind`. `event_id` must be unique per logical event; pass a
    /// deterministic id (see [`derived_event_id`]) when the event is an effect of another one.
    pub fn new(
        kind: EventKind,
        event_id: uuid::Uuid,
        occurred_at: i64,
        site_id: &str,
        conversation_id: &str,
        correlation_id: &str,
    ) -> EventHeader {
        EventHeader {
            event_id: event_id.to_string(),
            event_type: kind.name().to_string(),
            schema_version: kind.version(),
            occurred_at,
            site_id: site_id.to_string(),
            conversation_id: conversation_id.to_string(),
            correlation_id: correlation_id.to_string(),
        }
    }
}

/// Namespace for ids derived from other ids (UUID v5), so that re-processing an input after a crash
/// produces outputs with the same event ids and consumers can dedupe them.
const DERIVED_NS: uuid::Uuid = uuid::Uuid::from_u128(0x5ecf_0a3d_2b1e_4c6f_9a07_c1d2_e3f4_a5b6);

/// The id of the event `kind` caused by input event `cause_id`.
pub fn derived_event_id(cause_id: &str, kind: EventKind) -> uuid::Uuid {
    uuid::Uuid::new_v5(&DERIVED_NS, format!("{cause_id}/{}", kind.name()).as_bytes())
}

impl Event {
    /// The record key: the conversation id, so one conversation's events stay in order on one
    /// partition. Templates and keys are not conversation-scoped and are keyed by their own id.
    pub fn record_key(&self) -> String {
        match self {
            Event::FormTemplateDefined(t) => format!("{}/{}", t.header.site_id, t.template_id),
            Event::DataKeyCreated(k) => k.key_id.clone(),
            Event::DataKeyDestroyed(k) => k.key_id.clone(),
            Event::NodeAnnounced(n) => n.node_id.clone(),
            other => other.header().conversation_id.clone(),
        }
    }
}
