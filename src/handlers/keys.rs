//! The keys handler: keeps the node's key ring and a wrapped copy of each data key in sled, from the
//! compacted keys topic. Also creates keys (first use of a period, and rotation).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crypto::keyring::DataKey;
use crate::crypto::{KeyError, KeyMaterial, KeyRing, data_key_id};
use crate::events::{Codec, DataKeyCreated, Event, EventHeader, EventKind};
use crate::kafka::{ApplyError, EventProducer, Handler, KafkaError, RecordMeta};
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;

/// key id -> the DataKeyCreated record (wrapped key), single-object encoded.
pub const CREATED_TREE: &str = "keys.created";
/// key id -> empty.
pub const DESTROYED_TREE: &str = "keys.destroyed";

pub struct KeysHandler {
    ring: Arc<KeyRing>,
}

impl KeysHandler {
    pub fn new(ring: Arc<KeyRing>) -> KeysHandler {
        KeysHandler { ring }
    }
}

/// Fills the ring from what this node already has in sled, before any handler starts.
pub fn load_ring(ring: &KeyRing, store: &Store) -> Result<usize, StoreError> {
    for row in store.tree(DESTROYED_TREE)?.iter() {
        let (k, _) = row?;
        let id = String::from_utf8_lossy(&k).to_string();
        ring.destroyed(&crate::events::DataKeyDestroyed {
            header: EventHeader::new(EventKind::DataKeyDestroyed, uuid::Uuid::nil(), 0, "", "", &id),
            key_id: id,
            reason: String::new(),
        });
    }
    let mut n = 0;
    for row in store.tree(CREATED_TREE)?.iter() {
        let (_, v) = row?;
        if let Ok(Event::DataKeyCreated(e)) = Codec::get().decode(&v) {
            match ring.created(&e) {
                Ok(_) => n += 1,
                Err(error) => tracing::error!(%error, key_id = %e.key_id, "stored data key cannot be unwrapped; check SECUREFORMS_MASTER_KEY is the master key this deployment uses"),
            }
        }
    }
    Ok(n)
}

impl Handler for KeysHandler {
    fn name(&self) -> &'static str {
        "keys"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::Keys]
    }

    fn apply(&mut self, tx: &mut Tx<'_>, event: &Event, _meta: &RecordMeta, _now_ms: i64) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::DataKeyCreated(e) => match self.ring.created(e) {
                Ok(true) => {
                    let bytes = Codec::get().encode(event).map_err(|err| ApplyError::Unprocessable(err.to_string()))?;
                    tx.insert(CREATED_TREE, e.key_id.as_bytes().to_vec(), bytes);
                    tracing::info!(key_id = %e.key_id, "data key added to the key ring");
                    Ok(vec![])
                }
                Ok(false) => Ok(vec![]),
                Err(KeyError::Unwrap(id, master)) => Err(ApplyError::Unprocessable(format!(
                    "data key {id} is wrapped by master key {} but this node has {master}; run every node with the same SECUREFORMS_MASTER_KEY",
                    e.master_key_id
                ))),
                Err(other) => Err(ApplyError::Unprocessable(other.to_string())),
            },
            Event::DataKeyDestroyed(e) => {
                self.ring.destroyed(e);
                tx.remove(CREATED_TREE, e.key_id.as_bytes().to_vec());
                tx.insert(DESTROYED_TREE, e.key_id.as_bytes().to_vec(), Vec::new());
                tracing::info!(key_id = %e.key_id, reason = %e.reason, "data key destroyed");
                Ok(vec![])
            }
            other => Err(ApplyError::Unprocessable(format!("{} does not belong on the keys topic", other.kind().name()))),
        }
    }
}

/// Proposes a new data key for a site and period at `generation`, and waits until the key ring holds
/// whichever key for that id won (possibly another node's).
pub async fn create_key(ring: &KeyRing, producer: &EventProducer, site: &str, period: &str, generation: i32, now_ms: i64) -> Result<Arc<DataKey>, KafkaError> {
    let id = data_key_id(site, period, generation);
    let material = KeyMaterial::random();
    let wrapped = ring.master().wrap(&id, &material).map_err(|e| KafkaError::Topic { topic: "keys".into(), message: e.to_string() })?;
    let event = Event::DataKeyCreated(DataKeyCreated {
        header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), now_ms, site, "", &id),
        key_id: id.clone(),
        period: period.to_string(),
        generation,
        master_key_id: ring.master().id().to_string(),
        wrapped_key: wrapped,
    });
    producer.send(&event).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(k) = ring.get(&id) {
            return Ok(k);
        }
        if Instant::now() > deadline {
            return Err(KafkaError::Topic {
                topic: "keys".into(),
                message: format!("data key {id} was produced but not consumed back within 30 s; is the keys handler running?"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The key new writes for a site use now: the newest generation of the current period, created on
/// first use.
pub async fn current_key(ring: &KeyRing, producer: &EventProducer, site: &str, now_ms: i64) -> Result<Arc<DataKey>, KafkaError> {
    let period = crate::crypto::period_of(now_ms);
    if let Some(k) = ring.current(site, &period) {
        return Ok(k);
    }
    create_key(ring, producer, site, &period, 1, now_ms).await
}

/// Rotation: new writes for the site use a new generation from now on; old keys stay readable.
pub async fn rotate(ring: &KeyRing, producer: &EventProducer, site: &str, now_ms: i64) -> Result<Arc<DataKey>, KafkaError> {
    let period = crate::crypto::period_of(now_ms);
    let next = ring.current(site, &period).map(|k| k.generation + 1).unwrap_or(1);
    create_key(ring, producer, site, &period, next, now_ms).await
}
