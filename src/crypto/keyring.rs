//! The node's key ring: unwrapped data keys in memory (DashMap, shared by the gateway, the tokenizer
//! and the retrieval API), built from the keys topic. The first DataKeyCreated for an id wins on
//! every node (the topic has one partition, so all nodes see the same order); a DataKeyDestroyed
//! removes the key for good, and a later DataKeyCreated for the same id is ignored.

use std::sync::Arc;

use dashmap::{DashMap, DashSet};

use super::{KeyError, KeyMaterial, MasterKey};
use crate::events::{DataKeyCreated, DataKeyDestroyed};

#[derive(Debug, Clone)]
pub struct DataKey {
    pub id: String,
    pub site: String,
    pub period: String,
    pub generation: i32,
    pub material: KeyMaterial,
}

/// Public facts about a key (`secureforms keys list`); never material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub site: String,
    pub period: String,
    pub generation: i32,
    pub state: &'static str,
}

pub struct KeyRing {
    master: MasterKey,
    keys: DashMap<String, Arc<DataKey>>,
    destroyed: DashSet<String>,
}

impl KeyRing {
    pub fn new(master: MasterKey) -> KeyRing {
        KeyRing { master, keys: DashMap::new(), destroyed: DashSet::new() }
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    /// Applies a DataKeyCreated; returns whether the key was new to the ring.
    pub fn created(&self, e: &DataKeyCreated) -> Result<bool, KeyError> {
        if self.destroyed.contains(&e.key_id) || self.keys.contains_key(&e.key_id) {
            return Ok(false);
        }
        let material = self.master.unwrap_key(&e.key_id, &e.wrapped_key)?;
        self.keys.insert(
            e.key_id.clone(),
            Arc::new(DataKey {
                id: e.key_id.clone(),
                site: e.header.site_id.clone(),
                period: e.period.clone(),
                generation: e.generation,
                material,
            }),
        );
        Ok(true)
    }

    pub fn destroyed(&self, e: &DataKeyDestroyed) {
        self.destroyed.insert(e.key_id.clone());
        self.keys.remove(&e.key_id);
    }

    pub fn get(&self, id: &str) -> Result<Arc<DataKey>, KeyError> {
        if self.destroyed.contains(id) {
            return Err(KeyError::Destroyed(id.to_string()));
        }
        self.keys.get(id).map(|k| k.clone()).ok_or_else(|| KeyError::UnknownKey(id.to_string()))
    }

    /// The newest generation for a site and period: the key new writes use.
    pub fn current(&self, site: &str, period: &str) -> Option<Arc<DataKey>> {
        self.keys
            .iter()
            .filter(|k| k.site == site && k.period == period)
            .max_by_key(|k| k.generation)
            .map(|k| k.clone())
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        let mut out: Vec<KeyInfo> = self
            .keys
            .iter()
            .map(|k| KeyInfo {
                id: k.id.clone(),
                site: k.site.clone(),
                period: k.period.clone(),
                generation: k.generation,
                state: "active",
            })
            .collect();
        out.extend(self.destroyed.iter().map(|id| {
            let (site, period, generation) = super::parse_data_key_id(&id).unwrap_or(("", "", 0));
            KeyInfo { id: id.clone(), site: site.into(), period: period.into(), generation, state: "destroyed" }
        }));
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::data_key_id;
    use crate::events::{EventHeader, EventKind};

    fn created(ring: &KeyRing, site: &str, period: &str, generation: i32, material: &KeyMaterial) -> DataKeyCreated {
        let id = data_key_id(site, period, generation);
        DataKeyCreated {
            header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), 0, site, "", &id),
            wrapped_key: ring.master().wrap(&id, material).unwrap(),
            key_id: id,
            period: period.into(),
            generation,
            master_key_id: ring.master().id().into(),
        }
    }

    fn ring() -> KeyRing {
        KeyRing::new(MasterKey::from_base64(&MasterKey::generate_base64()).unwrap())
    }

    #[test]
    fn the_first_key_for_an_id_wins_and_rotation_moves_new_writes() {
        let r = ring();
        let a = KeyMaterial::random();
        assert!(r.created(&created(&r, "acme", "2026-11", 1, &a)).unwrap());
        assert!(
            !r.created(&created(&r, "acme", "2026-11", 1, &KeyMaterial::random())).unwrap(),
            "a racing second key is ignored"
        );
        let ad: [&[u8]; 1] = [b"x"];
        let sealed = r.get("acme.2026-11.g1").unwrap().material.seal(&ad, b"v").unwrap();
        assert_eq!(sealed, a.seal(&ad, b"v").unwrap(), "the first material is the one in use");
        r.created(&created(&r, "acme", "2026-11", 2, &KeyMaterial::random())).unwrap();
        assert_eq!(r.current("acme", "2026-11").unwrap().generation, 2);
        assert!(r.get("acme.2026-11.g1").is_ok(), "old keys stay readable after rotation");
        assert!(r.current("acme", "2026-12").is_none());
    }

    #[test]
    fn a_destroyed_key_stays_destroyed() {
        let r = ring();
        let e = created(&r, "acme", "2025-01", 1, &KeyMaterial::random());
        r.created(&e).unwrap();
        r.destroyed(&DataKeyDestroyed {
            header: EventHeader::new(EventKind::DataKeyDestroyed, uuid::Uuid::new_v4(), 0, "acme", "", &e.key_id),
            key_id: e.key_id.clone(),
            reason: "retention".into(),
        });
        assert!(matches!(r.get(&e.key_id), Err(KeyError::Destroyed(_))));
        assert!(!r.created(&e).unwrap(), "replaying the creation does not bring it back");
        assert!(r.current("acme", "2025-01").is_none());
        assert!(r.list().iter().any(|k| k.id == e.key_id && k.state == "destroyed"));
    }

    #[test]
    fn a_key_wrapped_by_another_master_is_refused() {
        let r = ring();
        let other = ring();
        let e = created(&other, "acme", "2026-11", 1, &KeyMaterial::random());
        assert!(matches!(r.created(&e), Err(KeyError::Unwrap(..))));
    }
}
