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
//! Writes go through one writer task that takes everything queued, writes it, flushes once and
//! then answers every waiting request (group commit). Only that task flushes the audit database:
//! sled 0.34 deadlocked here when hundreds of requests flushed it concurrently.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::events::{AuditLink, Codec, Event, FormRetrieved};
use crate::kafka::{EventProducer, KafkaError};
use crate::store::{Store, StoreError};

pub mod trees {
    /// sequence (be u64) -> single-object encoded event, until delivered.
    pub const OUTBOX: &str = "audit.outbox";
    /// retrieve key hash -> empty: keys spent on this node.
    pub const SPENT: &str = "audit.spent";
    /// `head` -> the last link of this node's chain (JSON: seq and mac).
    pub const CHAIN: &str = "audit.chain";
}

const CHAIN_KEY_LABEL: &[u8] = b"secureforms-audit-chain-v1";

/// Links FormRetrieved records into a per-node chain and checks links.
pub struct AuditChain {
    key: zeroize::Zeroizing<[u8; 32]>,
    node_id: String,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
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
}

/// One queued write: the event, the key it spent, and who to tell once it is durable.
type Write = (Event, Option<String>, oneshot::Sender<Result<(), String>>);

pub struct AuditLog {
    outbox: sled::Tree,
    spent: sled::Tree,
    chain_head: sled::Tree,
    chain: Option<AuditChain>,
    wake: Notify,
    writes: mpsc::Sender<Write>,
}

/// Most writes committed by one flush.
const GROUP: usize = 512;

impl AuditLog {
    /// Opens the log. Run the returned writer (as a service task) for `record` to make progress.
    pub fn open(store: Store, chain: Option<AuditChain>) -> Result<(Arc<AuditLog>, AuditWriter), StoreError> {
        let (writes, queue) = mpsc::channel::<Write>(4096);
        let log = Arc::new(AuditLog {
            outbox: store.tree(trees::OUTBOX)?,
            spent: store.tree(trees::SPENT)?,
            chain_head: store.tree(trees::CHAIN)?,
            chain,
            wake: Notify::new(),
            writes,
        });
        Ok((log.clone(), AuditWriter { store, queue, log: Arc::downgrade(&log) }))
    }

    async fn write_group(&self, store: &Store, group: &[Write]) -> Result<(), AuditError> {
        let mut head: Option<Head> = None;
        for (event, spent, _) in group {
            let mut event = event.clone();
            if let (Some(chain), Event::FormRetrieved(r)) = (&self.chain, &mut event) {
                let current = match head.take() {
                    Some(h) => h,
                    None => self
                        .chain_head
                        .get(b"head")
                        .map_err(StoreError::from)?
                        .and_then(|v| serde_json::from_slice(&v).ok())
                        .unwrap_or_default(),
                };
                let next = chain.link(r, &current)?;
                let encoded = serde_json::to_vec(&next).map_err(|e| AuditError::Write(e.to_string()))?;
                self.chain_head.insert(b"head", encoded).map_err(StoreError::from)?;
                head = Some(next);
            }
            let bytes = Codec::get().encode(&event)?;
            if let Some(h) = spent {
                self.spent.insert(h.as_bytes(), &[][..]).map_err(StoreError::from)?;
            }
            self.outbox.insert(store.generate_id()?.to_be_bytes(), bytes).map_err(StoreError::from)?;
        }
        Ok(store.flush().await?)
    }

    /// Durably records `event` (and the key it spent, if any) before returning.
    pub async fn record(&self, event: &Event, spent_key_hash: Option<&str>) -> Result<(), AuditError> {
        // Refused here, before it is queued, if it cannot be encoded.
        Codec::get().encode(event)?;
        let (done, durable) = oneshot::channel();
        let gone = || AuditError::Write("the audit writer stopped".into());
        self.writes.send((event.clone(), spent_key_hash.map(str::to_string), done)).await.map_err(|_| gone())?;
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

/// The single task that writes and flushes the audit log (group commit).
pub struct AuditWriter {
    store: Store,
    queue: mpsc::Receiver<Write>,
    log: std::sync::Weak<AuditLog>,
}

impl AuditWriter {
    /// Commits queued writes in groups until `stop`, then commits what is still queued and ends.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), KafkaError> {
        loop {
            let first = tokio::select! {
                biased;
                w = self.queue.recv() => match w { Some(w) => w, None => return Ok(()) },
                _ = stop.changed() => {
                    self.queue.close();
                    match self.queue.recv().await { Some(w) => w, None => return Ok(()) }
                }
            };
            let mut group = vec![first];
            while group.len() < GROUP {
                match self.queue.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            let Some(log) = self.log.upgrade() else { return Ok(()) };
            let result = log.write_group(&self.store, &group).await.map_err(|e| e.to_string());
            for (_, _, done) in group {
                let _ = done.send(result.clone());
            }
            log.wake.notify_one();
        }
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
