//! Dead letters: a record that cannot be decoded, authenticated or applied becomes a DeadLetter with
//! the reason and the original bytes (and MAC), never state.

use rdkafka::message::{Message, OwnedMessage};

use crate::events::{Codec, DeadLetter, Event, EventHeader, EventKind};

/// The MAC header a record carries, if any.
pub(super) fn record_mac(m: &OwnedMessage) -> Option<&[u8]> {
    use rdkafka::message::Headers;
    m.headers()?.iter().find(|h| h.key == crate::crypto::mac::HEADER).and_then(|h| h.value)
}

/// The dead-letter record for a message. Its id is derived from where the message sits, so the same
/// failure dead-letters once however often it is re-read. It keeps the record's MAC header, so a
/// re-drive sends back exactly what came (never a new MAC).
pub(super) fn dead_letter(m: &OwnedMessage, group: &str, kind: &str, reason: String) -> Event {
    let site =
        m.payload().and_then(|p| Codec::get().decode(p).ok()).map(|e| e.header().site_id.clone()).unwrap_or_default();
    let key = m.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default();
    let id = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("dlq/{group}/{}/{}/{}", m.topic(), m.partition(), m.offset()).as_bytes(),
    );
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    Event::DeadLetter(DeadLetter {
        header: EventHeader::new(
            EventKind::DeadLetter,
            id,
            now,
            &site,
            &key,
            &format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
        ),
        source_topic: m.topic().to_string(),
        source_partition: m.partition(),
        source_offset: m.offset(),
        source_key: m.key().map(|k| k.to_vec()),
        payload: m.payload().unwrap_or_default().to_vec(),
        error_kind: kind.to_string(),
        reason,
        consumer_group: group.to_string(),
        redrive_count: 0,
        source_mac: record_mac(m).map(|t| String::from_utf8_lossy(t).to_string()),
    })
}
