//! Offsets: sled holds the truth (the next offset each partition applies), Kafka's committed offsets
//! mark what was emitted (ADR 7) and feed lag monitoring. The consumer context assigns partitions at
//! sled's offsets on every rebalance.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::store::{Store, StoreError, trees};

pub(super) fn offset_key(group: &str, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub(super) fn read_offset(bytes: &[u8]) -> Option<i64> {
    bytes.try_into().ok().map(i64::from_be_bytes)
}

/// The next offset this node will apply for a partition, if it has state for it.
pub fn stored_offset(store: &Store, group: &str, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
    Ok(store.tree(trees::OFFSETS)?.get(offset_key(group, topic, partition))?.and_then(|v| read_offset(&v)))
}

/// Consumer context: assigns each partition at the offset sled holds, and reports how many
/// partitions the handler holds (readiness and the rejoin watchdog read it).
pub(super) struct OffsetsFromStore {
    pub(super) store: Store,
    pub(super) group: String,
    pub(super) handler: &'static str,
    pub(super) metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl ClientContext for OffsetsFromStore {}

impl ConsumerContext for OffsetsFromStore {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = Vec::new();
                for elem in tpl.elements() {
                    let (topic, partition) = (elem.topic().to_string(), elem.partition());
                    let offset = match stored_offset(&self.store, &self.group, &topic, partition) {
                        Ok(Some(o)) => Offset::Offset(o),
                        Ok(None) => Offset::Beginning,
                        Err(error) => {
                            tracing::error!(%error, topic, partition, "cannot read stored offset; starting the partition from the beginning (state is rebuilt by replay)");
                            Offset::Beginning
                        }
                    };
                    assigned.push((topic, partition, offset));
                }
                for (topic, partition, offset) in &assigned {
                    if let Err(error) = tpl.set_partition_offset(topic, *partition, *offset) {
                        tracing::error!(%error, topic, partition, "cannot set start offset");
                    }
                }
                tracing::info!(group = %self.group, partitions = assigned.len(), "partitions assigned");
                match consumer.assign(tpl) {
                    Ok(()) => self.metrics.set_assigned(self.handler, assigned.len()),
                    Err(error) => {
                        tracing::error!(%error, group = %self.group, "assign failed; the consumer will rejoin the group")
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // The loop applies and commits a whole batch before it polls again, so nothing is in
                // flight here: releasing is safe.
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions revoked");
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, group = %self.group, "unassign failed");
                }
                self.metrics.set_assigned(self.handler, 0);
            }
            other => {
                tracing::error!(code = ?other, group = %self.group, "rebalance error; releasing partitions");
                let _ = consumer.unassign();
                self.metrics.set_assigned(self.handler, 0);
            }
        }
    }
}

/// Looks up, once per partition, the offset the group committed in Kafka: everything below it had
/// its outputs delivered already.
pub(super) fn learn_emitted_offsets(
    consumer: &StreamConsumer<OffsetsFromStore>,
    batch: &[OwnedMessage],
    emitted: &mut HashMap<(String, i32), i64>,
) {
    let mut tpl = TopicPartitionList::new();
    for m in batch {
        let k = (m.topic().to_string(), m.partition());
        if !emitted.contains_key(&k) && tpl.find_partition(m.topic(), m.partition()).is_none() {
            tpl.add_partition(m.topic(), m.partition());
        }
    }
    if tpl.count() == 0 {
        return;
    }
    match tokio::task::block_in_place(|| consumer.committed_offsets(tpl.clone(), crate::kafka::ADMIN_TIMEOUT)) {
        Ok(committed) => {
            for e in committed.elements() {
                let o = if let Offset::Offset(o) = e.offset() { o } else { 0 };
                emitted.insert((e.topic().to_string(), e.partition()), o);
            }
        }
        Err(error) => {
            // Without it, a rebuild may re-send outputs (same event ids; consumers dedupe them).
            tracing::warn!(%error, "cannot read committed offsets; outputs of replayed records will be sent again");
            for e in tpl.elements() {
                emitted.insert((e.topic().to_string(), e.partition()), 0);
            }
        }
    }
}

/// Kafka offsets serve lag monitoring and mark what was emitted (ADR 7); sled holds the truth, so
/// committing them at most this often saves broker work.
pub(super) const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

pub(super) fn commit_to_kafka(
    consumer: &StreamConsumer<OffsetsFromStore>,
    next: BTreeMap<(String, i32), i64>,
    mode: CommitMode,
) {
    if next.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
    }
    if let Err(error) = consumer.commit(&tpl, mode) {
        tracing::debug!(%error, "offset commit to kafka failed; sled holds the true offsets");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_keys_separate_groups_topics_and_partitions() {
        assert_ne!(offset_key("g", "t", 1), offset_key("g", "t", 2));
        assert_ne!(offset_key("g1", "t", 1), offset_key("g", "1t", 1));
    }
}
