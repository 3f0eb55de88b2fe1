//! The audit log: request handlers record the events they emit for the agent side (FormRetrieved,
//! fresh-key FormReady, KeyRefused) durably on this node before they answer, and a relay task
//! delivers them to Kafka in the order recorded, with their event ids, at least once (ADR 10).
//! One ordered log matters: a retrieval's FormRetrieved must reach the projections before a fresh
//! key issued after it. A retrieve key spent by a granted retrieval is recorded in the same
//! flush, so one-use holds across a crash before the event reaches Kafka.
//!
//! Writes go through one writer task that takes everything queued, writes it, flushes once and
//! then answers every waiting request (group commit). Only that task flushes the audit database:
//! sled 0.34 deadlocked here when hundreds of requests flushed it concurrently.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::events::{Codec, Event};
use crate::kafka::{EventProducer, KafkaError};
use crate::store::{Store, StoreError};

pub mod trees {
    /// sequence (be u64) -> single-object encoded event, until delivered.
    pub const OUTBOX: &str = "audit.outbox";
    /// retrieve key hash -> empty: keys spent on this node.
    pub const SPENT: &str = "audit.spent";
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

/// One queued write: the encoded event, the key it spent, and who to tell once it is durable.
type Write = (Vec<u8>, Option<String>, oneshot::Sender<Result<(), String>>);

pub struct AuditLog {
    outbox: sled::Tree,
    spent: sled::Tree,
    wake: Notify,
    writes: mpsc::Sender<Write>,
}

/// Most writes committed by one flush.
const GROUP: usize = 512;

impl AuditLog {
    /// Opens the log. Run the returned writer (as a service task) for `record` to make progress.
    pub fn open(store: Store) -> Result<(Arc<AuditLog>, AuditWriter), StoreError> {
        let (writes, queue) = mpsc::channel::<Write>(4096);
        let log = Arc::new(AuditLog {
            outbox: store.tree(trees::OUTBOX)?,
            spent: store.tree(trees::SPENT)?,
            wake: Notify::new(),
            writes,
        });
        Ok((log.clone(), AuditWriter { store, queue, log: Arc::downgrade(&log) }))
    }

    async fn write_group(&self, store: &Store, group: &[Write]) -> Result<(), StoreError> {
        for (bytes, spent, _) in group {
            if let Some(h) = spent {
                self.spent.insert(h.as_bytes(), &[][..])?;
            }
            self.outbox.insert(store.generate_id()?.to_be_bytes(), bytes.as_slice())?;
        }
        store.flush().await
    }

    /// Durably records `event` (and the key it spent, if any) before returning.
    pub async fn record(&self, event: &Event, spent_key_hash: Option<&str>) -> Result<(), AuditError> {
        let bytes = Codec::get().encode(event)?;
        let (done, durable) = oneshot::channel();
        let gone = || AuditError::Write("the audit writer stopped".into());
        self.writes.send((bytes, spent_key_hash.map(str::to_string), done)).await.map_err(|_| gone())?;
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
