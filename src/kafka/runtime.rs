//! The consumer runtime: runs one [`Handler`] over its topics with exactly-once effects (ADR 0004).
//!
//! Per batch of records:
//! 1. each record is decoded and handed to the handler, which stages state writes in a [`Tx`] and
//!    returns the events it causes; a record that cannot be decoded or applied becomes a DeadLetter;
//! 2. the state, the outputs (in the outbox) and the next offset of every partition are committed
//!    to sled in one atomic, flushed write;
//! 3. the outbox is produced (idempotent producer, acks=all) and emptied;
//! 4. offsets are committed to Kafka too, for lag monitoring only.
//!
//! sled's offsets are the truth: on assignment each partition starts at the offset sled holds (or at
//! the beginning when this node has no state for it, which rebuilds the state by replay), and a
//! record below it is skipped. While rebuilding, records below the group's offset committed in Kafka
//! (committed only after their outputs were delivered) are applied with `replay` set and their
//! outputs dropped, so a rebuild changes state but emits nothing already emitted. A crash anywhere re-runs at most the unfinished batch: its state was
//! not committed, so nothing is applied twice, and outbox entries left from a committed batch are
//! produced again at start with the same event ids (consumers dedupe on them).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::{EventProducer, KafkaError, KafkaSettings};
use crate::events::{Codec, DeadLetter, Event, EventHeader, EventKind};
use crate::store::{Store, StoreError, Tx, trees};
use crate::topics::Topic;

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
    /// The record is being re-applied to rebuild state: its outputs were produced before and are
    /// dropped this time.
    pub replay: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The record can never be applied as it is: it goes to the dead-letter topic with this reason.
    #[error("{0}")]
    Unprocessable(String),
    /// The node's storage failed: the batch is not committed and the runtime stops.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A consumer of events: pure apart from the staged writes it makes in `tx`.
pub trait Handler: Send + 'static {
    /// Names the consumer group (`<group_prefix>-<name>`) and the offsets in sled.
    fn name(&self) -> &'static str;
    fn topics(&self) -> Vec<Topic>;
    /// Applies one event. Returns the events it causes, to be produced once the batch is durable.
    /// `now_ms` is the processing time (injected so tests control it).
    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        meta: &RecordMeta,
        now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError>;
}

/// Crash injection for tests: `SECUREFORMS_FAILPOINT=<handler>:<point>:<n>` aborts the process the
/// n-th time `handler` reaches `point` (`before-commit`, `after-commit`, `after-produce`). Unset in
/// production; read once.
fn failpoint(handler: &str, point: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SPEC: OnceLock<Option<(String, String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SECUREFORMS_FAILPOINT").ok()?;
        let mut parts = v.splitn(3, ':');
        Some((parts.next()?.to_string(), parts.next()?.to_string(), parts.next()?.parse().ok()?))
    });
    if let Some((h, p, n)) = spec
        && h == handler
        && p == point
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        eprintln!("failpoint {handler}:{point}:{n} reached; aborting");
        std::process::abort();
    }
}

/// The clock the runtime hands to handlers.
pub type Clock = std::sync::Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    std::sync::Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    })
}

fn offset_key(group: &str, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn read_offset(bytes: &[u8]) -> Option<i64> {
    bytes.try_into().ok().map(i64::from_be_bytes)
}

/// The next offset this node will apply for a partition, if it has state for it.
pub fn stored_offset(store: &Store, group: &str, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
    Ok(store.tree(trees::OFFSETS)?.get(offset_key(group, topic, partition))?.and_then(|v| read_offset(&v)))
}

/// One event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub topic: Topic,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl OutboxEntry {
    fn encode(&self) -> Vec<u8> {
        let topic = self.topic.suffix().as_bytes();
        let mut out = Vec::with_capacity(8 + topic.len() + self.key.len() + self.payload.len());
        out.extend_from_slice(&(topic.len() as u32).to_be_bytes());
        out.extend_from_slice(topic);
        out.extend_from_slice(&(self.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.payload);
        out
    }

    fn decode(bytes: &[u8]) -> Option<OutboxEntry> {
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

/// Consumer context: assigns each partition at the offset sled holds, and reports how many
/// partitions the handler holds (readiness and the rejoin watchdog read it).
struct OffsetsFromStore {
    store: Store,
    group: String,
    handler: &'static str,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
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

/// What a handler runs with besides its store.
#[derive(Clone)]
pub struct RunContext {
    pub clock: Clock,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// A shadow replica (an operations copy of the state) applies everything and emits nothing: its
    /// outputs were, or will be, emitted by the nodes that own the consumer groups.
    pub shadow: bool,
    /// Checks the MAC of events only the service produces; one without a valid MAC becomes a dead
    /// letter (`unauthenticated`). None accepts them unsigned: only for a deployment migrating
    /// topics written before MACs (`accept_unsigned_events`) and for tools.
    pub verify_with: Option<std::sync::Arc<crate::crypto::mac::EventSigner>>,
}

impl RunContext {
    pub fn new(clock: Clock, verify_with: Option<std::sync::Arc<crate::crypto::mac::EventSigner>>) -> RunContext {
        RunContext { clock, metrics: std::sync::Arc::new(crate::metrics::Metrics::new()), shadow: false, verify_with }
    }
}

/// Runs a handler until `shutdown` turns true. Returns an error only for failures it cannot ride out
/// (the node's storage failing); the caller stops the service and says so.
pub async fn run<H: Handler>(
    settings: KafkaSettings,
    store: Store,
    producer: EventProducer,
    mut handler: H,
    ctx: RunContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    let RunContext { clock, metrics, shadow, verify_with } = ctx;
    let group = settings.group_id(handler.name());
    // Outputs of batches committed before a crash go out before anything new is read.
    drain_outbox(&store, &producer, &group).await?;

    let topic_names: Vec<String> = handler.topics().iter().map(|t| settings.names.name(*t)).collect();
    let mut consumer = subscribe(&settings, &store, &group, handler.name(), &metrics, &topic_names, true)?;
    tracing::info!(%group, topics = ?topic_names, "consumer started");
    let mut watchdog = tokio::time::interval(WATCHDOG_INTERVAL);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut empty_since: Option<std::time::Instant> = None;

    // Partition -> first offset whose outputs were not yet delivered (from Kafka's committed offsets).
    let mut emitted: HashMap<(String, i32), i64> = HashMap::new();
    // Offsets to commit to Kafka (for lag monitoring), at most once per COMMIT_INTERVAL.
    let mut to_commit: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut last_commit = std::time::Instant::now();
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            m = consumer.recv() => m,
            _ = watchdog.tick() => {
                // A consumer that holds no partitions for long is re-created as a fresh, dynamic
                // member (no group.instance.id). Seen on tansu 0.6.0: a static member that replaced
                // one of a stopped or killed process was revoked and never reassigned, and joining
                // again under the same instance id did not help.
                if metrics.assigned(handler.name()) > 0 {
                    empty_since = None;
                } else if empty_since.get_or_insert_with(std::time::Instant::now).elapsed() >= REJOIN_AFTER {
                    tracing::warn!(%group, secs = REJOIN_AFTER.as_secs(), "consumer held no partitions; re-creating it as a new dynamic member to rejoin the group (check the broker if this repeats)");
                    metrics.consumer_rejoined(handler.name());
                    drop(consumer);
                    consumer = subscribe(&settings, &store, &group, handler.name(), &metrics, &topic_names, false)?;
                    empty_since = None;
                }
                continue;
            }
        };
        let mut batch = Vec::new();
        match first {
            Ok(m) => batch.push(m.detach()),
            Err(error) => {
                tracing::warn!(%error, %group, "consume error; retrying");
                continue;
            }
        }
        while batch.len() < settings.max_batch {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        if shadow {
            for m in &batch {
                emitted.insert((m.topic().to_string(), m.partition()), i64::MAX);
            }
        } else {
            learn_emitted_offsets(&consumer, &batch, &mut emitted);
        }
        let name = handler.name();
        let committed = process_batch(
            &settings,
            &store,
            &mut handler,
            &group,
            &batch,
            &emitted,
            clock(),
            &metrics,
            verify_with.as_deref(),
        )
        .await?;
        failpoint(name, "after-commit");
        produce_outbox(&store, &producer, &committed, &mut shutdown).await?;
        failpoint(name, "after-produce");
        for m in &batch {
            let e = to_commit.entry((m.topic().to_string(), m.partition())).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            commit_to_kafka(&consumer, std::mem::take(&mut to_commit), CommitMode::Async);
            last_commit = std::time::Instant::now();
        }
    }

    if let Ok(assignment) = consumer.assignment() {
        // Final synchronous commit so lag reports are exact after a clean stop.
        let mut tpl = TopicPartitionList::new();
        for elem in assignment.elements() {
            if let Ok(Some(o)) = stored_offset(&store, &group, elem.topic(), elem.partition()) {
                let _ = tpl.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(o));
            }
        }
        if tpl.count() > 0
            && let Err(error) = consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(%error, %group, "final offset commit failed; sled holds the true offsets");
        }
    }
    store.flush().await?;
    tracing::info!(%group, "consumer stopped");
    Ok(())
}

/// How often the run loop checks that its consumer holds partitions, and how long it may hold none
/// before it is re-created. Longer than a rebalance takes (session timeout 10 s).
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(5);
const REJOIN_AFTER: Duration = Duration::from_secs(15);

/// A consumer in the handler's group, subscribed to its topics. With `static_member`, static
/// membership: a restarted node takes its partitions back at once instead of waiting for its dead
/// session to time out (node ids must therefore be unique).
fn subscribe(
    settings: &KafkaSettings,
    store: &Store,
    group: &str,
    handler: &'static str,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    topics: &[String],
    static_member: bool,
) -> Result<StreamConsumer<OffsetsFromStore>, KafkaError> {
    metrics.set_assigned(handler, 0);
    let context =
        OffsetsFromStore { store: store.clone(), group: group.to_string(), handler, metrics: metrics.clone() };
    let mut config = settings.client_config();
    if static_member {
        config.set("group.instance.id", format!("{}-{}", settings.client_id, handler));
    }
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait_ms(settings.kind))
        .set("fetch.error.backoff.ms", "50")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    let consumer: StreamConsumer<OffsetsFromStore> =
        settings.finish(config).create_with_context(context).map_err(|e| settings.client_error(e))?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs).map_err(|e| settings.client_error(e))?;
    Ok(consumer)
}

/// How long a fetch waits at the broker for new records. Apache Kafka answers a waiting fetch as
/// soon as a record arrives, so the wait costs no latency and a long one saves idle requests; tansu
/// 0.6.0 holds the fetch for the whole wait, so every hop of the flow (FormSubmitted -> FormReady)
/// costs up to one wait there: short. Measured in the bench report (README, Performance).
fn fetch_wait_ms(kind: Option<super::BrokerKind>) -> &'static str {
    match kind {
        Some(super::BrokerKind::Kafka) => "100",
        _ => "5",
    }
}

/// Looks up, once per partition, the offset the group committed in Kafka: everything below it had
/// its outputs delivered already.
fn learn_emitted_offsets(
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
    match tokio::task::block_in_place(|| consumer.committed_offsets(tpl.clone(), super::ADMIN_TIMEOUT)) {
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
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

fn commit_to_kafka(consumer: &StreamConsumer<OffsetsFromStore>, next: BTreeMap<(String, i32), i64>, mode: CommitMode) {
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

/// Applies a batch and commits it to sled. Returns the outbox keys it wrote, in order.
#[allow(clippy::too_many_arguments)] // the run loop's state, passed through as is
async fn process_batch<H: Handler>(
    settings: &KafkaSettings,
    store: &Store,
    handler: &mut H,
    group: &str,
    batch: &[OwnedMessage],
    emitted: &HashMap<(String, i32), i64>,
    now_ms: i64,
    metrics: &crate::metrics::Metrics,
    verify_with: Option<&crate::crypto::mac::EventSigner>,
) -> Result<Vec<(Vec<u8>, OutboxEntry)>, KafkaError> {
    let mut tx = store.begin();
    let mut outbox = Vec::new();
    for m in batch {
        let okey = offset_key(group, m.topic(), m.partition());
        let next = tx.get(trees::OFFSETS, &okey)?.and_then(|v| read_offset(&v)).unwrap_or(0);
        if m.offset() < next {
            tracing::debug!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "already applied; skipped"
            );
            continue;
        }
        metrics.consumed(handler.name(), m.topic());
        let (outputs, replay) = match settings.names.parse(m.topic()) {
            None => (
                vec![dead_letter(m, group, "apply", format!("topic {} is not one this consumer knows", m.topic()))],
                false,
            ),
            Some(topic) => {
                let replay = emitted.get(&(m.topic().to_string(), m.partition())).is_some_and(|&e| m.offset() < e);
                let meta = RecordMeta { topic, partition: m.partition(), offset: m.offset(), replay };
                (apply_one(handler, &mut tx, m, &meta, group, now_ms, verify_with)?, replay)
            }
        };
        for e in &outputs {
            if let Event::DeadLetter(d) = e {
                metrics.dead_letter(handler.name(), &d.error_kind);
            }
        }
        // A replayed record's outputs were delivered by the run that first applied it: counted, not re-sent.
        let outputs = if replay { Vec::new() } else { outputs };
        for (i, event) in outputs.iter().enumerate() {
            let payload = Codec::get().encode(event)?;
            let entry = OutboxEntry { topic: event.kind().topic(), key: event.record_key().into_bytes(), payload };
            let mut k = okey.clone();
            k.extend_from_slice(&m.offset().to_be_bytes());
            k.extend_from_slice(&(i as u32).to_be_bytes());
            tx.insert(trees::OUTBOX, k.clone(), entry.encode());
            outbox.push((k, entry));
        }
        tx.insert(trees::OFFSETS, okey, (m.offset() + 1).to_be_bytes().to_vec());
    }
    failpoint(handler.name(), "before-commit");
    store.commit(tx).await?;
    Ok(outbox)
}

fn apply_one<H: Handler>(
    handler: &mut H,
    tx: &mut Tx<'_>,
    m: &OwnedMessage,
    meta: &RecordMeta,
    group: &str,
    now_ms: i64,
    verify_with: Option<&crate::crypto::mac::EventSigner>,
) -> Result<Vec<Event>, KafkaError> {
    let Some(payload) = m.payload() else {
        if meta.topic.spec().cleanup_policy == "compact" {
            return Ok(vec![]); // a tombstone
        }
        return Ok(vec![dead_letter(m, group, "decode", "record has no value".into())]);
    };
    let event = match Codec::get().decode(payload) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, topic = m.topic(), partition = m.partition(), offset = m.offset(), "undecodable record sent to the dead-letter topic; fix the producer, then re-drive it");
            return Ok(vec![dead_letter(m, group, error.kind(), error.to_string())]);
        }
    };
    if let Some(signer) = verify_with
        && event.kind().service_only()
        && !signer.verify(m.key().unwrap_or_default(), payload, record_mac(m))
    {
        tracing::warn!(
            event_type = event.kind().name(),
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            "an event only this service produces arrived without its valid MAC and was sent to the dead-letter topic; someone else can write to this topic: check the topic ACLs"
        );
        return Ok(vec![dead_letter(
            m,
            group,
            "unauthenticated",
            format!(
                "{} without a valid {} header: not produced by this service (forged or altered), or written by a node with another master key: check that every node has the same SECUREFORMS_MASTER_KEY",
                event.kind().name(),
                crate::crypto::mac::HEADER
            ),
        )]);
    }
    match handler.apply(tx, &event, meta, now_ms) {
        Ok(outputs) => Ok(outputs),
        Err(ApplyError::Unprocessable(reason)) => {
            tracing::warn!(%reason, event_type = event.kind().name(), topic = m.topic(), partition = m.partition(), offset = m.offset(), "record could not be applied and was sent to the dead-letter topic");
            Ok(vec![dead_letter(m, group, "apply", reason)])
        }
        Err(ApplyError::Store(e)) => Err(e.into()),
    }
}

/// The MAC header a record carries, if any.
fn record_mac(m: &OwnedMessage) -> Option<&[u8]> {
    use rdkafka::message::Headers;
    m.headers()?.iter().find(|h| h.key == crate::crypto::mac::HEADER).and_then(|h| h.value)
}

/// The dead-letter record for a message. Its id is derived from where the message sits, so the same
/// failure dead-letters once however often it is re-read. It keeps the record's MAC header, so a
/// re-drive sends back exactly what came (never a new MAC).
fn dead_letter(m: &OwnedMessage, group: &str, kind: &str, reason: String) -> Event {
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

/// Produces committed outbox entries: all sent at once (the idempotent producer keeps their order
/// per partition), then any that failed retried one by one until delivered or shut down.
async fn produce_outbox(
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
async fn drain_outbox(store: &Store, producer: &EventProducer, group: &str) -> Result<(), KafkaError> {
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

    #[test]
    fn offset_keys_separate_groups_topics_and_partitions() {
        assert_ne!(offset_key("g", "t", 1), offset_key("g", "t", 2));
        assert_ne!(offset_key("g1", "t", 1), offset_key("g", "1t", 1));
    }
}
