//! The audit log: request handlers record the events they emit for the agent side (FormRetrieved,
//! fresh-key FormReady, KeyRefused) durably on this node before they answer, and a relay task
//! delivers them to Kafka in the order recorded, with their event ids, at least once (ADR 10).
//! One ordered log matters: a retrieval's FormRetrieved must reach the projections before a fresh
//! key issued after it. A retrieve key spent by a granted retrieval is recorded in the same
//! flush, so one-use holds across a crash before the event reaches Kafka.
//!
//! FormRetrieved records are linked into a tamper-evident chain per node ([`AuditChain`]): each
//! carries its node, sequence number, the previous link's MAC and its own MAC (HMAC-SHA256, key
//! derived from the master key) over all of that and the record itself. `secureforms audit verify`
//! ([`verify`]) reads `agent-events` and reports an edited record, a gap or a reset.
//!
//! Writes go through one writer thread that takes everything queued, appends it to the journal
//! ([`journal`]) with one `fdatasync`, applies it to the audit store, and then answers every waiting
//! request (group commit). The journal, not a flush of the store, is what makes a write durable
//! (ADR 25): when it is half full the writer syncs the store and starts the journal again, and
//! opening the log replays what the journal holds into the store. Only the writer flushes the audit
//! database: sled 0.34 deadlocked here when hundreds of requests flushed it concurrently.

pub mod journal;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::events::{AuditLink, Codec, Event, FormRetrieved};
use crate::kafka::{EventProducer, KafkaError};
use crate::store::{Store, StoreError};
use journal::{Journal, JournalError};

pub mod trees {
    /// sequence (be u64) -> single-object encoded event, until delivered.
    pub const OUTBOX: &str = "audit.outbox";
    /// retrieve key hash -> empty: keys spent on this node.
    pub const SPENT: &str = "audit.spent";
    /// `head` -> the last link of this node's chain (JSON: seq and mac); `delivered` -> the highest
    /// outbox sequence delivered to Kafka (be u64), so a replayed journal does not send it again.
    pub const CHAIN: &str = "audit.chain";
}

/// The journal's size: about 8,000 audit records between two syncs of the audit store.
pub const JOURNAL_BYTES: u64 = 8 << 20;

const CHAIN_KEY_LABEL: &[u8] = b"secureforms-audit-chain-v1";

/// Links FormRetrieved records into a per-node chain and checks links.
pub struct AuditChain {
    key: zeroize::Zeroizing<[u8; 32]>,
    node_id: String,
}

#[derive(serde::Serialize, serde::Deserialize, Default, Clone)]
struct Head {
    seq: i64,
    mac: String,
}

impl AuditChain {
    pub fn new(integrity: &crate::crypto::IntegrityKey, node_id: &str) -> AuditChain {
        AuditChain { key: integrity.derive(CHAIN_KEY_LABEL), node_id: node_id.to_string() }
    }

    fn mac(&self, node_id: &str, seq: i64, prev: &str, record: &FormRetrieved) -> Result<String, AuditError> {
        use hmac::Mac;
        let unchained = Codec::get().encode(&Event::FormRetrieved(FormRetrieved { chain: None, ..record.clone() }))?;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(self.key.as_ref())
            .map_err(|e| AuditError::Write(e.to_string()))?;
        for part in [node_id.as_bytes(), &seq.to_be_bytes(), prev.as_bytes(), &unchained] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        Ok(hex::encode(mac.finalize().into_bytes()))
    }

    /// Sets `record`'s link after `head` and returns the new head.
    fn link(&self, record: &mut FormRetrieved, head: &Head) -> Result<Head, AuditError> {
        let seq = head.seq + 1;
        let mac = self.mac(&self.node_id, seq, &head.mac, record)?;
        record.chain = Some(AuditLink { node_id: self.node_id.clone(), seq, prev: head.mac.clone(), mac: mac.clone() });
        Ok(Head { seq, mac })
    }

    /// Whether a record's link is the one its node made for it.
    pub fn holds(&self, record: &FormRetrieved) -> bool {
        let Some(link) = &record.chain else { return false };
        self.mac(&link.node_id, link.seq, &link.prev, record)
            .is_ok_and(|m| subtle::ConstantTimeEq::ct_eq(m.as_bytes(), link.mac.as_bytes()).into())
    }
}

/// What `secureforms audit verify` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// node -> (records, first seq, last seq)
    pub nodes: std::collections::BTreeMap<String, (usize, i64, i64)>,
    /// FormRetrieved records without a link (written before chains, or not by this service).
    pub unchained: usize,
    pub problems: Vec<String>,
}

/// Checks every chain in `records` end to end: each link's MAC, then per node a contiguous run of
/// sequence numbers from 1 in which each link names the one before. Identical copies (the relay
/// delivers at least once) count once.
pub fn verify(chain: &AuditChain, records: impl IntoIterator<Item = FormRetrieved>) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut by_node: std::collections::BTreeMap<String, std::collections::BTreeMap<i64, FormRetrieved>> =
        Default::default();
    for r in records {
        let Some(link) = r.chain.clone() else {
            report.unchained += 1;
            continue;
        };
        if !chain.holds(&r) {
            report.problems.push(format!(
                "node {} seq {}: the record was altered (or its link forged): its MAC does not match",
                link.node_id, link.seq
            ));
            continue;
        }
        let seqs = by_node.entry(link.node_id.clone()).or_default();
        match seqs.get(&link.seq) {
            Some(seen) if *seen != r => report.problems.push(format!(
                "node {} seq {}: two different records claim this place (the node's audit store was reset or copied)",
                link.node_id, link.seq
            )),
            _ => {
                seqs.insert(link.seq, r);
            }
        }
    }
    for (node, seqs) in by_node {
        let (first, last) = (*seqs.keys().next().unwrap_or(&0), *seqs.keys().last().unwrap_or(&0));
        report.nodes.insert(node.clone(), (seqs.len(), first, last));
        if first > 1 {
            report.problems.push(format!("node {node}: seq 1 to {} missing (deleted from the topic?)", first - 1));
        }
        let mut prev: Option<(i64, String)> = None;
        for (seq, r) in &seqs {
            let link = r.chain.as_ref().expect("only linked records are kept");
            if let Some((p, mac)) = &prev {
                if *seq != p + 1 {
                    report.problems.push(format!("node {node}: seq {} to {} missing (a gap)", p + 1, seq - 1));
                } else if link.prev != *mac {
                    report.problems.push(format!("node {node} seq {seq}: does not follow seq {p} (chain broken)"));
                }
            } else if *seq == 1 && !link.prev.is_empty() {
                report.problems.push(format!("node {node} seq 1: names a predecessor"));
            }
            prev = Some((*seq, link.mac.clone()));
        }
    }
    report
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] crate::events::CodecError),
    #[error("the audit log could not be written: {0}")]
    Write(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// One queued write: the event, the key it spent, and who to tell once it is durable.
type Write = (Event, Option<String>, oneshot::Sender<Result<(), String>>);

/// What the writer thread is asked to do.
enum Msg {
    Write(Box<Write>),
    /// Write what was queued before this, sync the store and end.
    Stop,
}

/// One audit write as the journal holds it: everything the store gets from it.
struct Entry {
    /// Its outbox sequence.
    id: u64,
    spent: Option<String>,
    /// The chain's head after it, if it is a linked FormRetrieved.
    head: Option<Vec<u8>>,
    /// The single-object encoded event.
    event: Vec<u8>,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let spent = self.spent.as_deref().unwrap_or("").as_bytes();
        let head = self.head.as_deref().unwrap_or(&[]);
        let mut out = Vec::with_capacity(12 + spent.len() + head.len() + self.event.len());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&(spent.len() as u16).to_be_bytes());
        out.extend_from_slice(spent);
        out.extend_from_slice(&(head.len() as u16).to_be_bytes());
        out.extend_from_slice(head);
        out.extend_from_slice(&self.event);
        out
    }

    fn decode(raw: &[u8]) -> Option<Entry> {
        let id = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let (spent, rest) = take16(raw.get(8..)?)?;
        let (head, event) = take16(rest)?;
        Some(Entry {
            id,
            spent: (!spent.is_empty()).then(|| String::from_utf8_lossy(spent).into_owned()),
            head: (!head.is_empty()).then(|| head.to_vec()),
            event: event.to_vec(),
        })
    }

    /// Marks the key it spent in the audit store (not flushed: the journal holds it until the
    /// next sync).
    fn mark_spent(&self, log: &AuditLog) -> Result<(), StoreError> {
        if let Some(h) = &self.spent {
            log.spent.insert(h.as_bytes(), &[][..])?;
        }
        Ok(())
    }

    /// Puts its outbox row (unless `delivered` says Kafka has it) and the chain head it leaves in
    /// the audit store, not flushed either.
    fn store(&self, log: &AuditLog, delivered: Option<u64>) -> Result<(), StoreError> {
        if let Some(head) = &self.head {
            log.chain_head.insert(b"head", head.as_slice())?;
        }
        if delivered.is_none_or(|d| self.id > d) {
            log.outbox.insert(self.id.to_be_bytes(), self.event.as_slice())?;
        }
        Ok(())
    }
}

/// Puts appended entries, whose spent keys are marked already, in the audit store (not flushed:
/// the journal holds them until the next checkpoint), where the relay and a restarted node find
/// them.
fn apply_group(log: &AuditLog, entries: &[Entry]) -> Result<(), StoreError> {
    entries.iter().try_for_each(|e| e.store(log, None))
}

fn take16(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_be_bytes(raw.get(..2)?.try_into().ok()?) as usize;
    Some((raw.get(2..2 + len)?, raw.get(2 + len..)?))
}

pub struct AuditLog {
    outbox: sled::Tree,
    spent: sled::Tree,
    chain_head: sled::Tree,
    chain: Option<AuditChain>,
    wake: Notify,
    writes: mpsc::Sender<Msg>,
}

/// Most writes committed by one flush.
const GROUP: usize = 512;

impl AuditLog {
    /// Opens the log, with its journal at `journal` (created if missing). What the journal holds
    /// from before a crash is applied to the store and synced first. Run the returned writer (as a
    /// service task) for `record` to make progress.
    pub fn open(
        store: Store,
        journal: &std::path::Path,
        chain: Option<AuditChain>,
    ) -> Result<(Arc<AuditLog>, AuditWriter), AuditError> {
        let (writes, queue) = mpsc::channel::<Msg>(4096);
        let log = Arc::new(AuditLog {
            outbox: store.tree(trees::OUTBOX)?,
            spent: store.tree(trees::SPENT)?,
            chain_head: store.tree(trees::CHAIN)?,
            chain,
            wake: Notify::new(),
            writes: writes.clone(),
        });
        let (mut journal_file, found) = Journal::open(journal, JOURNAL_BYTES)?;
        if !found.is_empty() {
            let delivered = log.delivered()?;
            for raw in &found {
                let entry = Entry::decode(raw).ok_or_else(|| {
                    AuditError::Write(format!(
                        "an entry of the audit journal {} passed its checksum but does not decode (written by another version?); start the version that wrote it, or restore state/audit and state/audit.journal together from a backup",
                        journal.display()
                    ))
                })?;
                entry.mark_spent(&log)?;
                entry.store(&log, delivered)?;
            }
            tracing::info!(records = found.len(), "audit records replayed from the journal into the audit store");
        }
        store.flush_blocking()?;
        journal_file.restart()?;
        let head = log.head()?;
        Ok((
            log.clone(),
            AuditWriter {
                store,
                queue,
                stopper: Some(writes),
                log: Arc::downgrade(&log),
                journal: journal_file,
                head,
                metrics: None,
            },
        ))
    }

    fn head(&self) -> Result<Head, StoreError> {
        Ok(self.chain_head.get(b"head")?.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default())
    }

    /// The highest outbox sequence delivered to Kafka, as far as the store knows (sequences start
    /// at 0).
    fn delivered(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.chain_head.get(b"delivered")?.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Durably records `event` (and the key it spent, if any) before returning.
    pub async fn record(&self, event: &Event, spent_key_hash: Option<&str>) -> Result<(), AuditError> {
        // Refused here, before it is queued, if it cannot be encoded.
        Codec::get().encode(event)?;
        let (done, durable) = oneshot::channel();
        let gone = || AuditError::Write("the audit writer stopped".into());
        self.writes
            .send(Msg::Write(Box::new((event.clone(), spent_key_hash.map(str::to_string), done))))
            .await
            .map_err(|_| gone())?;
        durable.await.map_err(|_| gone())?.map_err(AuditError::Write)
    }

    pub fn is_spent(&self, key_hash: &str) -> bool {
        self.spent.contains_key(key_hash.as_bytes()).unwrap_or(false)
    }

    /// Events recorded but not yet delivered.
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// Delivers recorded events to Kafka, oldest first, until `stop`; retries on failure.
    pub async fn relay(
        self: Arc<Self>,
        producer: EventProducer,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), KafkaError> {
        loop {
            let batch: Vec<(sled::IVec, sled::IVec)> = self.outbox.iter().take(500).filter_map(Result::ok).collect();
            if batch.is_empty() {
                tokio::select! {
                    biased;
                    _ = stop.changed() => return Ok(()),
                    _ = self.wake.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            let events: Vec<Option<Event>> = batch.iter().map(|(_, v)| Codec::get().decode(v).ok()).collect();
            let sends = events.iter().map(|e| async {
                match e {
                    Some(e) => producer.send(e).await.map(|_| ()),
                    None => Ok(()),
                }
            });
            let results = futures::future::join_all(sends).await;
            let mut failed = false;
            for ((k, _), r) in batch.iter().zip(results) {
                match r {
                    Ok(()) => {
                        // Delivered in order: the mark says everything up to here is.
                        self.chain_head.insert(b"delivered", k).map_err(StoreError::from)?;
                        self.outbox.remove(k).map_err(StoreError::from)?;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "audit event not delivered yet; retrying (check the brokers)");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                tokio::select! {
                    biased;
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// The single writer of the audit log (group commit), on a thread of its own: a request waits for
/// its group's one journal write, never for a busy async worker.
pub struct AuditWriter {
    store: Store,
    queue: mpsc::Receiver<Msg>,
    /// Tells the thread to stop. Held by `run`, not by the thread: once the log and `run` are both
    /// gone, the queue closes and the thread ends, releasing the store.
    stopper: Option<mpsc::Sender<Msg>>,
    log: std::sync::Weak<AuditLog>,
    journal: Journal,
    /// The chain's last link, as the journal and the store have it.
    head: Head,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl AuditWriter {
    /// Reports the journal's write times and checkpoints in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> AuditWriter {
        self.metrics = Some(metrics);
        self
    }

    /// Commits queued writes in groups until `stop`, then commits what is still queued, syncs the
    /// store (leaving the journal empty) and ends.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), AuditError> {
        let stopper = self.stopper.take().expect("a writer runs once");
        let (ended, thread_end) = oneshot::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let _ = ended.send(self.run_blocking());
            })
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer thread: {e}")))?;
        let panicked = |_| Err(AuditError::Write("the audit writer thread panicked".into()));
        let mut thread_end = std::pin::pin!(thread_end);
        tokio::select! {
            r = &mut thread_end => return r.unwrap_or_else(panicked),
            _ = stop.changed() => {}
        }
        let _ = stopper.send(Msg::Stop).await;
        thread_end.await.unwrap_or_else(panicked)
    }

    fn run_blocking(mut self) -> Result<(), AuditError> {
        loop {
            let first = match self.queue.blocking_recv() {
                Some(Msg::Write(w)) => *w,
                Some(Msg::Stop) => {
                    // Writes queued after this are still answered, then the queue is empty for good.
                    self.queue.close();
                    continue;
                }
                None => break,
            };
            let mut group = vec![first];
            while group.len() < GROUP {
                match self.queue.try_recv() {
                    Ok(Msg::Write(w)) => group.push(*w),
                    Ok(Msg::Stop) => self.queue.close(),
                    Err(_) => break,
                }
            }
            let Some(log) = self.log.upgrade() else { break };
            let appended = self.append_group(&log, &group);
            let result = appended.as_ref().map(|_| ()).map_err(|e| e.to_string());
            if let Err(error) = &result {
                tracing::error!(%error, records = group.len(), "audit records not written; their requests are refused (check the data directory's disk)");
            }
            // Durable, and the keys spent are marked: answered now; the rest goes to the store after.
            for (_, _, done) in group {
                let _ = done.send(result.clone());
            }
            if let Ok(entries) = appended
                && let Err(error) = apply_group(&log, &entries)
            {
                tracing::error!(%error, records = entries.len(), "audit records are durable in the journal but not in the audit store; they reach Kafka after a restart of this node (check the data directory's disk)");
            }
            log.wake.notify_one();
            if self.journal.used() > self.journal.capacity() / 2
                && let Err(error) = self.checkpoint()
            {
                tracing::error!(%error, "cannot sync the audit store; the journal keeps the records meanwhile (check the data directory's disk)");
            }
        }
        self.checkpoint()
    }

    /// The group in the journal: durable once this returns. [`apply_group`] then puts it in the
    /// store.
    fn append_group(&mut self, log: &AuditLog, group: &[Write]) -> Result<Vec<Entry>, AuditError> {
        let mut head = self.head.clone();
        let mut entries = Vec::with_capacity(group.len());
        for (event, spent, _) in group {
            let mut event = event.clone();
            let mut linked = None;
            if let (Some(chain), Event::FormRetrieved(r)) = (&log.chain, &mut event) {
                head = chain.link(r, &head)?;
                linked = Some(serde_json::to_vec(&head).map_err(|e| AuditError::Write(e.to_string()))?);
            }
            entries.push(Entry {
                id: self.store.generate_id()?,
                spent: spent.clone(),
                head: linked,
                event: Codec::get().encode(&event)?,
            });
        }
        let payloads: Vec<Vec<u8>> = entries.iter().map(Entry::encode).collect();
        if !self.journal.fits(&payloads) || self.journal.failed() {
            self.checkpoint()?;
        }
        let started = std::time::Instant::now();
        self.journal.append(&payloads)?;
        if let Some(m) = &self.metrics {
            m.audit_journal_write.observe(started.elapsed().as_secs_f64());
        }
        self.head = head;
        entries.iter().try_for_each(|e| e.mark_spent(log))?;
        Ok(entries)
    }

    /// Syncs the store, then empties the journal: what it held is durable in the store (the
    /// writer applies each group before it takes the next).
    /// After a failed journal write, this is what lets the journal take writes again.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        if self.journal.used() == 0 && !self.journal.failed() {
            return Ok(());
        }
        self.store.flush_blocking()?;
        self.journal.restart()?;
        if let Some(m) = &self.metrics {
            m.audit_checkpoints.inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventHeader, EventKind};

    fn chain() -> AuditChain {
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        AuditChain::new(&crate::crypto::IntegrityKey::from_master(&master), "node-a")
    }

    fn records(chain: &AuditChain, n: usize) -> Vec<FormRetrieved> {
        let mut head = Head::default();
        (0..n)
            .map(|i| {
                let mut r = FormRetrieved {
                    header: EventHeader::new(
                        EventKind::FormRetrieved,
                        uuid::Uuid::new_v4(),
                        1_000 + i as i64,
                        "acme",
                        "c",
                        "f",
                    ),
                    form_id: "f".into(),
                    submission_id: format!("s-{i}"),
                    agent_id: "alice".into(),
                    session_id: None,
                    outcome: "denied".into(),
                    reason: "key_spent".into(),
                    chain: None,
                };
                head = chain.link(&mut r, &head).unwrap();
                r
            })
            .collect()
    }

    fn retrieved(i: usize) -> Event {
        Event::FormRetrieved(FormRetrieved {
            header: EventHeader::new(EventKind::FormRetrieved, uuid::Uuid::new_v4(), 1_000, "acme", "c", "f"),
            form_id: "f".into(),
            submission_id: format!("s-{i}"),
            agent_id: "alice".into(),
            session_id: None,
            outcome: "granted".into(),
            reason: String::new(),
            chain: None,
        })
    }

    fn outbox_events(log: &AuditLog) -> Vec<(u64, FormRetrieved)> {
        log.outbox
            .iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                let Event::FormRetrieved(e) = Codec::get().decode(&v).unwrap() else { panic!("not a FormRetrieved") };
                (u64::from_be_bytes(k.as_ref().try_into().unwrap()), e)
            })
            .collect()
    }

    #[tokio::test]
    async fn records_are_durable_linked_and_spent_and_a_stop_leaves_the_journal_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (store_at, journal_at) = (dir.path().join("audit"), dir.path().join("audit.journal"));
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        let node_chain = || AuditChain::new(&crate::crypto::IntegrityKey::from_master(&master), "node-a");
        {
            let store = Store::open(&store_at).unwrap();
            let (log, writer) = AuditLog::open(store, &journal_at, Some(node_chain())).unwrap();
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(writer.run(stopped));
            let recorded = (0..20).map(|i| {
                let log = log.clone();
                async move { log.record(&retrieved(i), Some(&format!("hash-{i}"))).await }
            });
            for r in futures::future::join_all(recorded).await {
                r.unwrap();
            }
            assert!(log.is_spent("hash-7"), "a key is spent once its record is durable");
            let _ = stop.send(true);
            task.await.unwrap().unwrap();
            let err = log.record(&retrieved(99), None).await.unwrap_err();
            assert!(err.to_string().contains("stopped"), "{err}");
        }
        let (_, left) = Journal::open(&journal_at, JOURNAL_BYTES).unwrap();
        assert!(left.is_empty(), "a clean stop syncs the store and empties the journal");
        let store = Store::open(&store_at).unwrap();
        let (log, _writer) = AuditLog::open(store, &journal_at, Some(node_chain())).unwrap();
        let events = outbox_events(&log);
        assert_eq!(events.len(), 20);
        assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "outbox in the order recorded");
        let seqs: Vec<i64> = events.iter().map(|(_, e)| e.chain.as_ref().unwrap().seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "one chain, no gap");
        let report = verify(&node_chain(), events.into_iter().map(|(_, e)| e));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(log.head().unwrap().seq, 20);
    }

    #[test]
    fn a_write_the_disk_refuses_spends_nothing_links_nothing_and_the_next_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("audit")).unwrap();
        let (log, mut writer) = AuditLog::open(store, &dir.path().join("audit.journal"), Some(chain())).unwrap();
        let group = |i: usize| {
            let (done, _) = oneshot::channel();
            vec![(retrieved(i), Some(format!("hash-{i}")), done)]
        };
        writer.journal.fail_writes();
        let Err(err) = writer.append_group(&log, &group(1)) else { panic!("the disk refused the write") };
        assert!(err.to_string().contains("check the disk"), "{err}");
        assert!(!log.is_spent("hash-1"), "not durable, so not spent: the agent may use the key again");
        assert_eq!(log.pending(), 0, "nothing to relay");
        writer.journal.heal();
        let entries = writer.append_group(&log, &group(1)).unwrap();
        apply_group(&log, &entries).unwrap();
        assert!(log.is_spent("hash-1"));
        let events = outbox_events(&log);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1.chain.as_ref().unwrap().seq, 1, "the refused write took no place in the chain: no gap");
    }

    #[test]
    fn records_whose_sync_failed_are_never_replayed_and_the_journal_starts_again_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store_at, journal_at) = (dir.path().join("audit"), dir.path().join("audit.journal"));
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let group = |ids: &[usize]| {
            ids.iter()
                .map(|&i| {
                    let (done, _) = oneshot::channel();
                    (retrieved(i), Some(format!("hash-{i}")), done)
                })
                .collect::<Vec<Write>>()
        };
        {
            let store = Store::open(&store_at).unwrap();
            let (log, writer) = AuditLog::open(store, &journal_at, Some(chain())).unwrap();
            let mut writer = writer.with_metrics(metrics.clone());
            // The write reaches the page cache, its fdatasync fails: the two requests are refused.
            writer.journal.fail_syncs();
            let err = writer.append_group(&log, &group(&[1, 11])).err().expect("the sync failed");
            assert!(err.to_string().contains("check the disk"), "{err}");
            writer.journal.heal();
            assert!(!log.is_spent("hash-1") && !log.is_spent("hash-11"));
            // The next group is the size of the refused group's first record: written over it, in
            // the same generation, it would end where the refused second record starts.
            let entries = writer.append_group(&log, &group(&[2])).unwrap();
            apply_group(&log, &entries).unwrap();
            assert_eq!(metrics.audit_checkpoints.get(), 1, "the store was synced and the journal started again first");
            // The node dies here, without a clean stop.
        }
        let (log, _writer) = AuditLog::open(Store::open(&store_at).unwrap(), &journal_at, Some(chain())).unwrap();
        assert!(log.is_spent("hash-2"));
        assert!(!log.is_spent("hash-1") && !log.is_spent("hash-11"), "refused records are not replayed");
        let events = outbox_events(&log);
        assert_eq!(events.len(), 1, "one audit record: the one acknowledged");
        assert_eq!(events[0].1.chain.as_ref().unwrap().seq, 1);
    }

    #[tokio::test]
    async fn a_writer_abandoned_with_its_log_ends_and_lets_the_store_open_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store_at, journal_at) = (dir.path().join("audit"), dir.path().join("audit.journal"));
        let (log, writer) = AuditLog::open(Store::open(&store_at).unwrap(), &journal_at, None).unwrap();
        let (_stop, stopped) = watch::channel(false);
        let task = tokio::spawn(writer.run(stopped));
        log.record(&retrieved(1), Some("hash-1")).await.unwrap();
        // A service dropped without being stopped: its tasks aborted, its node gone.
        task.abort();
        let _ = task.await;
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let store = loop {
            match Store::open(&store_at) {
                Ok(store) => break store,
                Err(e) => assert!(std::time::Instant::now() < deadline, "the writer thread still holds the store: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let (log, _writer) = AuditLog::open(store, &journal_at, None).unwrap();
        assert!(log.is_spent("hash-1"), "what it wrote before it ended is there");
    }

    #[tokio::test]
    async fn a_half_full_journal_syncs_the_store_and_starts_again_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (store_at, journal_at) = (dir.path().join("audit"), dir.path().join("audit.journal"));
        let metrics = Arc::new(crate::metrics::Metrics::new());
        // Records until the journal has been started again at least once, then one more chunk.
        let mut n = 0;
        {
            let (log, writer) = AuditLog::open(Store::open(&store_at).unwrap(), &journal_at, Some(chain())).unwrap();
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(writer.with_metrics(metrics.clone()).run(stopped));
            let mut after_checkpoint = 0;
            while after_checkpoint < 2 {
                assert!(n < 200_000, "no checkpoint after {n} records");
                let recorded = (n..n + 500).map(|i| {
                    let log = log.clone();
                    async move { log.record(&retrieved(i), None).await }
                });
                for r in futures::future::join_all(recorded).await {
                    r.unwrap();
                }
                n += 500;
                if metrics.audit_checkpoints.get() >= 1 {
                    after_checkpoint += 1;
                }
            }
            let text = metrics.render();
            let timed: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("secureforms_audit_journal_write_seconds_count "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
            assert!(timed >= 1.0, "every group's write is timed:\n{text}");
            let _ = stop.send(true);
            task.await.unwrap().unwrap();
        }
        let (log, _writer) = AuditLog::open(Store::open(&store_at).unwrap(), &journal_at, None).unwrap();
        let seqs: Vec<i64> = outbox_events(&log).iter().map(|(_, e)| e.chain.as_ref().unwrap().seq).collect();
        assert_eq!(seqs, (1..=n as i64).collect::<Vec<_>>(), "every record, once, in order, across the checkpoints");
    }

    #[test]
    fn a_journal_entry_that_does_not_decode_stops_the_log_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let journal_at = dir.path().join("audit.journal");
        let (mut j, _) = Journal::open(&journal_at, JOURNAL_BYTES).unwrap();
        j.append(&[vec![1, 2, 3]]).unwrap();
        drop(j);
        let store = Store::open(&dir.path().join("audit")).unwrap();
        let Err(err) = AuditLog::open(store, &journal_at, None) else { panic!("an undecodable entry is not skipped") };
        let text = err.to_string();
        assert!(text.contains("does not decode") && text.contains("from a backup"), "{text}");
    }

    #[tokio::test]
    async fn the_journal_of_a_crashed_node_is_replayed_and_what_was_delivered_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store_at, journal_at) = (dir.path().join("audit"), dir.path().join("audit.journal"));
        let encode = |id: u64, spent: Option<&str>, seq: i64| {
            let head = Head { seq, mac: format!("mac-{seq}") };
            Entry {
                id,
                spent: spent.map(str::to_string),
                head: Some(serde_json::to_vec(&head).unwrap()),
                event: Codec::get().encode(&retrieved(id as usize)).unwrap(),
            }
            .encode()
        };
        {
            // What a node that died after answering leaves: records in the journal, the store
            // never synced, and the relay's mark at the first record.
            let store = Store::open(&store_at).unwrap();
            store.tree(trees::CHAIN).unwrap().insert(b"delivered", &5u64.to_be_bytes()[..]).unwrap();
            store.flush_blocking().unwrap();
            let (mut j, _) = Journal::open(&journal_at, JOURNAL_BYTES).unwrap();
            j.append(&[encode(5, Some("k5"), 1), encode(6, Some("k6"), 2), encode(7, None, 3)]).unwrap();
        }
        let store = Store::open(&store_at).unwrap();
        let (log, _writer) = AuditLog::open(store.clone(), &journal_at, None).unwrap();
        assert!(log.is_spent("k5") && log.is_spent("k6"), "spent keys come back from the journal");
        let ids: Vec<u64> = outbox_events(&log).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![6, 7], "record 5 was delivered before the crash; 6 and 7 go out");
        assert_eq!(log.head().unwrap().seq, 3, "the chain continues after the last replayed link");
        let (_, left) = Journal::open(&journal_at, JOURNAL_BYTES).unwrap();
        assert!(left.is_empty(), "replayed, synced, and the journal started again");
        assert!(Entry::decode(&[1, 2, 3]).is_none(), "a short entry does not decode");
    }

    #[test]
    fn an_intact_chain_verifies_and_duplicates_count_once() {
        let c = chain();
        let mut rs = records(&c, 5);
        rs.push(rs[2].clone());
        let report = verify(&c, rs);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.nodes["node-a"], (5, 1, 5));
    }

    #[test]
    fn an_edit_a_gap_a_lost_start_and_a_reset_are_each_reported() {
        let c = chain();
        let rs = records(&c, 5);
        let mut edited = rs.clone();
        edited[1].outcome = "granted".into();
        let p = verify(&c, edited).problems;
        assert!(p.iter().any(|m| m.contains("seq 2") && m.contains("altered")), "{p:?}");

        let mut gap = rs.clone();
        gap.remove(2);
        let p = verify(&c, gap).problems;
        assert!(p.iter().any(|m| m.contains("seq 3 to 3 missing")), "{p:?}");

        let p = verify(&c, rs[2..].to_vec()).problems;
        assert!(p.iter().any(|m| m.contains("seq 1 to 2 missing")), "{p:?}");

        let mut reset = rs.clone();
        reset.extend(records(&c, 1));
        let p = verify(&c, reset).problems;
        assert!(p.iter().any(|m| m.contains("two different records")), "{p:?}");

        let stranger = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        let other = AuditChain::new(&crate::crypto::IntegrityKey::from_master(&stranger), "node-a");
        assert!(!other.holds(&rs[0]), "a link made with another master key does not hold");
        let mut unchained = rs[0].clone();
        unchained.chain = None;
        assert_eq!(verify(&c, vec![unchained]).unchained, 1);
    }
}
