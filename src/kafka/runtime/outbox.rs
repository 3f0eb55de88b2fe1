//! The outbox: a batch's outputs, committed to sled with its state and offsets, then produced and
//! removed; whatever a crash left is produced again at start (same event ids).

use std::time::Duration;

use tokio::sync::watch;

use crate::kafka::{EventProducer, KafkaError};
use crate::store::{Store, StoreError, trees};
use crate::topics::Topic;

/// One event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub topic: Topic,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Appends `bytes` with its length before it (u32, big-endian).
fn put_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Splits a length-prefixed field (see [`put_prefixed`]) off the front: (field, rest).
fn take_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let field = bytes.get(4..4 + n)?;
    Some((field, &bytes[4 + n..]))
}

impl OutboxEntry {
    pub(super) fn encode(&self) -> Vec<u8> {
        let topic = self.topic.suffix().as_bytes();
        let mut out = Vec::with_capacity(8 + topic.len() + self.key.len() + self.payload.len());
        put_prefixed(&mut out, topic);
        put_prefixed(&mut out, &self.key);
        out.extend_from_slice(&self.payload);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<OutboxEntry> {
        let (topic, rest) = take_prefixed(bytes)?;
        let topic = Topic::from_suffix(std::str::from_utf8(topic).ok()?)?;
        let (key, payload) = take_prefixed(rest)?;
        Some(OutboxEntry { topic, key: key.to_vec(), payload: payload.to_vec() })
    }
}

/// One outbox row: the outputs one member's batch caused, in order. A batch's outputs are one row
/// (one write to commit, one to remove once delivered), keyed `group \0 \0 sequence(be u64)` so rows
/// sort in the order their batches committed. Rows written before batching (one per output, keyed
/// `group \0 topic \0 partition offset index`) are still read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub(super) key: Vec<u8>,
    pub(super) entries: Vec<OutboxEntry>,
}

impl OutboxRow {
    /// The key of a row of `group`'s, the `seq`-th in commit order.
    pub(super) fn key(group: &str, seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(group.len() + 10);
        k.extend_from_slice(group.as_bytes());
        k.extend_from_slice(&[0, 0]);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    pub(super) fn encode_entries(entries: &[OutboxEntry]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for e in entries {
            put_prefixed(&mut out, &e.encode());
        }
        out
    }

    fn decode_entries(bytes: &[u8]) -> Option<Vec<OutboxEntry>> {
        let count = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let mut rest = &bytes[4..];
        let mut entries = Vec::with_capacity(count.min(100_000));
        for _ in 0..count {
            let (entry, after) = take_prefixed(rest)?;
            entries.push(OutboxEntry::decode(entry)?);
            rest = after;
        }
        rest.is_empty().then_some(entries)
    }

    /// A stored row of `group`'s: a batch row, or one entry of the older layout.
    fn decode(group: &str, key: &[u8], value: &[u8]) -> Option<OutboxRow> {
        let entries = if key.get(group.len() + 1) == Some(&0) {
            OutboxRow::decode_entries(value)?
        } else {
            vec![OutboxEntry::decode(value)?]
        };
        Some(OutboxRow { key: key.to_vec(), entries })
    }
}

/// Produces committed outbox rows: every entry sent at once (the idempotent producer keeps their
/// order per partition), then any that failed retried one by one until delivered or shut down; each
/// row is removed once all of its entries are delivered. Returns whether everything was delivered
/// (false: shut down first; what is left is produced at the next start).
pub(super) async fn produce_outbox(
    rows: &[(Store, OutboxRow)],
    producer: &EventProducer,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, KafkaError> {
    let sends = rows.iter().flat_map(|(_, r)| &r.entries).map(|e| producer.send_raw(e.topic, &e.key, &e.payload));
    let mut results = futures::future::join_all(sends).await.into_iter();
    for (store, row) in rows {
        for entry in &row.entries {
            let mut result = results.next().expect("one result per entry").map(|_| ());
            let mut backoff = Duration::from_millis(100);
            while let Err(error) = result {
                if too_large(&error) {
                    tracing::error!(%error, topic = ?entry.topic, bytes = entry.payload.len(), "an output is larger than the producer or the topic takes; retrying cannot help, and this consumer waits on it: raise message.max.bytes (kafka_properties) and the topic's max.message.bytes");
                } else {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "outbox delivery failed; retrying (check the brokers)");
                }
                if *shutdown.borrow() {
                    // Left in the outbox; produced at next start.
                    return Ok(false);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                result = producer.send_raw(entry.topic, &entry.key, &entry.payload).await.map(|_| ());
            }
        }
        store.remove_lazy(trees::OUTBOX, &row.key)?;
    }
    Ok(true)
}

/// Whether a delivery failed because the record is over a size limit, which no retry changes.
pub(super) fn too_large(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        error,
        KafkaError::Delivery {
            source: rdkafka::error::KafkaError::MessageProduction(
                C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge
            ),
            ..
        }
    )
}

/// Produces whatever a previous run committed but did not deliver.
pub(super) async fn drain_outbox(store: &Store, producer: &EventProducer, group: &str) -> Result<(), KafkaError> {
    let mut prefix = group.as_bytes().to_vec();
    prefix.push(0);
    let tree = store.tree(trees::OUTBOX).map_err(KafkaError::Store)?;
    let mut pending = Vec::new();
    for row in tree.scan_prefix(&prefix) {
        let (k, v) = row.map_err(StoreError::from)?;
        match OutboxRow::decode(group, &k, &v) {
            Some(r) => pending.push((store.clone(), r)),
            None => {
                return Err(StoreError::Corrupt {
                    tree: trees::OUTBOX.into(),
                    detail: "undecodable outbox entry".into(),
                }
                .into());
            }
        }
    }
    if !pending.is_empty() {
        let entries: usize = pending.iter().map(|(_, r)| r.entries.len()).sum();
        tracing::info!(%group, entries, "re-sending outbox entries left by the previous run");
        let (_tx, mut never) = watch::channel(false);
        produce_outbox(&pending, producer, &mut never).await?;
        store.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_limit_is_told_apart_from_what_a_retry_can_fix() {
        use rdkafka::error::KafkaError as K;
        use rdkafka::types::RDKafkaErrorCode as C;
        let failed = |source| KafkaError::Delivery { topic: "t".into(), source };
        assert!(too_large(&failed(K::MessageProduction(C::MessageSizeTooLarge))));
        assert!(!too_large(&failed(K::MessageProduction(C::MessageTimedOut))));
        assert!(!too_large(&failed(K::MessageProduction(C::NotEnoughReplicas))));
    }

    #[test]
    fn outbox_entries_round_trip() {
        let e = OutboxEntry { topic: Topic::FormLinks, key: b"conv-1".to_vec(), payload: vec![0xC3, 1, 2, 3] };
        assert_eq!(OutboxEntry::decode(&e.encode()), Some(e));
        assert_eq!(OutboxEntry::decode(&[0, 0, 0, 9, b'x']), None);
    }

    #[test]
    fn batch_rows_round_trip_and_older_single_entry_rows_still_read() {
        let a = OutboxEntry { topic: Topic::FormLinks, key: b"conv-1".to_vec(), payload: vec![0xC3, 1, 2, 3] };
        let b = OutboxEntry { topic: Topic::AgentEvents, key: b"conv-2".to_vec(), payload: vec![0xC3, 9] };
        let key = OutboxRow::key("g", 7);
        let row = OutboxRow::decode("g", &key, &OutboxRow::encode_entries(&[a.clone(), b.clone()])).unwrap();
        assert_eq!(row.entries, vec![a.clone(), b]);
        // A row of the per-entry layout: group, topic, partition, offset, index.
        let mut old = b"g\0submissions\0".to_vec();
        old.extend_from_slice(&3i32.to_be_bytes());
        assert_eq!(OutboxRow::decode("g", &old, &a.encode()).unwrap().entries, vec![a.clone()]);
        // Truncated or padded rows are corrupt, not silently shortened.
        let whole = OutboxRow::encode_entries(std::slice::from_ref(&a));
        assert_eq!(OutboxRow::decode("g", &key, &whole[..whole.len() - 1]), None);
        let mut padded = whole.clone();
        padded.push(0);
        assert_eq!(OutboxRow::decode("g", &key, &padded), None);
        // Rows sort in commit order.
        assert!(OutboxRow::key("g", 255) < OutboxRow::key("g", 256));
    }
}
