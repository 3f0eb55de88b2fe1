//! The keys handler: keeps the node's key ring and a wrapped copy of each data key in sled, from the
//! compacted keys topic. Also creates keys (first use of a period, and rotation).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crypto::keyring::{Created, DataKey};
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
                Err(error @ KeyError::UnknownMaster { .. }) => {
                    tracing::warn!(%error, key_id = %e.key_id, "stored data key is wrapped by a master key this node does not have");
                }
                Err(error) => {
                    tracing::error!(%error, key_id = %e.key_id, "stored data key cannot be unwrapped; check SECUREFORMS_MASTER_KEY is the master key this deployment uses")
                }
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

    /// Every node needs every data key: a submission or retrieval on any node may use any key.
    fn scope(&self) -> crate::kafka::runtime::Scope {
        crate::kafka::runtime::Scope::EveryNode
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        _meta: &RecordMeta,
        _now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        match event {
            Event::DataKeyCreated(e) => match self.ring.created(e) {
                Ok(done @ (Created::New | Created::Rewrapped)) => {
                    // The node keeps the newest wrapping only: once the old master key is retired,
                    // no copy here can be opened with it.
                    let bytes = Codec::get().encode(event).map_err(|err| ApplyError::Unprocessable(err.to_string()))?;
                    tx.insert(CREATED_TREE, e.key_id.as_bytes().to_vec(), bytes);
                    if done == Created::New {
                        tracing::info!(key_id = %e.key_id, "data key added to the key ring");
                    } else {
                        tracing::info!(key_id = %e.key_id, master_key_id = %e.master_key_id, "data key re-wrapped by the current master key");
                    }
                    Ok(vec![])
                }
                Ok(Created::Known) => Ok(vec![]),
                // A record of a retired master key (history on a topic that keeps everything) is not
                // an error: a live key comes back through its re-wrapped record.
                Err(error @ KeyError::UnknownMaster { .. }) => {
                    tracing::warn!(%error, "data key record skipped");
                    Ok(vec![])
                }
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
            other => {
                Err(ApplyError::Unprocessable(format!("{} does not belong on the keys topic", other.kind().name())))
            }
        }
    }
}

/// What the keys topic says about one data key: public facts only, never material.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMeta {
    pub key_id: String,
    pub site_id: String,
    pub period: String,
    pub generation: i32,
    /// Empty when the DataKeyCreated is no longer on the topic (compacted after destruction).
    pub master_key_id: String,
    pub created_at: Option<i64>,
    /// Why it was destroyed; `None` while it is active.
    pub destroyed_reason: Option<String>,
}

impl KeyMeta {
    pub fn is_destroyed(&self) -> bool {
        self.destroyed_reason.is_some()
    }
}

/// Folds keys-topic events into key metadata, by key id: the first DataKeyCreated of an id wins (as
/// in the key ring), a DataKeyDestroyed marks it (or stands alone once compaction removed the other).
pub fn key_metadata<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<KeyMeta> {
    let mut keys: std::collections::BTreeMap<String, KeyMeta> = std::collections::BTreeMap::new();
    for event in events {
        match event {
            Event::DataKeyCreated(e) => {
                // A later record of a known key under another master key is a re-wrap: it names the
                // master key now in use. Under the same master it is a racing second key: ignored.
                if let Some(known) = keys.get_mut(&e.key_id) {
                    if known.destroyed_reason.is_none() && known.master_key_id != e.master_key_id {
                        known.master_key_id = e.master_key_id.clone();
                    }
                    continue;
                }
                keys.entry(e.key_id.clone()).or_insert_with(|| KeyMeta {
                    key_id: e.key_id.clone(),
                    site_id: e.header.site_id.clone(),
                    period: e.period.clone(),
                    generation: e.generation,
                    master_key_id: e.master_key_id.clone(),
                    created_at: Some(e.header.occurred_at),
                    destroyed_reason: None,
                });
            }
            Event::DataKeyDestroyed(e) => {
                let meta = keys.entry(e.key_id.clone()).or_insert_with(|| {
                    let (site, period, generation) = crate::crypto::parse_data_key_id(&e.key_id).unwrap_or(("", "", 0));
                    KeyMeta {
                        key_id: e.key_id.clone(),
                        site_id: site.into(),
                        period: period.into(),
                        generation,
                        master_key_id: String::new(),
                        created_at: None,
                        destroyed_reason: None,
                    }
                });
                meta.destroyed_reason = Some(e.reason.clone());
            }
            _ => {}
        }
    }
    keys.into_values().collect()
}

/// Key metadata as the keys topic holds it now (no master key needed).
pub fn read_key_metadata(kafka: &crate::kafka::KafkaSettings) -> Result<Vec<KeyMeta>, KafkaError> {
    use rdkafka::message::Message;
    let records = crate::kafka::reader::read_to_end(kafka, Topic::Keys)?;
    let events: Vec<Event> = records.iter().filter_map(|m| Codec::get().decode(m.payload()?).ok()).collect();
    Ok(key_metadata(&events))
}

/// Why a data key could not be made ready for use.
#[derive(Debug, thiserror::Error)]
pub enum KeyCreationError {
    #[error(transparent)]
    Wrap(#[from] KeyError),
    #[error(transparent)]
    Produce(#[from] KafkaError),
    #[error("data key {0} was produced but not consumed back within 30 s; is the keys handler running?")]
    NotConsumedBack(String),
}

/// Proposes a new data key for a site and period at `generation`, and waits until the key ring holds
/// whichever key for that id won (possibly another node's).
pub async fn create_key(
    ring: &KeyRing,
    producer: &EventProducer,
    site: &str,
    period: &str,
    generation: i32,
    now_ms: i64,
) -> Result<Arc<DataKey>, KeyCreationError> {
    let id = data_key_id(site, period, generation);
    let material = KeyMaterial::random();
    let wrapped = ring.master().wrap(&id, &material)?;
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
            return Err(KeyCreationError::NotConsumedBack(id));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The key new writes for a site use now: the newest generation of the current period, created on
/// first use.
pub async fn current_key(
    ring: &KeyRing,
    producer: &EventProducer,
    site: &str,
    now_ms: i64,
) -> Result<Arc<DataKey>, KeyCreationError> {
    let period = crate::crypto::period_of(now_ms);
    if let Some(k) = ring.current(site, &period) {
        return Ok(k);
    }
    create_key(ring, producer, site, &period, 1, now_ms).await
}

/// Rotation: new writes for the site use a new generation from now on; old keys stay readable.
pub async fn rotate(
    ring: &KeyRing,
    producer: &EventProducer,
    site: &str,
    now_ms: i64,
) -> Result<Arc<DataKey>, KeyCreationError> {
    let period = crate::crypto::period_of(now_ms);
    let next = ring.current(site, &period).map(|k| k.generation + 1).unwrap_or(1);
    create_key(ring, producer, site, &period, next, now_ms).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::DataKeyDestroyed;

    fn created(id: &str, site: &str, period: &str, generation: i32, master: &str) -> Event {
        Event::DataKeyCreated(DataKeyCreated {
            header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), 1_000, site, "", id),
            key_id: id.into(),
            period: period.into(),
            generation,
            master_key_id: master.into(),
            wrapped_key: vec![1, 2, 3],
        })
    }

    fn destroyed(id: &str) -> Event {
        Event::DataKeyDestroyed(DataKeyDestroyed {
            header: EventHeader::new(EventKind::DataKeyDestroyed, uuid::Uuid::new_v4(), 2_000, "", "", id),
            key_id: id.into(),
            reason: "retention".into(),
        })
    }

    #[test]
    fn metadata_keeps_the_first_creation_follows_re_wraps_and_marks_destruction_even_without_it() {
        let events = vec![
            created("acme.2025-01.g1", "acme", "2025-01", 1, "mk-a"),
            created("acme.2025-01.g1", "acme", "2025-01", 1, "mk-a"),
            created("acme.2025-02.g1", "acme", "2025-02", 1, "mk-a"),
            created("acme.2025-02.g1", "acme", "2025-02", 1, "mk-b"),
            destroyed("acme.2025-01.g1"),
            destroyed("old.site.2024-12.g2"),
        ];
        let m = key_metadata(&events);
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].key_id.as_str(), m[0].master_key_id.as_str(), m[0].destroyed_reason.as_deref()),
            ("acme.2025-01.g1", "mk-a", Some("retention"))
        );
        assert!(!m[1].is_destroyed());
        assert_eq!((m[1].master_key_id.as_str(), m[1].created_at), ("mk-b", Some(1_000)), "re-wrapped by mk-b");
        assert_eq!(
            (m[2].site_id.as_str(), m[2].period.as_str(), m[2].generation, m[2].created_at),
            ("old.site", "2024-12", 2, None)
        );
    }

    fn wrapped(master: &crate::crypto::MasterKey, id: &str, material: &KeyMaterial) -> Event {
        Event::DataKeyCreated(DataKeyCreated {
            header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), 1_000, "acme", "", id),
            key_id: id.into(),
            period: "2026-11".into(),
            generation: 1,
            master_key_id: master.id().into(),
            wrapped_key: master.wrap(id, material).unwrap(),
        })
    }

    fn kept_master(g: &crate::handlers::given::Given<KeysHandler>, id: &str) -> String {
        let raw = g.store.tree(CREATED_TREE).unwrap().get(id.as_bytes()).unwrap().unwrap();
        let Ok(Event::DataKeyCreated(k)) = Codec::get().decode(&raw) else { panic!("not a DataKeyCreated") };
        k.master_key_id
    }

    /// A re-wrap replaces the node's stored copy; a record of a master key the node lacks is skipped
    /// (not a dead letter); a destroyed key's stored copy goes.
    #[test]
    fn the_handler_keeps_the_newest_wrapping_and_skips_unknown_masters() {
        use crate::crypto::MasterKey;
        let (old, new) = (
            MasterKey::from_base64(&MasterKey::generate_base64()).unwrap(),
            MasterKey::from_base64(&MasterKey::generate_base64()).unwrap(),
        );
        let stranger = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let ring = Arc::new(KeyRing::with_previous(new.clone(), vec![old.clone()]));
        let material = KeyMaterial::random();
        let mut g = crate::handlers::given::Given::new(KeysHandler::new(ring.clone())).given([wrapped(
            &old,
            "acme.2026-11.g1",
            &material,
        )]);
        assert_eq!(kept_master(&g, "acme.2026-11.g1"), old.id());
        g.when(&wrapped(&new, "acme.2026-11.g1", &material)).unwrap();
        assert_eq!(kept_master(&g, "acme.2026-11.g1"), new.id());
        assert_eq!(ring.get("acme.2026-11.g1").unwrap().master_key_id, new.id());

        assert!(g.when(&wrapped(&stranger, "acme.2026-10.g1", &KeyMaterial::random())).unwrap().is_empty());
        assert!(ring.get("acme.2026-10.g1").is_err());
        assert!(g.store.tree(CREATED_TREE).unwrap().get(b"acme.2026-10.g1").unwrap().is_none());

        g.when(&destroyed("acme.2026-11.g1")).unwrap();
        assert!(g.store.tree(CREATED_TREE).unwrap().get(b"acme.2026-11.g1").unwrap().is_none());
        assert!(g.store.tree(DESTROYED_TREE).unwrap().get(b"acme.2026-11.g1").unwrap().is_some());
    }
}
