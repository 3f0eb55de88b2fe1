//! The vault's read side for purge and erasure.

use super::record::{conversation_prefix, parse_time_key, submission_key, time_bound, time_prefix};
use super::trees;
use crate::domain::retention::{is_expired, scan_bound};
use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct VaultView {
    store: Store,
}

impl VaultView {
    pub fn new(store: Store) -> VaultView {
        VaultView { store }
    }

    /// Whether the vault holds a submission.
    pub fn holds(&self, submission: &uuid::Uuid) -> Result<bool, StoreError> {
        Ok(self.store.tree(trees::SUBMISSIONS)?.contains_key(submission_key(submission))?)
    }

    /// A conversation's submissions in the vault.
    pub fn submissions_in(&self, site: &str, conversation: &str) -> Result<Vec<uuid::Uuid>, StoreError> {
        let prefix = conversation_prefix(site, conversation);
        let mut out = Vec::new();
        for row in self.store.tree(trees::BY_CONVERSATION)?.scan_prefix(&prefix) {
            let (k, _) = row?;
            if let Ok(id) = uuid::Uuid::from_slice(&k[prefix.len()..]) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The conversation a stored submission belongs to.
    pub fn conversation_of(&self, submission: &uuid::Uuid) -> Result<Option<String>, StoreError> {
        match self.store.tree(trees::SUBMISSIONS)?.get(submission_key(submission))? {
            None => Ok(None),
            Some(v) => super::record::VaultRecord::decode(&v)
                .map(|r| Some(r.conversation_id))
                .map_err(|e| StoreError::Corrupt { tree: trees::SUBMISSIONS.to_string(), detail: e.to_string() }),
        }
    }

    /// Whether the vault holds anything of a conversation.
    pub fn has_conversation(&self, site: &str, conversation: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .tree(trees::BY_CONVERSATION)?
            .scan_prefix(conversation_prefix(site, conversation))
            .next()
            .is_some())
    }

    /// Every site with a submission in the retention index (one seek per site).
    pub fn sites(&self) -> Result<Vec<String>, StoreError> {
        let index = self.store.tree(trees::BY_TIME)?;
        let mut sites = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some((k, _)) = index.range(from.clone()..).next().transpose()? {
            let Some(zero) = k.iter().position(|&b| b == 0) else { break };
            sites.push(String::from_utf8_lossy(&k[..zero]).to_string());
            from = k[..zero].to_vec();
            from.push(1);
        }
        Ok(sites)
    }

    /// Expired submission ids of a site, oldest first: one range scan of the retention index that
    /// reads the expired entries (and at most 3 days of not-yet-expired ones), whatever the vault's
    /// size.
    pub fn expired(&self, site: &str, months: u32, as_of: i64) -> Result<Vec<uuid::Uuid>, StoreError> {
        let index = self.store.tree(trees::BY_TIME)?;
        let mut out = Vec::new();
        for row in index.range(time_prefix(site)..time_bound(site, scan_bound(as_of, months))) {
            let (k, _) = row?;
            if let Some((_, at, id)) = parse_time_key(&k)
                && is_expired(at, months, as_of)
            {
                out.push(id);
            }
        }
        Ok(out)
    }
}
