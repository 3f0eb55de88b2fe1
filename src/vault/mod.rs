//! The vault: tokenized submissions in sled, keyed by submission UUID, and everything around it.
//!
//! - [`seal`]: the edge. Turns a visitor's answers into a FormSubmitted holding only ciphertext;
//!   off-the-record answers go to the in-memory [`offrecord::OffRecordStore`] instead.
//! - [`record`]: what the vault stores for a submission; a pure function of the FormSubmitted, so a
//!   rebuild by replay yields byte-identical contents.
//! - [`detokenize`]: given a UUID and a retrieve key, the answers, or a typed refusal.

pub mod detokenize;
pub mod offrecord;
pub mod record;
pub mod seal;

/// sled trees of the vault store (`<data_dir>/vault`).
pub mod trees {
    /// submission UUID (16 bytes) -> encoded [`super::record::VaultRecord`].
    pub const SUBMISSIONS: &str = "vault.submissions";
    /// `period \0 site \0 submission` -> empty: the purge index, so purging a period costs what expires.
    pub const BY_PERIOD: &str = "vault.by_period";
}
