//! The node's sled database: the vault and every projection, plus the bookkeeping that makes effects
//! exactly-once (ADR 0004): consumed offsets and the outbox of events still to be produced are written
//! in the same atomic batch as the state they belong to.
//!
//! A [`Tx`] stages writes in memory (reads see them), and [`Store::commit`] applies them in one sled
//! transaction over every tree they touch, then flushes to disk.

use std::collections::BTreeMap;
use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the state database at {path}: {source}; check the data directory exists, is writable and is not used by another secureforms process"
    )]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("state database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt state in tree {tree}: {detail}")]
    Corrupt { tree: String, detail: String },
}

/// Trees the runtime itself uses.
pub mod trees {
    /// `group \0 topic \0 partition(be i32)` -> next offset (be i64).
    pub const OFFSETS: &str = "sys.offsets";
    /// `group \0 topic \0 partition \0 offset \0 index` -> encoded outbox entry.
    pub const OUTBOX: &str = "sys.outbox";
}

/// Tree name -> its (key, value) rows, in key order.
pub type TreeDump = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        Ok(Store { db })
    }

    /// A throwaway store for tests.
    pub fn temporary() -> Result<Store, StoreError> {
        Ok(Store { db: sled::Config::new().temporary(true).open()? })
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub fn begin(&self) -> Tx<'_> {
        Tx { store: self, writes: BTreeMap::new() }
    }

    /// Applies every staged write atomically and makes it durable.
    pub async fn commit(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        if tx.writes.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&str> = tx.writes.keys().map(|(t, _)| t.as_str()).collect();
        names.dedup();
        let trees = names.iter().map(|n| self.tree(n)).collect::<Result<Vec<_>, _>>()?;
        let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        trees
            .as_slice()
            .transaction(|txs| {
                for ((tree, key), value) in &tx.writes {
                    let t = &txs[index[tree.as_str()]];
                    match value {
                        Some(v) => {
                            t.insert(key.as_slice(), v.as_slice())?;
                        }
                        None => {
                            t.remove(key.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => unreachable!("the closure never aborts"),
            })?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Writes outside a consumer batch (e.g. removing delivered outbox entries); durable at the next
    /// flush. Losing them only means a delivered event is produced again with the same event id.
    pub fn remove_lazy(&self, tree: &str, key: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?.remove(key)?;
        Ok(())
    }

    /// A committed JSON value (the read side of [`Tx::insert_json`]). Undecodable is corrupt, an
    /// error: never "none".
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, tree: &str, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.tree(tree)?.get(key)?.map(|bytes| decode_json(tree, &bytes)).transpose()
    }

    /// A monotonic id, unique in this database.
    pub fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Every tree name and its content, for replay comparisons and inspection tools.
    pub fn dump(&self) -> Result<TreeDump, StoreError> {
        let mut out = BTreeMap::new();
        for name in self.db.tree_names() {
            let name = String::from_utf8_lossy(&name).to_string();
            if name == "__sled__default" {
                continue;
            }
            let t = self.tree(&name)?;
            let rows = t.iter().map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<Vec<_>, _>>()?;
            out.insert(name, rows);
        }
        Ok(out)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(tree: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { tree: tree.to_string(), detail: e.to_string() })
}

/// Staged writes of one batch.
pub struct Tx<'s> {
    store: &'s Store,
    writes: BTreeMap<(String, Vec<u8>), Option<Vec<u8>>>,
}

impl Tx<'_> {
    pub fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.writes.get(&(tree.to_string(), key.to_vec())) {
            return Ok(v.clone());
        }
        Ok(self.store.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    pub fn insert(&mut self, tree: &str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.insert((tree.to_string(), key.into()), Some(value.into()));
    }

    pub fn remove(&mut self, tree: &str, key: impl Into<Vec<u8>>) {
        self.writes.insert((tree.to_string(), key.into()), None);
    }

    pub fn get_json<T: serde::de::DeserializeOwned>(&self, tree: &str, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.get(tree, key)?.map(|bytes| decode_json(tree, &bytes)).transpose()
    }

    pub fn insert_json<T: serde::Serialize>(&mut self, tree: &str, key: impl Into<Vec<u8>>, value: &T) {
        self.insert(tree, key, serde_json::to_vec(value).expect("state types serialize"));
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Keys under `prefix` as this batch sees them: stored ones, plus staged inserts, minus staged
    /// removals, in order.
    pub fn scan_prefix_keys(&self, tree: &str, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = std::collections::BTreeSet::new();
        for row in self.store.tree(tree)?.scan_prefix(prefix) {
            keys.insert(row?.0.to_vec());
        }
        let start = (tree.to_string(), prefix.to_vec());
        for ((t, k), v) in self.writes.range(start..) {
            if t != tree || !k.starts_with(prefix) {
                break;
            }
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        Ok(keys.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn staged_writes_are_visible_before_commit_and_durable_after() {
        let store = Store::temporary().unwrap();
        let mut tx = store.begin();
        tx.insert("a", b"k".to_vec(), b"1".to_vec());
        tx.insert("b", b"k".to_vec(), b"2".to_vec());
        assert_eq!(tx.get("a", b"k").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.tree("a").unwrap().get(b"k").unwrap(), None, "nothing before commit");
        store.commit(tx).await.unwrap();
        assert_eq!(store.tree("b").unwrap().get(b"k").unwrap().unwrap().as_ref(), b"2");

        let mut tx = store.begin();
        tx.remove("a", b"k".to_vec());
        assert_eq!(tx.get("a", b"k").unwrap(), None);
        store.commit(tx).await.unwrap();
        assert_eq!(store.tree("a").unwrap().get(b"k").unwrap(), None);
    }

    #[tokio::test]
    async fn prefix_scans_see_staged_inserts_and_removals() {
        let store = Store::temporary().unwrap();
        let mut tx = store.begin();
        tx.insert("t", b"p1".to_vec(), vec![]);
        tx.insert("t", b"p2".to_vec(), vec![]);
        tx.insert("t", b"q1".to_vec(), vec![]);
        store.commit(tx).await.unwrap();
        let mut tx = store.begin();
        tx.remove("t", b"p1".to_vec());
        tx.insert("t", b"p3".to_vec(), vec![]);
        tx.insert("u", b"p4".to_vec(), vec![]);
        assert_eq!(tx.scan_prefix_keys("t", b"p").unwrap(), vec![b"p2".to_vec(), b"p3".to_vec()]);
    }
}
