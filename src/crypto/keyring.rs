//! The node's key ring: unwrapped data keys in memory (DashMap, shared by the gateway, the tokenizer
//! and the retrieval API), built from the keys topic. The first DataKeyCreated for an id wins on
//! every node (the topic has one partition, so all nodes see the same order); a DataKeyDestroyed
//! removes the key for good, and a later DataKeyCreated for the same id is ignored, except a re-wrap:
//! the same key material wrapped by another master key the node holds (ADR 19), which only changes
//! which master key wraps it.

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
    /// The master key whose wrapped copy this node keeps.
    pub master_key_id: String,
    pub material: KeyMaterial,
}

/// What a DataKeyCreated did to the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A key new to the ring.
    New,
    /// A key the ring has, now wrapped by the current master key: keep this record instead.
    Rewrapped,
    /// Nothing: already known (or destroyed), a racing second key, or an older wrapping.
    Known,
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
    /// Master keys used before the current one, while their data keys are re-wrapped.
    previous: Vec<MasterKey>,
    keys: DashMap<String, Arc<DataKey>>,
    destroyed: DashSet<String>,
}

impl KeyRing {
    pub fn new(master: MasterKey) -> KeyRing {
        KeyRing::with_previous(master, Vec::new())
    }

    /// A ring that also opens data keys wrapped by `previous` master keys.
    pub fn with_previous(master: MasterKey, previous: Vec<MasterKey>) -> KeyRing {
        KeyRing { master, previous, keys: DashMap::new(), destroyed: DashSet::new() }
    }

    /// The current master key: new data keys are wrapped by it.
    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    fn master_by_id(&self, id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.master).chain(&self.previous).find(|m| m.id() == id)
    }

    /// Applies a DataKeyCreated. A key wrapped by a master key this node does not hold is
    /// [`KeyError::UnknownMaster`] unless the ring already has it (a retired master's old record).
    pub fn created(&self, e: &DataKeyCreated) -> Result<Created, KeyError> {
        if self.destroyed.contains(&e.key_id) {
            return Ok(Created::Known);
        }
        let existing = self.keys.get(&e.key_id).map(|k| k.clone());
        let Some(master) = self.master_by_id(&e.master_key_id) else {
            if existing.is_some() {
                return Ok(Created::Known);
            }
            return Err(KeyError::UnknownMaster { key_id: e.key_id.clone(), master_key_id: e.master_key_id.clone() });
        };
        if let Some(k) = &existing
            && (k.master_key_id == self.master.id() || master.id() != self.master.id())
        {
            return Ok(Created::Known);
        }
        let material = master.unwrap_key(&e.key_id, &e.wrapped_key)?;
        if let Some(k) = existing {
            // A re-wrap carries the same material; anything else is a racing second key: the first
            // one stays in use.
            if !k.material.same_as(&material) {
                tracing::warn!(key_id = %e.key_id, "a second, different DataKeyCreated for a known data key is ignored; the first one stays in use");
                return Ok(Created::Known);
            }
            self.keys
                .insert(e.key_id.clone(), Arc::new(DataKey { master_key_id: master.id().to_string(), ..(*k).clone() }));
            return Ok(Created::Rewrapped);
        }
        self.keys.insert(
            e.key_id.clone(),
            Arc::new(DataKey {
                id: e.key_id.clone(),
                site: e.header.site_id.clone(),
                period: e.period.clone(),
                generation: e.generation,
                master_key_id: master.id().to_string(),
                material,
            }),
        );
        Ok(Created::New)
    }

    /// Live data keys not yet wrapped by the current master key: what `secureforms keys rewrap`
    /// moves.
    pub fn not_under_current_master(&self) -> Vec<Arc<DataKey>> {
        let mut out: Vec<Arc<DataKey>> =
            self.keys.iter().filter(|k| k.master_key_id != self.master.id()).map(|k| k.clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
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
        assert_eq!(r.created(&created(&r, "acme", "2026-11", 1, &a)).unwrap(), Created::New);
        assert_eq!(
            r.created(&created(&r, "acme", "2026-11", 1, &KeyMaterial::random())).unwrap(),
            Created::Known,
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
        assert_eq!(r.created(&e).unwrap(), Created::Known, "replaying the creation does not bring it back");
        assert!(r.current("acme", "2025-01").is_none());
        assert!(r.list().iter().any(|k| k.id == e.key_id && k.state == "destroyed"));
    }

    #[test]
    fn a_key_wrapped_by_another_master_is_refused() {
        let r = ring();
        let other = ring();
        let e = created(&other, "acme", "2026-11", 1, &KeyMaterial::random());
        assert!(matches!(r.created(&e), Err(KeyError::UnknownMaster { .. })));
        let mut forged = e.clone();
        forged.master_key_id = r.master().id().into();
        assert!(
            matches!(r.created(&forged), Err(KeyError::Unwrap(..))),
            "a record naming our master must open under it"
        );
    }

    /// Rotation: a ring with the new master and the old one as previous opens old keys, takes a
    /// re-wrap of the same material, and ignores a "re-wrap" of other material. Once the old master is
    /// gone, its records are useless: a destroyed key wrapped only by it cannot come back, and a
    /// live key comes from its re-wrapped record.
    #[test]
    fn a_rotated_master_re_wraps_live_keys_and_its_retirement_shreds_the_rest() {
        let old = ring();
        let live = KeyMaterial::random();
        let live_old = created(&old, "acme", "2026-11", 1, &live);
        let gone_old = created(&old, "acme", "2025-10", 1, &KeyMaterial::random());
        let new_master = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let both = KeyRing::with_previous(new_master.clone(), vec![old.master().clone()]);
        assert_eq!(both.created(&live_old).unwrap(), Created::New);
        assert_eq!(both.created(&gone_old).unwrap(), Created::New);
        assert_eq!(both.not_under_current_master().len(), 2);
        let live_new = created(&both, "acme", "2026-11", 1, &live);
        assert_eq!(both.created(&live_new).unwrap(), Created::Rewrapped);
        assert_eq!(both.created(&live_new).unwrap(), Created::Known);
        assert_eq!(both.created(&live_old).unwrap(), Created::Known, "the older wrapping changes nothing");
        let impostor = created(&both, "acme", "2025-10", 1, &KeyMaterial::random());
        assert_eq!(both.created(&impostor).unwrap(), Created::Known, "other material is not a re-wrap");
        assert_eq!(
            both.not_under_current_master().iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            ["acme.2025-10.g1"]
        );

        // The old master retired: every record ever written, replayed in order, gives back the live
        // key only.
        let after = KeyRing::new(new_master);
        assert!(matches!(after.created(&live_old), Err(KeyError::UnknownMaster { .. })));
        assert!(matches!(after.created(&gone_old), Err(KeyError::UnknownMaster { .. })));
        assert_eq!(after.created(&live_new).unwrap(), Created::New);
        let ad: [&[u8]; 1] = [b"x"];
        assert_eq!(
            after.get("acme.2026-11.g1").unwrap().material.seal(&ad, b"v").unwrap(),
            live.seal(&ad, b"v").unwrap()
        );
        assert!(after.get("acme.2025-10.g1").is_err());
    }
}
