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

impl OutboxEntry {
    pub(super) fn encode(&self) -> Vec<u8> {
        let topic = self.topic.suffix().as_bytes();
        let mut out = Vec::with_capacity(8 + topic.len() + self.key.len() + self.payload.len());
        out.extend_from_slice(&(topic.len() as u32).to_be_bytes());
        out.extend_from_slice(topic);
        out.extend_from_slice(&(self.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.payload);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<OutboxEntry> {
        let take = |b: &[u8]| -> Option<(usize, usize)> {
            let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
            (b.len() >= 4 + n).then_some((4, 4 + n))
        };
        let (s, e) = take(bytes)?;
        let topic = Topic::from_suffix(std::str::from_utf8(&bytes[s..e]).ok()?)?;
        let rest = &bytes[e..];
        let (s, e) = take(rest)?;
        Some(OutboxEntry { topic, key: rest[s..e].to_vec(), payload: rest[e..].to_vec() })
    }
}

/// Produces committed outbox entries: all sent at once (the idempotent producer keeps their order
/// per partition), then any that failed retried one by one until delivered or shut down.
pub(super) async fn produce_outbox(
    store: &Store,
    producer: &EventProducer,
    entries: &[(Vec<u8>, OutboxEntry)],
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    let sends = entries.iter().map(|(_, e)| producer.send_raw(e.topic, &e.key, &e.payload));
    let results = futures::future::join_all(sends).await;
    for ((key, entry), result) in entries.iter().zip(results) {
        let mut result = result.map(|_| ());
        let mut backoff = Duration::from_millis(100);
        while let Err(error) = result {
            tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "outbox delivery failed; retrying (check the brokers)");
            if *shutdown.borrow() {
                // Left in the outbox; produced at next start.
                return Ok(());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            result = producer.send_raw(entry.topic, &entry.key, &entry.payload).await.map(|_| ());
        }
        store.remove_lazy(trees::OUTBOX, key)?;
    }
    Ok(())
}

/// Produces whatever a previous run committed but did not deliver.
pub(super) async fn drain_outbox(store: &Store, producer: &EventProducer, group: &str) -> Result<(), KafkaError> {
    let mut prefix = group.as_bytes().to_vec();
    prefix.push(0);
    let tree = store.tree(trees::OUTBOX).map_err(KafkaError::Store)?;
    let mut pending = Vec::new();
    for row in tree.scan_prefix(&prefix) {
        let (k, v) = row.map_err(StoreError::from)?;
        match OutboxEntry::decode(&v) {
            Some(e) => pending.push((k.to_vec(), e)),
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
        tracing::info!(%group, entries = pending.len(), "re-sending outbox entries left by the previous run");
        let (_tx, mut never) = watch::channel(false);
        produce_outbox(store, producer, &pending, &mut never).await?;
        store.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_entries_round_trip() {
        let e = OutboxEntry { topic: Topic::FormLinks, key: b"conv-1".to_vec(), payload: vec![0xC3, 1, 2, 3] };
        assert_eq!(OutboxEntry::decode(&e.encode()), Some(e));
        assert_eq!(OutboxEntry::decode(&[0, 0, 0, 9, b'x']), None);
    }
}
