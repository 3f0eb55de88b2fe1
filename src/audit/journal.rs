//! The audit log's journal: where an audit write becomes durable before the request is answered
//! (ADR 25). One `fdatasync` of a file written in place, instead of a flush of the audit store: a
//! granted retrieval waits for one disk write, not for sled's log machinery and its metadata.
//!
//! The file is allocated whole (zeros) when it is created, so appending never changes its size and
//! `fdatasync` has no metadata to write. It starts with a header naming the current generation; each
//! entry carries that generation and a CRC. Reading stops at the first entry that is short, has
//! another generation (left from before the last restart) or fails its CRC (torn by a crash while
//! it was written, so never acknowledged). Once what the entries say is durable elsewhere (the audit
//! store, synced), [`Journal::restart`] starts the next generation from the top.
//!
//! Layout, little-endian: header `"SFAJ" | generation u64 | crc32 u32` (16 bytes); then entries
//! `length u32 | generation u64 | crc32(generation, payload) u32 | payload`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"SFAJ";
const HEADER: u64 = 16;
const ENTRY_HEAD: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "the audit journal at {path} cannot be used: {source}; check the disk (space, errors in the kernel log) and that the data directory is writable"
    )]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the audit journal at {path} has a damaged header; it is not a secureforms audit journal or the disk corrupted it. Restore the data directory from a backup, or move the file aside to start (audit records written since the last checkpoint would be lost)"
    )]
    Damaged { path: String },
    #[error("{entries} audit records of {bytes} bytes do not fit in the journal's {capacity} bytes")]
    TooLarge { entries: usize, bytes: u64, capacity: u64 },
    #[error(
        "the audit journal at {path} failed a write and takes no more until it is started again (after the audit store is synced); check the disk (space, errors in the kernel log)"
    )]
    Failed { path: String },
}

pub struct Journal {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Where the next entry goes.
    end: u64,
    capacity: u64,
    /// A write or its sync failed: what it wrote may still reach the disk (after a failed
    /// `fdatasync` the kernel may write the pages back later, or drop them), so no entry may follow
    /// it in this generation. Cleared by [`Journal::restart`].
    failed: bool,
    /// Tests: the next syncs fail after the write went through.
    #[cfg(test)]
    fail_syncs: bool,
}

impl Journal {
    /// Opens the journal at `path`, creating it with `capacity` bytes if it is not there, and returns
    /// it with the payloads of its current generation, oldest first. Appends go after them.
    pub fn open(path: &Path, capacity: u64) -> Result<(Journal, Vec<Vec<u8>>), JournalError> {
        let io = |source| JournalError::Io { path: path.display().to_string(), source };
        let created = !path.exists();
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if created || len < HEADER {
            write_header(&file, 1).map_err(io)?;
        }
        let capacity = capacity.max(len).max(HEADER + ENTRY_HEAD);
        if len < capacity {
            // Zeros to the end, written (not a hole): appends then rewrite allocated blocks only.
            file.seek(SeekFrom::Start(len.max(HEADER))).map_err(io)?;
            let zeros = vec![0u8; 1 << 16];
            let mut at = len.max(HEADER);
            while at < capacity {
                let n = zeros.len().min((capacity - at) as usize);
                file.write_all(&zeros[..n]).map_err(io)?;
                at += n as u64;
            }
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let mut bytes = Vec::with_capacity(capacity as usize);
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.read_to_end(&mut bytes).map_err(io)?;
        let generation =
            read_header(&bytes).ok_or_else(|| JournalError::Damaged { path: path.display().to_string() })?;
        let (entries, end) = read_entries(&bytes, generation);
        let journal = Journal {
            file,
            path: path.to_path_buf(),
            generation,
            end,
            capacity,
            failed: false,
            #[cfg(test)]
            fail_syncs: false,
        };
        Ok((journal, entries))
    }

    /// Bytes the entries of this generation take.
    pub fn used(&self) -> u64 {
        self.end - HEADER
    }

    pub fn capacity(&self) -> u64 {
        self.capacity - HEADER
    }

    /// Whether a write failed since the last [`Journal::restart`]: appends are refused until then.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether `payloads` fit after what is there.
    pub fn fits(&self, payloads: &[Vec<u8>]) -> bool {
        self.end + framed_len(payloads) <= self.capacity
    }

    /// Writes `payloads` after the last entry and makes them durable (one write, one `fdatasync`).
    ///
    /// If the write or its sync fails, the entries were never acknowledged, yet their bytes may be
    /// in the page cache and reach the disk later: a restart would then replay them, and the next
    /// append, written over them, could leave one of them whole after its own end. So the range is
    /// overwritten with zeros at once (best effort), and the journal takes no more appends until
    /// [`Journal::restart`] starts a generation in which none of those bytes count.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<(), JournalError> {
        if self.failed {
            return Err(JournalError::Failed { path: self.path.display().to_string() });
        }
        if !self.fits(payloads) {
            return Err(JournalError::TooLarge {
                entries: payloads.len(),
                bytes: framed_len(payloads),
                capacity: self.capacity(),
            });
        }
        let buf = frame(self.generation, payloads);
        if let Err(source) = self.file.write_all_at(&buf, self.end).and_then(|()| self.sync()) {
            self.failed = true;
            let _ = self.file.write_all_at(&vec![0u8; buf.len()], self.end);
            return Err(JournalError::Io { path: self.path.display().to_string(), source });
        }
        self.end += buf.len() as u64;
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_syncs {
            return Err(std::io::Error::other("injected: fdatasync failed"));
        }
        self.file.sync_data()
    }

    /// Starts the next generation: every entry written so far stops counting. Call it only once
    /// their effects are durable elsewhere.
    pub fn restart(&mut self) -> Result<(), JournalError> {
        let next = self.generation.wrapping_add(1).max(1);
        write_header(&self.file, next)
            .map_err(|source| JournalError::Io { path: self.path.display().to_string(), source })?;
        self.generation = next;
        self.end = HEADER;
        self.failed = false;
        Ok(())
    }
}

#[cfg(test)]
impl Journal {
    /// The disk refuses writes from now on (tests of the writer's error path).
    pub(super) fn fail_writes(&mut self) {
        self.file = File::open(&self.path).expect("the journal opens read-only");
    }

    /// The disk takes writes again.
    pub(super) fn heal(&mut self) {
        self.file = OpenOptions::new().read(true).write(true).open(&self.path).expect("the journal opens");
        self.fail_syncs = false;
    }

    /// Writes go through but their `fdatasync` fails from now on.
    pub(super) fn fail_syncs(&mut self) {
        self.fail_syncs = true;
    }
}

/// The entries of `payloads` as they are written, one after the other.
fn frame(generation: u64, payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(framed_len(payloads) as usize);
    for p in payloads {
        buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
        buf.extend_from_slice(&generation.to_le_bytes());
        buf.extend_from_slice(&entry_crc(generation, p).to_le_bytes());
        buf.extend_from_slice(p);
    }
    buf
}

fn framed_len(payloads: &[Vec<u8>]) -> u64 {
    payloads.iter().map(|p| ENTRY_HEAD + p.len() as u64).sum()
}

fn entry_crc(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn write_header(file: &File, generation: u64) -> std::io::Result<()> {
    let mut header = [0u8; HEADER as usize];
    header[..4].copy_from_slice(MAGIC);
    header[4..12].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&header[..12]);
    header[12..].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_data()
}

fn read_header(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..HEADER as usize)?;
    let crc = u32::from_le_bytes(header[12..16].try_into().ok()?);
    (header[..4] == *MAGIC && crc32fast::hash(&header[..12]) == crc)
        .then(|| u64::from_le_bytes(header[4..12].try_into().expect("8 bytes")))
}

/// The payloads of `generation` from the top, and where the next entry goes.
fn read_entries(bytes: &[u8], generation: u64) -> (Vec<Vec<u8>>, u64) {
    let mut entries = Vec::new();
    let mut at = HEADER as usize;
    while let Some(head) = bytes.get(at..at + ENTRY_HEAD as usize) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let entry_generation = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        let start = at + ENTRY_HEAD as usize;
        let Some(payload) = bytes.get(start..start + len) else { break };
        if len == 0 || entry_generation != generation || entry_crc(generation, payload) != crc {
            break;
        }
        entries.push(payload.to_vec());
        at = start + len;
    }
    (entries, at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(n: usize, tag: u8) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![tag; 10 + i]).collect()
    }

    #[test]
    fn appended_entries_come_back_in_order_after_reopening_and_appends_continue_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, found) = Journal::open(&path, 4096).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096, "allocated whole when created");
        j.append(&payloads(3, 1)).unwrap();
        j.append(&payloads(1, 2)).unwrap();
        drop(j);
        let (mut j, found) = Journal::open(&path, 4096).unwrap();
        let mut expected = payloads(3, 1);
        expected.extend(payloads(1, 2));
        assert_eq!(found, expected);
        j.append(&payloads(1, 3)).unwrap();
        drop(j);
        let (_, found) = Journal::open(&path, 4096).unwrap();
        assert_eq!(found.len(), 5);
        assert_eq!(found[4], payloads(1, 3)[0]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096, "appending never grows the file");
    }

    #[test]
    fn a_restart_forgets_what_was_written_even_where_newer_entries_end_before_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, 4096).unwrap();
        j.append(&payloads(5, 1)).unwrap();
        j.restart().unwrap();
        assert_eq!(j.used(), 0);
        j.append(&payloads(1, 9)).unwrap();
        drop(j);
        // The old generation's entries are still in the file after the new one's: not read.
        let (_, found) = Journal::open(&path, 4096).unwrap();
        assert_eq!(found, payloads(1, 9));
    }

    #[test]
    fn a_torn_last_entry_is_dropped_and_overwritten_by_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, 4096).unwrap();
        j.append(&payloads(2, 1)).unwrap();
        let end = j.end;
        j.append(&[vec![7u8; 100]]).unwrap();
        drop(j);
        // A crash while the third entry was written: its last bytes never reached the disk.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; 10], end + ENTRY_HEAD + 90).unwrap();
        drop(f);
        let (mut j, found) = Journal::open(&path, 4096).unwrap();
        assert_eq!(found, payloads(2, 1), "the torn entry was never acknowledged; it is not replayed");
        j.append(&payloads(1, 4)).unwrap();
        drop(j);
        let (_, found) = Journal::open(&path, 4096).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(found[2], payloads(1, 4)[0]);
    }

    #[test]
    fn a_failed_sync_leaves_nothing_to_replay_and_nothing_is_appended_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, 4096).unwrap();
        j.append(&payloads(1, 1)).unwrap();
        // A group of two whose write reached the page cache but whose sync failed: never
        // acknowledged, so never to be replayed.
        let refused = vec![vec![2u8; 20], vec![3u8; 30]];
        j.fail_syncs();
        let err = j.append(&refused).unwrap_err();
        assert!(err.to_string().contains("check the disk"), "{err}");
        j.heal();
        // A crash now: what a restart reads.
        let (_, found) = Journal::open(&path, 4096).unwrap();
        assert_eq!(found, payloads(1, 1), "the refused group's bytes were overwritten");
        // Until a restart, nothing more is written: an entry the size of the refused group's first
        // would end where its second starts, and leave it whole to be read after it.
        let same_size = vec![vec![4u8; 20]];
        assert!(matches!(j.append(&same_size), Err(JournalError::Failed { .. })));
        assert!(j.failed());
        j.restart().unwrap();
        assert!(!j.failed());
        j.append(&same_size).unwrap();
        drop(j);
        let (_, found) = Journal::open(&path, 4096).unwrap();
        assert_eq!(found, same_size, "only what was acknowledged, in the new generation");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<Vec<u8>>),
        /// Written, then its fdatasync fails.
        AppendSyncFails(Vec<Vec<u8>>),
        Restart,
        /// The process dies and the journal is opened again.
        Crash,
        /// The process dies while a group is written: only its first `cut` bytes reach the file.
        CrashMidWrite(Vec<Vec<u8>>, usize),
    }

    fn group() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..120), 1..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => group().prop_map(Op::Append),
            1 => group().prop_map(Op::AppendSyncFails),
            1 => Just(Op::Restart),
            1 => Just(Op::Crash),
            1 => (group(), 0usize..400).prop_map(|(g, cut)| Op::CrashMidWrite(g, cut)),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever happens, opening the journal gives back exactly the acknowledged entries of its
        /// generation, in order (and, after a crash mid-write, the entries of the interrupted group
        /// that reached the file whole: never acknowledged, so their requests never had an answer).
        #[test]
        fn opening_gives_back_what_was_acknowledged_whatever_failed_or_crashed(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("j");
            let capacity = 2048;
            let (mut j, _) = Journal::open(&path, capacity).unwrap();
            let mut acked: Vec<Vec<u8>> = Vec::new();
            for op in ops {
                match op {
                    Op::Append(g) => match j.append(&g) {
                        Ok(()) => acked.extend(g),
                        Err(JournalError::TooLarge { .. }) => prop_assert!(!j.fits(&g)),
                        Err(JournalError::Failed { .. }) => prop_assert!(j.failed()),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    },
                    Op::AppendSyncFails(g) => {
                        j.fail_syncs();
                        prop_assert!(j.append(&g).is_err());
                        j.heal();
                        prop_assert!(j.failed() || !j.fits(&g));
                    }
                    Op::Restart => {
                        j.restart().unwrap();
                        acked.clear();
                    }
                    Op::Crash => {
                        drop(j);
                        let (reopened, found) = Journal::open(&path, capacity).unwrap();
                        prop_assert_eq!(&found, &acked);
                        j = reopened;
                    }
                    Op::CrashMidWrite(g, cut) => {
                        let bytes = frame(j.generation, &g);
                        let cut = cut.min(bytes.len()).min((capacity - j.end) as usize);
                        j.file.write_all_at(&bytes[..cut], j.end).unwrap();
                        drop(j);
                        let (reopened, found) = Journal::open(&path, capacity).unwrap();
                        let mut whole = 0;
                        let mut expected = acked.clone();
                        for p in &g {
                            whole += (ENTRY_HEAD as usize) + p.len();
                            if whole <= cut {
                                expected.push(p.clone());
                            }
                        }
                        prop_assert_eq!(&found, &expected);
                        acked = found;
                        j = reopened;
                    }
                }
            }
        }
    }

    #[test]
    fn what_does_not_fit_is_refused_and_a_damaged_header_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, 256).unwrap();
        assert!(!j.fits(&[vec![0u8; 300]]));
        let err = j.append(&[vec![0u8; 300]]).unwrap_err();
        assert!(matches!(err, JournalError::TooLarge { .. }), "{err}");
        assert_eq!(j.used(), 0, "nothing written");
        drop(j);
        std::fs::write(&path, b"not a journal at all, but long enough").unwrap();
        let err = Journal::open(&path, 256).err().expect("a foreign file is refused");
        assert!(err.to_string().contains("damaged header") && err.to_string().contains("backup"), "{err}");
    }
}
