//! Dead letters, and the bounds on records from outside (ADR 27): a record that cannot be decoded,
//! authenticated or applied becomes a DeadLetter with the reason and the original bytes (and MAC),
//! never state.

use rdkafka::message::{Message, OwnedMessage};

use crate::events::{Codec, DeadLetter, Event, EventHeader, EventKind};

/// The MAC header a record carries, if any.
pub(super) fn record_mac(m: &OwnedMessage) -> Option<&[u8]> {
    use rdkafka::message::Headers;
    m.headers()?.iter().find(|h| h.key == crate::crypto::mac::HEADER).and_then(|h| h.value)
}

/// The bytes of a record that the bounds below count: its key and its value.
pub(super) fn record_size(m: &OwnedMessage) -> usize {
    m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len)
}

/// The largest event from outside the service (the chat bus's) that is applied: ids and a few
/// fields, a few hundred bytes in practice. The events that answer one repeat its ids, and must stay
/// under the producer's `message.max.bytes`, or they could never be delivered.
pub const INBOUND_EVENT_MAX: usize = 64 * 1024;

/// The most of a record (key and value) a dead letter carries. A letter must stay well under the
/// producer's `message.max.bytes` (1,000,000 by default), or it could never be delivered and the
/// consumer would wait on it for ever: the broker takes records of up to 1 MiB by default, and a
/// letter adds its own fields to the record's bytes.
pub const LETTER_COPY_MAX: usize = 512 * 1024;

/// The longest site or conversation id a letter's header repeats from its record.
const HEADER_FIELD_MAX: usize = 1024;

/// The longest reason a letter gives (the size note of a record not copied comes on top).
const REASON_MAX: usize = 4096;

fn shorten(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" [...]");
    }
    text
}

/// What the reason of a letter that does not carry its record says; `dlq redrive` leaves such
/// letters alone.
pub const NOT_COPIED: &str = "is not copied into this letter";

/// The dead-letter record for a message. Its id is derived from where the message sits, so the same
/// failure dead-letters once however often it is re-read. It keeps the record's MAC header, so a
/// re-drive sends back exactly what came (never a new MAC). A record larger than
/// [`LETTER_COPY_MAX`] is not copied: the letter says how large it is and where it stays.
pub(super) fn dead_letter(m: &OwnedMessage, group: &str, kind: &str, reason: String) -> Event {
    // An error's text can quote the record (a decoder naming the value it refused): kept short, so
    // the letter stays within its bound.
    let reason = shorten(reason, REASON_MAX);
    let size = record_size(m);
    let (copied, reason) = if size > LETTER_COPY_MAX {
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            bytes = size,
            "a record too large to copy into its dead letter was refused; the letter names where it stays (check its producer)"
        );
        let reason = format!(
            "{reason}; the record ({size} bytes of key and value) {NOT_COPIED}, being over {LETTER_COPY_MAX} bytes: it stays at {}/{}@{} for the topic's retention",
            m.topic(),
            m.partition(),
            m.offset()
        );
        (false, reason)
    } else {
        (true, reason)
    };
    // The letter's own header names the site and conversation when they are of a sane size; the
    // record's bytes are what the letter keeps whole.
    let short = |s: String| if s.len() <= HEADER_FIELD_MAX { s } else { String::new() };
    let site = short(
        m.payload().and_then(|p| Codec::get().decode(p).ok()).map(|e| e.header().site_id.clone()).unwrap_or_default(),
    );
    let key = short(m.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default());
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
        source_key: if copied { m.key().map(|k| k.to_vec()) } else { None },
        payload: if copied { m.payload().unwrap_or_default().to_vec() } else { Vec::new() },
        error_kind: kind.to_string(),
        reason,
        consumer_group: group.to_string(),
        redrive_count: 0,
        // A MAC is a few dozen bytes; a header claiming to be one and larger is not kept.
        source_mac: record_mac(m)
            .filter(|t| t.len() <= HEADER_FIELD_MAX)
            .map(|t| String::from_utf8_lossy(t).to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    fn message(key: Vec<u8>, payload: Vec<u8>, mac: Option<Vec<u8>>) -> OwnedMessage {
        let headers = mac
            .map(|v| OwnedHeaders::new().insert(Header { key: crate::crypto::mac::HEADER, value: Some(v.as_slice()) }));
        OwnedMessage::new(Some(payload), Some(key), "t.chat-events".into(), Timestamp::NotAvailable, 3, 42, headers)
    }

    fn encoded_len(e: &Event) -> usize {
        Codec::get().encode(e).unwrap().len()
    }

    #[test]
    fn a_letter_stays_within_its_bound_whatever_the_record_and_the_error_say() {
        // The worst a record within the copy limit can do: every part as large as it may be, a MAC
        // header far too large, and an error that quotes a large part of the record.
        let key = vec![b'k'; 1000];
        let payload = vec![b'p'; LETTER_COPY_MAX - key.len()];
        let quoted = format!("expected a string, got {:?}", "q".repeat(400_000));
        let letter =
            dead_letter(&message(key.clone(), payload.clone(), Some(vec![b'm'; 300_000])), "g", "decode", quoted);
        let Event::DeadLetter(d) = &letter else { panic!("a dead letter") };
        assert_eq!(d.payload, payload, "copied whole");
        assert_eq!(d.source_key.as_deref(), Some(key.as_slice()));
        assert_eq!(d.source_mac, None, "a 300 kB header is no MAC");
        assert!(d.reason.len() <= REASON_MAX + 8 && d.reason.ends_with("[...]"), "{}", d.reason.len());
        assert!(encoded_len(&letter) < LETTER_COPY_MAX + 16 * 1024, "{}", encoded_len(&letter));
    }

    #[test]
    fn a_record_over_the_copy_limit_is_named_not_copied() {
        let letter =
            dead_letter(&message(b"conv".to_vec(), vec![b'p'; LETTER_COPY_MAX], None), "g", "decode", "bad".into());
        let Event::DeadLetter(d) = &letter else { panic!("a dead letter") };
        assert!(d.payload.is_empty() && d.source_key.is_none());
        assert!(d.reason.starts_with("bad; the record (524292 bytes of key and value)"), "{}", d.reason);
        assert!(d.reason.contains(NOT_COPIED) && d.reason.contains("t.chat-events/3@42"), "{}", d.reason);
        assert!(encoded_len(&letter) < 4096);
        // A key far too long for the letter's header: the header names no conversation.
        let letter = dead_letter(&message(vec![b'k'; 5000], b"x".to_vec(), None), "g", "decode", "bad".into());
        assert_eq!(letter.header().conversation_id, "");
    }
}
