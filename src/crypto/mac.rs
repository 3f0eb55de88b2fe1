//! Which events this service wrote. Anyone who can write to a topic can put a well-formed event on
//! it, so the events only this service produces (everything but the chat bus's own events and dead
//! letters, see [`EventKind::service_only`]) carry an HMAC-SHA256 of their record key and value in
//! the Kafka record header [`HEADER`]. The MAC key is derived from the integrity key (itself derived
//! from the master key unless pinned, ADR 19), so every node and the operations replica can check it
//! and nobody without it can make one. Handlers
//! refuse an event of such a kind without a valid MAC: it becomes a dead letter
//! (`unauthenticated`), never state. The Avro payload is unchanged, so independent Avro clients
//! read the events as before.
//!
//! Only events the service builds itself are signed (its own `send`, its outboxes); re-driven dead
//! letters are produced unsigned, so a forged record can never be laundered through the service.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::IntegrityKey;
use crate::events::EventKind;

/// The Kafka record header that carries the MAC (lower-case hex).
pub const HEADER: &str = "secureforms-mac";

const KEY_LABEL: &[u8] = b"secureforms-event-mac-v1";

/// Signs and checks the MAC of service-produced events.
pub struct EventSigner {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for EventSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSigner(..)")
    }
}

impl EventSigner {
    pub fn new(integrity: &IntegrityKey) -> EventSigner {
        EventSigner { key: integrity.derive(KEY_LABEL) }
    }

    fn mac(&self, record_key: &[u8], payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_ref()).expect("HMAC takes any key length");
        mac.update(&(record_key.len() as u64).to_be_bytes());
        mac.update(record_key);
        mac.update(payload);
        mac
    }

    /// The header value for a record.
    pub fn sign(&self, record_key: &[u8], payload: &[u8]) -> String {
        hex::encode(self.mac(record_key, payload).finalize().into_bytes())
    }

    /// Whether `presented` (the header value, if any) is this record's MAC. Constant time.
    pub fn verify(&self, record_key: &[u8], payload: &[u8], presented: Option<&[u8]>) -> bool {
        let Some(tag) = presented.and_then(|p| hex::decode(p).ok()) else {
            return false;
        };
        self.mac(record_key, payload).verify_slice(&tag).is_ok()
    }
}

impl EventKind {
    /// Events only this service produces, which must carry its MAC. The chat bus's events (on
    /// `chat-events`) come from outside; dead letters wrap whatever arrived.
    pub fn service_only(self) -> bool {
        self.topic() != crate::topics::Topic::ChatEvents && self != EventKind::DeadLetter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> EventSigner {
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        EventSigner::new(&IntegrityKey::from_master(&master))
    }

    #[test]
    fn a_mac_holds_for_its_record_only() {
        let s = signer();
        let tag = s.sign(b"conv-1", b"payload");
        assert!(s.verify(b"conv-1", b"payload", Some(tag.as_bytes())));
        assert!(!s.verify(b"conv-2", b"payload", Some(tag.as_bytes())), "another key");
        assert!(!s.verify(b"conv-1", b"payloaD", Some(tag.as_bytes())), "a changed value");
        assert!(!s.verify(b"conv-1", b"payload", None), "no MAC");
        assert!(!s.verify(b"conv-1", b"payload", Some(b"not hex")), "garbage");
        assert!(!signer().verify(b"conv-1", b"payload", Some(tag.as_bytes())), "another master key");
        // The key length is bound in: moving bytes between key and value changes the MAC.
        assert!(!s.verify(b"conv-1p", b"ayload", Some(tag.as_bytes())));
    }

    #[test]
    fn the_chat_bus_events_and_dead_letters_are_not_service_only() {
        assert!(!EventKind::FormSent.service_only());
        assert!(!EventKind::AgentSessionEnded.service_only());
        assert!(!EventKind::DeadLetter.service_only());
        for k in [EventKind::FormSubmitted, EventKind::FormIssued, EventKind::DataKeyDestroyed, EventKind::FormReady] {
            assert!(k.service_only(), "{k:?}");
        }
    }
}
