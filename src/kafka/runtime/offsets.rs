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

/// Consumer context: assigns each partition at the offset sled holds, and reports what the consumer
/// holds (readiness, routing and the rejoin watchdog read it).
pub(super) struct OffsetsFromStore {
    pub(super) undelivered: super::Undelivered,
    pub(super) shares: Vec<super::Share>,
    pub(super) group: String,
    pub(super) metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub(super) ownership: Option<std::sync::Arc<super::Ownership>>,
    /// True from joining (or a revocation) until the group assigns partitions.
    pub(super) awaiting: std::sync::atomic::AtomicBool,
    /// Topic-partitions the consumer holds.
    pub(super) held: std::sync::atomic::AtomicUsize,
    pub(super) static_member: bool,
}

/// Where a partition starts: the lowest next offset of the members that consume its topic (each
/// skips what it applied already); from the beginning when one of them has no state for it.
fn start_offset(shares: &[super::Share], topic: &str, partition: i32) -> Result<Offset, StoreError> {
    let mut start: Option<i64> = None;
    for s in shares.iter().filter(|s| s.topics.iter().any(|t| t == topic)) {
        match stored_offset(&s.store, &s.state, topic, partition)? {
            None => return Ok(Offset::Beginning),
            Some(o) => start = Some(start.map_or(o, |c| c.min(o))),
        }
    }
    Ok(start.map_or(Offset::Beginning, Offset::Offset))
}

/// The offsets to commit to Kafka for partitions the consumer holds: what every member applied and
/// whose outputs were delivered (below the first record of a batch whose outputs are in flight).
pub(super) fn held_offsets(
    shares: &[super::Share],
    held: &TopicPartitionList,
    undelivered: &super::Undelivered,
) -> TopicPartitionList {
    let undelivered = undelivered.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut tpl = TopicPartitionList::new();
    for elem in held.elements() {
        if let Ok(Offset::Offset(o)) = start_offset(shares, elem.topic(), elem.partition()) {
            let o = undelivered.get(&(elem.topic().to_string(), elem.partition())).map_or(o, |&u| u.min(o));
            let _ = tpl.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(o));
        }
    }
    tpl
}

impl OffsetsFromStore {
    fn report(&self, tpl: Option<&TopicPartitionList>) {
        self.held.store(tpl.map_or(0, |t| t.count()), std::sync::atomic::Ordering::SeqCst);
        for s in &self.shares {
            let n = tpl.map_or(0, |t| t.elements().iter().filter(|e| s.topics.iter().any(|n| n == e.topic())).count());
            self.metrics.set_assigned(s.name, n);
        }
        if let Some(o) = &self.ownership {
            match tpl {
                Some(t) => o.set(t.elements().iter().map(|e| e.partition()).collect()),
                None => o.release(),
            }
        }
        self.metrics.set_owned(
            &self.group,
            tpl.map_or(0, |t| {
                t.elements().iter().map(|e| e.partition()).collect::<std::collections::BTreeSet<_>>().len()
            }),
        );
    }
}

impl ClientContext for OffsetsFromStore {}

impl ConsumerContext for OffsetsFromStore {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        use std::sync::atomic::Ordering::SeqCst;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = Vec::new();
                for elem in tpl.elements() {
                    let (topic, partition) = (elem.topic().to_string(), elem.partition());
                    let offset = start_offset(&self.shares, &topic, partition).unwrap_or_else(|error| {
                        tracing::error!(%error, topic, partition, "cannot read stored offset; starting the partition from the beginning (state is rebuilt by replay)");
                        Offset::Beginning
                    });
                    assigned.push((topic, partition, offset));
                }
                for (topic, partition, offset) in &assigned {
                    if let Err(error) = tpl.set_partition_offset(topic, *partition, *offset) {
                        tracing::error!(%error, topic, partition, "cannot set start offset");
                    }
                }
                let partitions: std::collections::BTreeSet<i32> = assigned.iter().map(|(_, p, _)| *p).collect();
                tracing::info!(group = %self.group, topic_partitions = assigned.len(), ?partitions, "partitions assigned");
                match consumer.assign(tpl) {
                    Ok(()) => {
                        self.report(Some(tpl));
                        self.awaiting.store(false, SeqCst);
                    }
                    Err(error) => {
                        tracing::error!(%error, group = %self.group, "assign failed; the consumer will rejoin the group")
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // The next owner learns what was emitted from the offsets committed now (ADR 7):
                // below the outputs still in flight, if a batch's are. Asynchronously: this runs on
                // the loop's thread, and a revocation during a broker outage must not hold it (nor
                // the HTTP server sharing the runtime) for a request timeout. If the commit is lost,
                // the next owner sends some outputs again: same event ids and, for the keys
                // handlers issue, the same keys.
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions revoked");
                self.report(None);
                let held = held_offsets(&self.shares, tpl, &self.undelivered);
                if held.count() > 0
                    && let Err(error) = consumer.commit(&held, CommitMode::Async)
                {
                    tracing::warn!(%error, group = %self.group, "offset commit on revocation failed; the next owner may send outputs of replayed records again (same event ids and keys; consumers dedupe them)");
                }
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, group = %self.group, "unassign failed");
                }
                self.awaiting.store(true, SeqCst);
            }
            other => {
                tracing::error!(code = ?other, group = %self.group, "rebalance error; releasing partitions");
                let _ = consumer.unassign();
                self.report(None);
                self.awaiting.store(true, SeqCst);
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
    // Only partitions the consumer holds now: a partition revoked since its batch was delivered has
    // an owner that commits its own marks, and a stale one from here would move them back (the
    // group protocol accepts a member's commit for any partition).
    let held: std::collections::BTreeSet<(String, i32)> = match consumer.assignment() {
        Ok(a) => a.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect(),
        Err(error) => {
            tracing::debug!(%error, "cannot read the assignment; offsets not committed to kafka this time");
            return;
        }
    };
    let next = still_held(next, &held);
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

/// The offsets of `next` whose partitions are in `held`.
fn still_held(
    mut next: BTreeMap<(String, i32), i64>,
    held: &std::collections::BTreeSet<(String, i32)>,
) -> BTreeMap<(String, i32), i64> {
    next.retain(|k, _| held.contains(k));
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_partitions_no_longer_held_are_not_committed() {
        let next: BTreeMap<(String, i32), i64> =
            [(("t".to_string(), 0), 10), (("t".to_string(), 1), 20), (("u".to_string(), 0), 30)].into();
        let held = [("t".to_string(), 1), ("u".to_string(), 0), ("u".to_string(), 5)].into();
        let kept = still_held(next, &held);
        assert_eq!(kept, [(("t".to_string(), 1), 20), (("u".to_string(), 0), 30)].into());
    }

    #[test]
    fn offset_keys_separate_groups_topics_and_partitions() {
        assert_ne!(offset_key("g", "t", 1), offset_key("g", "t", 2));
        assert_ne!(offset_key("g1", "t", 1), offset_key("g", "1t", 1));
    }
}
