//! The consumer runtime: runs one [`Handler`] over its topics with exactly-once effects (ADR 0004).
//!
//! Per batch of records:
//! 1. each record is decoded and handed to the handler, which stages state writes in a [`Tx`] and
//!    returns the events it causes; a record that cannot be decoded or applied becomes a DeadLetter;
//! 2. the state, the outputs (one outbox row) and the next offset of every partition are committed
//!    to sled in one atomic, flushed write;
//! 3. the outbox row is produced (idempotent producer, acks=all) and removed, on a task of its own
//!    while the loop reads and applies the next batch; the next batch's outputs go out only after
//!    these are delivered, so outputs keep their causes' order per partition;
//! 4. offsets of delivered batches are committed to Kafka too (lag monitoring, and what was emitted).
//!
//! sled's offsets are the truth: on assignment each partition starts at the offset sled holds (or at
//! the beginning when this node has no state for it, which rebuilds the state by replay), and a
//! record below it is skipped. While rebuilding, records below the group's offset committed in Kafka
//! (committed only after their outputs were delivered) are applied with `replay` set and their
//! outputs dropped, so a rebuild changes state but emits nothing already emitted. A crash anywhere re-runs at most the unfinished batch: its state was
//! not committed, so nothing is applied twice, and outbox entries left from a committed batch are
//! produced again at start with the same event ids (consumers dedupe on them).

//!
//! The rooms: `batch` (apply and commit one batch), `offsets` (sled's offsets, the rebalance context,
//! Kafka's committed offsets), `outbox` (produce what a batch committed), `dead_letter`, `failpoint`
//! (crash injection for tests). This file holds the handler contract and the loop.

mod batch;
mod dead_letter;
pub use dead_letter::{LETTER_COPY_MAX, NOT_COPIED};
mod failpoint;
mod offsets;
mod outbox;
mod placement;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio::sync::watch;

use super::{EventProducer, KafkaError, KafkaSettings};
pub use crate::clock::{Clock, system_clock};
use crate::events::Event;
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;
use batch::process_batch;
use failpoint::failpoint;
pub use offsets::stored_offset;
use offsets::{COMMIT_INTERVAL, OffsetsFromStore, commit_to_kafka, learn_emitted_offsets};
pub use outbox::OutboxEntry;
use outbox::{drain_outbox, produce_outbox};

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

/// Which records of its topics a handler applies on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The partitions the consumer group gives this node (conversation-keyed state: one owner each).
    Partitioned,
    /// Every partition, on every node (state every node needs whole: data keys, ended sessions).
    /// The group is this node's own.
    EveryNode,
}

/// A consumer of events: pure apart from the staged writes it makes in `tx`.
pub trait Handler: Send + Sync + 'static {
    /// Names the consumer group (`<group_prefix>-<name>`, or per node, see [`Scope`]) and the
    /// offsets in sled.
    fn name(&self) -> &'static str;
    fn topics(&self) -> Vec<Topic>;
    /// Partitioned by default.
    fn scope(&self) -> Scope {
        Scope::Partitioned
    }
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
    /// Join as a static member (`group.instance.id`): a restarted node takes its partitions back at
    /// once instead of after its dead session times out. Only for the nodes that serve, and only on
    /// Apache Kafka: passing processes (replay, operations replicas) would leave a membership behind,
    /// and tansu 0.6.0 revokes a static member that returns (ADR 13, 22).
    pub static_membership: bool,
    /// For the consumer of the conversation-keyed topics: their partition count, to move each
    /// chat-bus record to where murmur2 of its conversation id (the Java client's partitioner) puts
    /// it (`placement`).
    pub conversation_partitions: Option<i32>,
}

impl RunContext {
    pub fn new(clock: Clock, verify_with: Option<std::sync::Arc<crate::crypto::mac::EventSigner>>) -> RunContext {
        RunContext {
            clock,
            metrics: std::sync::Arc::new(crate::metrics::Metrics::new()),
            shadow: false,
            verify_with,
            static_membership: false,
            conversation_partitions: None,
        }
    }
}

/// A handler as the runtime runs it: with its store and the name its offsets and outbox are kept
/// under in that store (its `Handler::name` group name; see [`KafkaSettings::handler_group`]).
pub struct Member {
    pub handler: Box<dyn Handler>,
    pub store: Store,
    pub state: String,
}

impl Member {
    pub fn new(handler: Box<dyn Handler>, store: Store, settings: &KafkaSettings) -> Member {
        let state = settings.handler_group(handler.name(), handler.scope());
        Member { handler, store, state }
    }
}

/// Which partitions of the conversation-keyed topics this node's owner consumer holds: partition p
/// of every such topic together (the topics are co-partitioned and the range assignor gives one
/// member the same partition numbers of each). Routing, read-your-writes and readiness read it.
pub struct Ownership {
    owned: std::sync::RwLock<std::collections::BTreeSet<i32>>,
    /// Bumped on every change; the node's announcer waits on it.
    changes: watch::Sender<u64>,
    /// Whether the group has given this node an assignment (possibly empty) since it joined.
    assigned: std::sync::atomic::AtomicBool,
    /// Whether other nodes are known to own every partition (the node directory): only then is an
    /// empty assignment an assignment and not a broken group membership.
    covered_elsewhere: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Set for a consumer that is alone in its group by design (replay, an operations replica): it
    /// holds its share only when it holds all of these partitions.
    expect_all: std::sync::OnceLock<i32>,
}

impl Default for Ownership {
    fn default() -> Ownership {
        Ownership {
            owned: Default::default(),
            changes: watch::channel(0).0,
            assigned: std::sync::atomic::AtomicBool::new(false),
            covered_elsewhere: std::sync::OnceLock::new(),
            expect_all: std::sync::OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership").field("owned", &self.owned()).field("assigned", &self.is_assigned()).finish()
    }
}

impl Ownership {
    pub fn owns(&self, partition: i32) -> bool {
        self.owned.read().map(|o| o.contains(&partition)).unwrap_or(false)
    }

    pub fn owned(&self) -> Vec<i32> {
        self.owned.read().map(|o| o.iter().copied().collect()).unwrap_or_default()
    }

    /// Whether the group has assigned this node its share. No partition at all is a share only
    /// while other nodes are known to own them all (a cluster with more nodes than partitions); else
    /// an empty assignment is a broken membership (seen on tansu 0.6.0, where a stale static member
    /// kept every partition), and the consumer rejoins.
    pub fn is_assigned(&self) -> bool {
        if !self.assigned.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let owned = self.owned();
        match self.expect_all.get() {
            Some(n) => owned.len() == *n as usize,
            None => !owned.is_empty() || self.covered_elsewhere.get().is_some_and(|f| f()),
        }
    }

    /// Makes this a consumer that must hold every one of `partitions` (it is alone in its group).
    pub fn expect_all(&self, partitions: i32) {
        let _ = self.expect_all.set(partitions);
    }

    /// Whether this consumer must hold every partition (see [`Ownership::expect_all`]).
    pub fn is_alone(&self) -> bool {
        self.expect_all.get().is_some()
    }

    /// Tells how to know that other nodes own every partition (from the node directory).
    pub fn set_covered_elsewhere(&self, f: Box<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.covered_elsewhere.set(f);
    }

    /// Counts the changes of ownership: state a node kept in memory for a partition is good only
    /// within the epoch it was written in (the partition may have been elsewhere in between).
    pub fn epoch(&self) -> u64 {
        *self.changes.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(super) fn set(&self, partitions: std::collections::BTreeSet<i32>) {
        if let Ok(mut o) = self.owned.write() {
            *o = partitions;
        }
        self.assigned.store(true, std::sync::atomic::Ordering::SeqCst);
        self.changes.send_modify(|n| *n += 1);
    }

    pub(super) fn release(&self) {
        if let Ok(mut o) = self.owned.write() {
            o.clear();
        }
        self.assigned.store(false, std::sync::atomic::Ordering::SeqCst);
        self.changes.send_modify(|n| *n += 1);
    }
}

/// The loop's own work on one batch, with no broker: decode and authenticate each record, apply it,
/// encode its outputs, and commit state, outbox row and offsets to sled durably. Returns the outputs
/// the batch staged; delivering them (and removing their outbox row) is the caller's. The bench
/// measures this alone to show what the loop costs without Kafka (`benches/pipeline.rs`).
#[allow(clippy::too_many_arguments)] // the loop's per-batch state, as the loop passes it
pub async fn apply_and_commit<H: Handler + ?Sized>(
    settings: &KafkaSettings,
    store: &Store,
    handler: &mut H,
    group: &str,
    batch: &[&rdkafka::message::OwnedMessage],
    now_ms: i64,
    metrics: &crate::metrics::Metrics,
    verify_with: Option<&crate::crypto::mac::EventSigner>,
) -> Result<Vec<OutboxEntry>, KafkaError> {
    let row = process_batch(
        settings,
        store,
        handler,
        group,
        batch,
        &HashMap::new(),
        &Default::default(),
        now_ms,
        metrics,
        verify_with,
    )
    .await?;
    Ok(row.map(|r| r.entries).unwrap_or_default())
}

/// Runs one handler in its own consumer group until `shutdown` turns true (see [`run_together`]).
pub async fn run<H: Handler>(
    settings: KafkaSettings,
    store: Store,
    producer: EventProducer,
    handler: H,
    ctx: RunContext,
    shutdown: watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    let member = Member::new(Box::new(handler), store, &settings);
    let group = member.state.clone();
    run_together(settings, producer, vec![member], group, None, ctx, shutdown).await
}

/// Runs handlers on one consumer in `group` until `shutdown` turns true: every record goes to the
/// members that consume its topic, each applies its share of a batch and commits it to its own
/// store, then their outputs are produced. One consumer, so whoever holds partition p of one of
/// their topics holds partition p of all of them (the node's conversation-keyed state has one
/// owner per partition; `ownership` reports which). Returns an error only for failures it cannot
/// ride out (the node's storage failing); the caller stops the service and says so.
pub async fn run_together(
    settings: KafkaSettings,
    producer: EventProducer,
    mut members: Vec<Member>,
    group: String,
    ownership: Option<std::sync::Arc<Ownership>>,
    ctx: RunContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    let RunContext { clock, metrics, shadow, verify_with, static_membership, conversation_partitions } = ctx;
    let mut placement = placement::Placement::new(settings.names.name(Topic::ChatEvents), conversation_partitions);
    // Outputs of batches committed before a crash go out before anything new is read.
    for m in &members {
        drain_outbox(&m.store, &producer, &m.state).await?;
    }
    let shares: Vec<Share> = members
        .iter()
        .map(|m| Share {
            name: m.handler.name(),
            state: m.state.clone(),
            store: m.store.clone(),
            topics: m.handler.topics().iter().map(|t| settings.names.name(*t)).collect(),
        })
        .collect();
    let mut topic_names: Vec<String> = shares.iter().flat_map(|s| s.topics.iter().cloned()).collect();
    topic_names.sort();
    topic_names.dedup();
    // Partition -> first offset whose outputs are on their way to the brokers (the last batch's,
    // delivered while the next one is applied): the offsets committed to Kafka on a revocation or at
    // stop stay below it, so the next owner sends those outputs again if this node never does.
    let undelivered: Undelivered = Default::default();
    let context = |static_member| OffsetsFromStore {
        undelivered: undelivered.clone(),
        shares: shares.clone(),
        group: group.clone(),
        metrics: metrics.clone(),
        ownership: ownership.clone(),
        awaiting: std::sync::atomic::AtomicBool::new(true),
        held: std::sync::atomic::AtomicUsize::new(0),
        static_member,
    };
    let label = shares.first().map(|s| s.name).unwrap_or("none");
    let mut consumer = subscribe(&settings, &group, label, context(static_membership), &topic_names)?;
    tracing::info!(%group, topics = ?topic_names, handlers = ?shares.iter().map(|s| s.name).collect::<Vec<_>>(), "consumer started");
    let mut watchdog = tokio::time::interval(WATCHDOG_INTERVAL);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_since: Option<std::time::Instant> = None;

    // Partition -> first offset whose outputs were not yet delivered (from Kafka's committed offsets).
    let mut emitted: HashMap<(String, i32), i64> = HashMap::new();
    // Offsets to commit to Kafka (for lag monitoring), at most once per COMMIT_INTERVAL: only of
    // batches whose outputs were delivered.
    let mut to_commit: BTreeMap<(String, i32), i64> = BTreeMap::new();
    // The last batch's outputs, on their way while the next batch is read and applied.
    let mut delivering: Option<Delivery> = None;
    let mut last_commit = std::time::Instant::now();
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // Nothing else to read yet: finish the delivery in flight (its offsets become
            // committable, and an idle node has nothing pending).
            delivered = async { delivering.as_mut().expect("guarded").delivered().await },
                if delivering.is_some() => {
                if let Some(d) = delivering.take() {
                    d.complete(delivered?, &undelivered, &mut to_commit);
                }
                continue;
            }
            m = consumer.recv() => m,
            _ = watchdog.tick() => {
                // A consumer left without an assignment for long (revoked, or never given one) is
                // re-created as a fresh, dynamic member (no group.instance.id). Seen on tansu 0.6.0: a
                // static member that replaced one of a stopped or killed process was revoked and never
                // reassigned, and joining again under the same instance id did not help; and a
                // member that joined beside such a stale one was given nothing. An empty assignment
                // is an assignment only when other nodes own every partition (more nodes than
                // partitions): see `Ownership::is_assigned`.
                let ctx = consumer.context();
                let holding = !ctx.awaiting.load(std::sync::atomic::Ordering::SeqCst)
                    && (ctx.held.load(std::sync::atomic::Ordering::SeqCst) > 0
                        || ownership.as_ref().is_some_and(|o| o.is_assigned()));
                if holding {
                    waiting_since = None;
                } else if waiting_since.get_or_insert_with(std::time::Instant::now).elapsed() >= REJOIN_AFTER {
                    tracing::warn!(%group, secs = REJOIN_AFTER.as_secs(), "consumer had no assignment; re-creating it as a new dynamic member to rejoin the group (check the broker if this repeats)");
                    metrics.consumer_rejoined(label);
                    drop(consumer);
                    consumer = subscribe(&settings, &group, label, context(false), &topic_names)?;
                    waiting_since = None;
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
        // Chat-bus records off their conversation's partition go there first (ADR 27); the
        // members skip them here.
        let Some(moved) = placement.place(&batch, &emitted, &producer, &metrics, &shutdown).await? else {
            tracing::info!(%group, "stopping while a misplaced record was being moved; it is moved at the next start");
            break;
        };
        // Each member applies and commits its share.
        let (mut rows, mut names) = (Vec::with_capacity(members.len()), Vec::with_capacity(members.len()));
        for (member, share) in members.iter_mut().zip(&shares) {
            let mine: Vec<&rdkafka::message::OwnedMessage> =
                batch.iter().filter(|m| share.topics.iter().any(|t| t == m.topic())).collect();
            if mine.is_empty() {
                continue;
            }
            let row = process_batch(
                &settings,
                &member.store,
                member.handler.as_mut(),
                &member.state,
                &mine,
                &emitted,
                &moved,
                clock(),
                &metrics,
                verify_with.as_deref(),
            )
            .await?;
            failpoint(share.name, "after-commit");
            if let Some(row) = row {
                rows.push((member.store.clone(), row));
                names.push(share.name);
            }
        }
        // The previous batch's outputs were delivered while this one was applied; then this
        // batch's go out (after them: per partition, outputs keep the order of their causes).
        if let Some(previous) = delivering.take() {
            previous.finish(&undelivered, &mut to_commit).await?;
        }
        delivering = Some(Delivery::start(&producer, rows, names, &batch, &undelivered, &shutdown));
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            commit_to_kafka(&consumer, std::mem::take(&mut to_commit), CommitMode::Async);
            last_commit = std::time::Instant::now();
        }
    }
    // Outputs in flight are delivered (or, when shutdown cut them short, left in the outbox for the
    // next start) before the final commit.
    if let Some(last) = delivering.take() {
        last.finish(&undelivered, &mut to_commit).await?;
    }

    if let Ok(assignment) = consumer.assignment() {
        // Final synchronous commit so lag reports are exact after a clean stop, and the next owner
        // of these partitions knows what was emitted.
        let tpl = offsets::held_offsets(&shares, &assignment, &undelivered);
        if tpl.count() > 0
            && let Err(error) = consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(%error, %group, "final offset commit failed; sled holds the true offsets");
        }
    }
    if let Some(o) = &ownership {
        o.release();
    }
    for m in &members {
        m.store.flush().await?;
    }
    tracing::info!(%group, "consumer stopped");
    Ok(())
}

/// Partition -> the first offset whose outputs are not known to be delivered.
pub(super) type Undelivered = std::sync::Arc<std::sync::Mutex<BTreeMap<(String, i32), i64>>>;

/// One batch's outputs on their way to the brokers, on a task of their own, so the loop reads and
/// applies the next batch meanwhile (the broker's round trip overlaps the next batch's work instead
/// of adding to it). At most one is in flight: the next batch's outputs go out only after these are
/// delivered, which keeps their order per partition across batches.
struct Delivery {
    task: Option<tokio::task::JoinHandle<Result<bool, KafkaError>>>,
    /// The batch's next offset per partition, committed to Kafka once delivered.
    next: BTreeMap<(String, i32), i64>,
    /// The members whose rows these are.
    names: Vec<&'static str>,
}

impl Delivery {
    /// Sends `rows` (each with its member's store, `names` their members) on a task of its own.
    fn start(
        producer: &EventProducer,
        rows: Vec<(Store, outbox::OutboxRow)>,
        names: Vec<&'static str>,
        batch: &[rdkafka::message::OwnedMessage],
        undelivered: &Undelivered,
        shutdown: &watch::Receiver<bool>,
    ) -> Delivery {
        // Per partition: the batch's first offset and the offset after its last.
        let mut span: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
        for m in batch {
            let e = span.entry((m.topic().to_string(), m.partition())).or_insert((m.offset(), m.offset() + 1));
            *e = (e.0.min(m.offset()), e.1.max(m.offset() + 1));
        }
        let next = span.iter().map(|(k, (_, after))| (k.clone(), *after)).collect();
        if rows.is_empty() {
            return Delivery { task: None, next, names };
        }
        {
            let mut u = undelivered.lock().unwrap_or_else(|p| p.into_inner());
            for (k, (first, _)) in span {
                u.entry(k).and_modify(|e| *e = (*e).min(first)).or_insert(first);
            }
        }
        let (producer, mut shutdown) = (producer.clone(), shutdown.clone());
        let task = tokio::spawn(async move { produce_outbox(&rows, &producer, &mut shutdown).await });
        Delivery { task: Some(task), next, names }
    }

    /// Waits until the outputs are delivered: true, or false when a shutdown came first (what is
    /// left goes out at the next start). Cancel-safe: the task goes on, and a later call waits for it.
    async fn delivered(&mut self) -> Result<bool, KafkaError> {
        let Some(task) = self.task.as_mut() else { return Ok(true) };
        let result = task.await;
        self.task = None;
        match result {
            Ok(delivered) => delivered,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down; the outbox keeps what was not delivered.
            Err(_) => Ok(false),
        }
    }

    /// Waits for the outputs, then [`Delivery::complete`].
    async fn finish(
        mut self,
        undelivered: &Undelivered,
        to_commit: &mut BTreeMap<(String, i32), i64>,
    ) -> Result<(), KafkaError> {
        let delivered = self.delivered().await?;
        self.complete(delivered, undelivered, to_commit);
        Ok(())
    }

    /// Marks the batch's offsets for the next commit to Kafka, once its outputs are delivered.
    fn complete(self, delivered: bool, undelivered: &Undelivered, to_commit: &mut BTreeMap<(String, i32), i64>) {
        if !delivered {
            // The offsets committed to Kafka stay below what is left in the outbox.
            return;
        }
        undelivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for name in &self.names {
            failpoint(name, "after-produce");
        }
        for (k, o) in self.next {
            let e = to_commit.entry(k).or_insert(0);
            *e = (*e).max(o);
        }
    }
}

/// One member as the consumer context sees it.
#[derive(Clone)]
pub(super) struct Share {
    pub(super) name: &'static str,
    pub(super) state: String,
    pub(super) store: Store,
    /// Its topics' names.
    pub(super) topics: Vec<String>,
}

/// How often the run loop checks that its consumer holds partitions, and how long it may hold none
/// before it is re-created. Longer than a rebalance takes (session timeout 10 s).
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(5);
const REJOIN_AFTER: Duration = Duration::from_secs(15);

/// A consumer in `group`, subscribed to `topics`. A static member (`context.static_member`): a
/// restarted node takes its partitions back at once instead of waiting for its dead session to time
/// out (node ids must therefore be unique).
fn subscribe(
    settings: &KafkaSettings,
    group: &str,
    label: &str,
    context: OffsetsFromStore,
    topics: &[String],
) -> Result<StreamConsumer<OffsetsFromStore>, KafkaError> {
    for s in &context.shares {
        context.metrics.set_assigned(s.name, 0);
    }
    let mut config = settings.client_config();
    if context.static_member {
        config.set("group.instance.id", format!("{}-{}", settings.client_id, label));
    }
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Co-partitioned topics, one consumer per node: the range assignor gives a member the same
        // partition numbers of every topic.
        .set("partition.assignment.strategy", "range")
        .set("fetch.wait.max.ms", fetch_wait_ms(settings.kind))
        .set("fetch.error.backoff.ms", "50")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", "1000");
    let consumer: StreamConsumer<OffsetsFromStore> =
        settings.finish(config).create_with_context(context).map_err(|e| settings.client_error(e))?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs).map_err(|e| settings.client_error(e))?;
    Ok(consumer)
}

/// How long the group waits for a silent member before its partitions move: the floor of fail-over
/// time (README, "Running a cluster"). Apache Kafka's lowest allowed by default
/// (`group.min.session.timeout.ms`).
pub const SESSION_TIMEOUT_MS: &str = "6000";

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
