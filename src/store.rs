//! The node's sled database: the vault and every projection, plus the bookkeeping that makes effects
//! exactly-once (ADR 0004): consumed offsets and the outbox of events still to be produced are written
//! in the same atomic batch as the state they belong to.
//!
//! A [`Tx`] stages writes in memory (reads see them), and [`Store::commit`] applies them in one sled
//! transaction over every tree they touch, then makes them durable.
//!
//! Durable means on the disk, not only in the kernel's page cache (ADR 25). sled 0.34 flushes its log
//! with `sync_file_range` on Linux, which neither flushes the device's write cache nor records a
//! grown file's size, and never syncs its config file, its blob files or their directory entries
//! (sled issues #1351 and #1452): a power cut or a kernel crash could lose a flushed write. So every
//! flush here is followed by `fdatasync` of sled's log file and a sync of any new blob file, and
//! opening a store syncs its files and directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error(
        "the state database at {path} is still locked by another process after {waited:?}; stop the other `secureforms serve` or `secureforms replay` using this data directory, then start again"
    )]
    InUse { path: String, waited: std::time::Duration },
    #[error("state database error: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "cannot make the state database at {path} durable: {source}; check the disk (space, errors in the kernel log) and that the data directory is writable"
    )]
    Sync {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
    /// Syncs what sled's flush leaves in the page cache; none for a temporary store.
    disk: Option<Arc<Disk>>,
}

/// sled's files of one store, synced after each of its flushes.
struct Disk {
    dir: PathBuf,
    /// sled's log (`<dir>/db`), opened again: `fdatasync` acts on the file, whichever descriptor.
    log: std::fs::File,
    /// The highest blob (named by its log sequence number) already synced.
    blobs_synced: std::sync::Mutex<u64>,
    syncs: std::sync::atomic::AtomicU64,
}

impl Disk {
    fn error(&self, source: std::io::Error) -> StoreError {
        StoreError::Sync { path: self.dir.display().to_string(), source }
    }

    fn open(dir: &Path) -> Result<Disk, StoreError> {
        let err = |source| StoreError::Sync { path: dir.display().to_string(), source };
        let log = std::fs::OpenOptions::new().read(true).open(dir.join("db")).map_err(err)?;
        let disk = Disk { dir: dir.to_path_buf(), log, blobs_synced: std::sync::Mutex::new(0), syncs: 0.into() };
        // What sled wrote when it created or opened the store: its config, and the entries of its
        // files in their directories (up to the data directory's own entry).
        std::fs::File::open(dir.join("conf")).and_then(|f| f.sync_all()).map_err(err)?;
        for d in [Some(dir), dir.parent()].into_iter().flatten() {
            sync_dir(d).map_err(err)?;
        }
        disk.sync().map_err(err)?;
        Ok(disk)
    }

    /// Puts on the disk what sled's last flush wrote: the log's data (and its size, if it grew),
    /// then any blob written since the last sync, and the blob directory's entries.
    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let blobs = self.dir.join("blobs");
        let mut synced = self.blobs_synced.lock().unwrap_or_else(|e| e.into_inner());
        let mut newest = *synced;
        for entry in std::fs::read_dir(&blobs)? {
            let entry = entry?;
            let Some(lsn) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else { continue };
            if lsn > *synced {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Collected by sled meanwhile: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                newest = newest.max(lsn);
            }
        }
        if newest > *synced {
            sync_dir(&blobs)?;
            *synced = newest;
        }
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// How long [`Store::open`] waits for a store's lock to be released: sled 0.34 releases it from its
/// flusher thread after the `Db` is dropped (sled issue #1234), and a node being replaced may still
/// be stopping.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until nobody holds the lock sled takes on `<path>/db` (an exclusive `flock`), or `wait`
/// has passed. The probe's own lock is released at once, before sled takes it.
fn wait_for_lock(path: &Path, wait: std::time::Duration) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let file = match std::fs::File::open(path.join("db")) {
        Ok(file) => file,
        // A new store: nobody holds it. Any other failure is sled's to report, with its cause.
        Err(_) => return Ok(()),
    };
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < wait => {
                std::thread::sleep(pause.min(wait.saturating_sub(started.elapsed())));
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse { path: path.display().to_string(), waited: wait });
            }
            Err(std::fs::TryLockError::Error(_)) => return Ok(()),
        }
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, waiting up to [`LOCK_WAIT`] for a previous holder
    /// of its lock to let go.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_within(path, LOCK_WAIT)
    }

    /// [`Store::open`], waiting at most `wait` for the store's lock.
    pub fn open_within(path: &Path, wait: std::time::Duration) -> Result<Store, StoreError> {
        wait_for_lock(path, wait)?;
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        db.flush()?;
        let disk = Disk::open(path)?;
        Ok(Store { db, disk: Some(Arc::new(disk)) })
    }

    /// A throwaway store for tests.
    pub fn temporary() -> Result<Store, StoreError> {
        Ok(Store { db: sled::Config::new().temporary(true).open()?, disk: None })
    }

    /// How many times this store's files were synced to the disk (each flush syncs them once).
    pub fn disk_syncs(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.syncs.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub fn begin(&self) -> Tx<'_> {
        Tx { store: self, writes: BTreeMap::new() }
    }

    /// Applies every staged write atomically and makes it durable.
    pub async fn commit(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        if self.apply(tx)? {
            self.flush().await?;
        }
        Ok(())
    }

    /// Applies every staged write atomically, without waiting for the disk: durable at the next
    /// flush or commit of this store, or within sled's flush interval (500 ms). For a batch whose
    /// effects nobody outside can see (no outputs): after a crash, its state and the offsets it
    /// advanced are lost together, and its records are read and applied again.
    pub fn commit_lazy(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        self.apply(tx).map(|_| ())
    }

    /// The staged writes in one sled transaction; whether there were any.
    fn apply(&self, tx: Tx<'_>) -> Result<bool, StoreError> {
        if tx.writes.is_empty() {
            return Ok(false);
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
        Ok(true)
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

    /// Makes every write so far durable: sled's flush, then the sync it leaves out (module docs).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        let Some(disk) = self.disk.clone() else { return Ok(()) };
        let path = disk.dir.display().to_string();
        tokio::task::spawn_blocking(move || disk.sync().map_err(|source| disk.error(source)))
            .await
            .map_err(|stopped| StoreError::Sync { path, source: std::io::Error::other(stopped.to_string()) })?
    }

    /// [`Store::flush`] for a thread outside the async runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        match &self.disk {
            Some(disk) => disk.sync().map_err(|source| disk.error(source)),
            None => Ok(()),
        }
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
    async fn every_commit_and_flush_syncs_sleds_files_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = Store::open(&path).unwrap();
        let at_open = store.disk_syncs();
        assert_eq!(at_open, 1, "opening syncs what sled wrote while opening");
        for i in 0..3u8 {
            let mut tx = store.begin();
            tx.insert("t", vec![i], vec![i; 64]);
            store.commit(tx).await.unwrap();
        }
        assert_eq!(store.disk_syncs(), at_open + 3, "each commit syncs once");
        store.flush().await.unwrap();
        assert_eq!(store.disk_syncs(), at_open + 4);
        // An empty batch writes nothing and syncs nothing.
        store.commit(store.begin()).await.unwrap();
        assert_eq!(store.disk_syncs(), at_open + 4);
        assert_eq!(Store::temporary().unwrap().disk_syncs(), 0, "a temporary store has no files to sync");
    }

    #[tokio::test]
    async fn a_lazy_commit_is_visible_at_once_and_durable_with_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = Store::open(&path).unwrap();
            let before = store.disk_syncs();
            let mut tx = store.begin();
            tx.insert("t", b"lazy".to_vec(), b"1".to_vec());
            tx.insert("u", b"lazy".to_vec(), b"2".to_vec());
            store.commit_lazy(tx).unwrap();
            assert_eq!(store.disk_syncs(), before, "nothing waits for the disk");
            assert_eq!(store.tree("u").unwrap().get(b"lazy").unwrap().unwrap().as_ref(), b"2");
            let mut tx = store.begin();
            tx.insert("t", b"synced".to_vec(), b"3".to_vec());
            store.commit(tx).await.unwrap();
            assert_eq!(store.disk_syncs(), before + 1);
        }
        let store = Store::open(&path).unwrap();
        for (tree, key) in [("t", &b"lazy"[..]), ("u", b"lazy"), ("t", b"synced")] {
            assert!(store.tree(tree).unwrap().get(key).unwrap().is_some(), "{tree}/{key:?} kept");
        }
    }

    #[test]
    fn a_store_reopened_at_once_waits_for_sled_to_let_go_of_its_lock() {
        // sled releases its lock from a background thread after the Db is dropped; reopening at
        // once used to fail now and then with "could not acquire lock".
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        for i in 0..30u8 {
            let store = Store::open(&path).unwrap_or_else(|e| panic!("reopening #{i}: {e}"));
            store.tree("t").unwrap().insert([i], vec![i]).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tree("t").unwrap().len(), 30);
    }

    #[test]
    fn a_store_another_process_keeps_locked_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(Store::open(&path).unwrap());
        // Another holder of sled's lock, as a second node on the same data directory would be.
        let holder = std::fs::File::open(path.join("db")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while holder.try_lock().is_err() {
            assert!(std::time::Instant::now() < deadline, "the dropped store never released its lock");
            std::thread::yield_now();
        }
        let err = Store::open_within(&path, std::time::Duration::from_millis(50)).err().expect("the lock is held");
        assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("still locked by another process") && text.contains("stop the other"), "{text}");
        holder.unlock().unwrap();
        Store::open_within(&path, std::time::Duration::ZERO).expect("free once the holder lets go");
    }

    #[tokio::test]
    async fn a_value_sled_keeps_as_a_blob_file_is_synced_and_reads_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let big = vec![7u8; 1 << 20];
        {
            let store = Store::open(&path).unwrap();
            let mut tx = store.begin();
            tx.insert("t", b"big".to_vec(), big.clone());
            store.commit(tx).await.unwrap();
            let disk = store.disk.as_ref().unwrap();
            assert!(*disk.blobs_synced.lock().unwrap() > 0, "sled kept a 1 MiB value as a blob; its file was synced");
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tree("t").unwrap().get(b"big").unwrap().unwrap().as_ref(), big.as_slice());
    }

    #[test]
    fn a_store_whose_log_cannot_be_opened_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let err = Disk::open(dir.path()).err().expect("no sled log in an empty directory");
        let text = err.to_string();
        assert!(text.contains("cannot make the state database") && text.contains("check the disk"), "{text}");
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
