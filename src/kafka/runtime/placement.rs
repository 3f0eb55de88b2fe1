//! Chat-bus records on the wrong partition go to their conversation's partition (ADR 27).
//!
//! The service and the chat bus must put a conversation on the same partition number of every
//! topic: murmur2 of the conversation id, as the Java client does (ADR 1, 22). A chat bus on another
//! partitioner (librdkafka's default `consistent_random`, which its Python, Go and .NET bindings
//! share; sarama's FNV-1a), or one that keys records by something else, puts them elsewhere. One
//! node would serve them all the same. In a cluster their conversations' state would land on a node
//! that does not own them, and the requests would wait for a catch-up that never comes.
//!
//! So the consumer of the conversation-keyed topics sends such a record, byte for byte and keyed
//! by its conversation id, to its conversation's partition on the same topic, before it applies
//! the batch; its members skip the original. The owner of that partition applies the copy. The
//! handlers dedupe on event ids and state, so a copy sent twice (a crash between the copy and the
//! batch's commit) changes nothing.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::watch;

use super::dead_letter::{INBOUND_EVENT_MAX, record_size};
use super::outbox::too_large;
use crate::events::Codec;
use crate::kafka::{EventProducer, KafkaError};
use crate::topics::Topic;

/// `(partition, offset)` of the chat-bus records of a batch that were sent to their conversation's
/// partition: the members skip them.
pub(crate) type Moved = HashSet<(i32, i64)>;

/// How many event ids are remembered as moved: a record moved twice means the producer and this
/// consumer disagree on the partition count, and it is then applied where it is.
const REMEMBERED: usize = 100_000;

pub(super) struct Placement {
    topic: String,
    /// The conversation-keyed topics' partition count; None for consumers that read them whole.
    partitions: Option<i32>,
    moved_ids: HashSet<String>,
    /// Set when the brokers refuse this node writes to the chat-bus topic.
    refused: bool,
    since_warning: u64,
    warned: Option<std::time::Instant>,
}

impl Placement {
    pub(super) fn new(topic: String, partitions: Option<i32>) -> Placement {
        Placement { topic, partitions, moved_ids: HashSet::new(), refused: false, since_warning: 0, warned: None }
    }

    /// Sends each misplaced chat-bus record of `batch` to its conversation's partition and returns
    /// where they were, or None when `shutdown` came while a copy could not be delivered yet.
    /// Records whose outputs were already emitted (a replay) are left where they are, as the run
    /// that first read them left them.
    pub(super) async fn place(
        &mut self,
        batch: &[OwnedMessage],
        emitted: &std::collections::HashMap<(String, i32), i64>,
        producer: &EventProducer,
        metrics: &crate::metrics::Metrics,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<Moved>, KafkaError> {
        let mut moved = Moved::new();
        let Some(partitions) = self.partitions else { return Ok(Some(moved)) };
        let topic = self.topic.clone();
        for m in batch.iter().filter(|m| m.topic() == topic) {
            let Some(payload) = m.payload() else { continue };
            // Too large to be applied anywhere: dead-lettered where it is (batch.rs), never copied.
            if record_size(m) > INBOUND_EVENT_MAX {
                continue;
            }
            // What does not decode is the members' to dead-letter, wherever it is.
            let Ok(event) = Codec::get().decode(payload) else { continue };
            let conversation = event.header().conversation_id.as_str();
            let home = crate::topics::partition_for(conversation.as_bytes(), partitions);
            if home == m.partition() {
                continue;
            }
            metrics.chat_bus_misplaced.inc();
            let replayed = emitted.get(&(m.topic().to_string(), m.partition())).is_some_and(|&e| m.offset() < e);
            let event_id = event.header().event_id.clone();
            let again = self.moved_ids.contains(&event_id);
            if again {
                tracing::error!(
                    topic = %self.topic,
                    partition = m.partition(),
                    offset = m.offset(),
                    "a chat-bus record sent to its conversation's partition arrived off it again; it is applied here. The producer and this node disagree on the topic's partition count: restart the nodes after a partition change"
                );
            }
            let move_it = !replayed && !again && !self.refused;
            self.warn(m, home, move_it);
            if !move_it {
                continue;
            }
            match self.send(m, conversation, payload, producer, shutdown).await? {
                Sent::Yes => {
                    if self.moved_ids.len() >= REMEMBERED {
                        self.moved_ids.clear();
                    }
                    self.moved_ids.insert(event_id);
                    moved.insert((m.partition(), m.offset()));
                }
                Sent::Refused => {}
                Sent::Stopping => return Ok(None),
            }
        }
        Ok(Some(moved))
    }

    /// Warns at most once a minute, with how many records since the last warning.
    fn warn(&mut self, m: &OwnedMessage, home: i32, moving: bool) {
        self.since_warning += 1;
        if self.warned.is_some_and(|w| w.elapsed() < Duration::from_secs(60)) {
            return;
        }
        tracing::warn!(
            topic = %self.topic,
            partition = m.partition(),
            offset = m.offset(),
            expected_partition = home,
            records = self.since_warning,
            moved = moving,
            "chat-bus records are not where murmur2 of their conversation id puts them, so each is sent there before it is applied (one more hop); key every record by its conversation id and produce with the Java client's partitioner (librdkafka and its bindings: partitioner=murmur2_random)"
        );
        self.warned = Some(std::time::Instant::now());
        self.since_warning = 0;
    }

    async fn send(
        &mut self,
        m: &OwnedMessage,
        conversation: &str,
        payload: &[u8],
        producer: &EventProducer,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Sent, KafkaError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match producer.send_raw(Topic::ChatEvents, conversation.as_bytes(), payload).await {
                Ok(_) => return Ok(Sent::Yes),
                Err(error) if too_large(&error) => {
                    tracing::error!(%error, partition = m.partition(), offset = m.offset(), "a misplaced chat-bus record could not be copied to its conversation's partition (over a size limit); it is applied where it is: check message.max.bytes (kafka_properties)");
                    return Ok(Sent::Refused);
                }
                Err(error) if refused(&error) => {
                    tracing::error!(
                        %error,
                        topic = %self.topic,
                        "this node may not write to the chat-bus topic, so misplaced chat-bus records are applied where they are, and a cluster serves their conversations from the wrong node; grant the service Write on it (docker/kafka-acls.sh does)"
                    );
                    self.refused = true;
                    return Ok(Sent::Refused);
                }
                Err(error) => {
                    if *shutdown.borrow() {
                        return Ok(Sent::Stopping);
                    }
                    tracing::warn!(%error, partition = m.partition(), offset = m.offset(), retry_in_ms = backoff.as_millis() as u64, "cannot send a misplaced chat-bus record to its conversation's partition; retrying (check the brokers)");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

enum Sent {
    Yes,
    /// The brokers refuse this node writes to the topic, or the record: it stays where it is.
    Refused,
    Stopping,
}

fn refused(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        error,
        KafkaError::Delivery {
            source: rdkafka::error::KafkaError::MessageProduction(
                C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed
            ),
            ..
        }
    )
}
