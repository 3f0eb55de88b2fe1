//! Off-the-record answers (CVV and any question marked so): held in this node's memory only, for a
//! short configurable time, zeroized when dropped or expired. Never written to Kafka, sled or logs.
//! When they have expired, the agent must resend the form.

use std::collections::BTreeMap;
use std::fmt;

use dashmap::DashMap;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// One answer in clear; zeroized on drop; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

struct Held {
    answers: BTreeMap<String, Secret>,
    expires_at: i64,
}

/// What a retrieval finds for the off-the-record questions of a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffRecord {
    /// Still in memory.
    Present(BTreeMap<String, Secret>),
    /// Gone (expired, node restarted, or held by another node): the agent must resend the form.
    Expired,
}

#[derive(Default)]
pub struct OffRecordStore {
    held: DashMap<uuid::Uuid, Held>,
}

impl OffRecordStore {
    pub fn new() -> OffRecordStore {
        OffRecordStore::default()
    }

    pub fn hold(&self, submission: uuid::Uuid, answers: BTreeMap<String, Secret>, expires_at: i64) {
        if !answers.is_empty() {
            self.held.insert(submission, Held { answers, expires_at });
        }
    }

    /// The answers if still fresh at `now_ms`; expired ones are dropped (and zeroized) on the way.
    pub fn get(&self, submission: &uuid::Uuid, now_ms: i64) -> OffRecord {
        let fresh = self.held.get(submission).map(|h| (h.expires_at > now_ms).then(|| h.answers.clone()));
        match fresh {
            Some(Some(answers)) => OffRecord::Present(answers),
            Some(None) => {
                self.held.remove(submission);
                OffRecord::Expired
            }
            None => OffRecord::Expired,
        }
    }

    /// Drops a submission's answers at once (e.g. when its FormSubmitted could not be produced).
    pub fn forget(&self, submission: &uuid::Uuid) {
        self.held.remove(submission);
    }

    /// Drops every expired entry; returns how many. Run periodically.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let before = self.held.len();
        self.held.retain(|_, h| h.expires_at > now_ms);
        before - self.held.len()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_live_only_until_their_deadline() {
        let store = OffRecordStore::new();
        let id = uuid::Uuid::new_v4();
        store.hold(id, BTreeMap::from([("cvv".to_string(), Secret::new("123".into()))]), 1_000);
        match store.get(&id, 999) {
            OffRecord::Present(a) => assert_eq!(a["cvv"].expose(), "123"),
            OffRecord::Expired => panic!("still fresh"),
        }
        assert_eq!(store.get(&id, 1_000), OffRecord::Expired);
        assert!(store.is_empty(), "expired answers are dropped");
        assert_eq!(store.get(&uuid::Uuid::new_v4(), 0), OffRecord::Expired);
    }

    #[test]
    fn sweep_drops_what_expired() {
        let store = OffRecordStore::new();
        for (i, t) in [10, 20, 30].into_iter().enumerate() {
            store.hold(uuid::Uuid::from_u128(i as u128), BTreeMap::from([("x".into(), Secret::new("1".into()))]), t);
        }
        assert_eq!(store.sweep(20), 2);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret::new("4111".into())), "Secret(..)");
    }
}
