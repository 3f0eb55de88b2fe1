//! The vault: tokenized submissions in sled, keyed by submission UUID, and everything around it.
//!
//! - [`seal`]: the edge. Turns a visitor's answers into a FormSubmitted holding only ciphertext;
//!   off-the-record answers go to the in-memory [`offrecord::OffRecordStore`] instead.
//! - [`record`]: what the vault stores for a submission; a pure function of the FormSubmitted, so a
//!   rebuild by replay yields byte-identical contents.
//! - [`detokenize`]: given a UUID and a retrieve key, the answers, or a typed refusal.
//! - [`VaultView`]: the read side of the vault's trees for everything else (purge, erasure): which
//!   submissions it holds, by time and by conversation. Its errors are errors, never "none".

pub mod detokenize;
pub mod offrecord;
pub mod record;
pub mod seal;
mod view;

pub use view::VaultView;

/// sled trees of the vault store (`<data_dir>/vault`).
pub mod trees {
    /// submission UUID (16 bytes) -> encoded [`super::record::VaultRecord`].
    pub const SUBMISSIONS: &str = "vault.submissions";
    /// `site \0 submitted_at (8 bytes, ordered) submission` -> empty: the retention index. A purge
    /// reads exactly the expired range of each site, so it costs what expires, not the vault's size.
    pub const BY_TIME: &str = "vault.by_time";
    /// `site \0 conversation \0 submission` -> empty: for erasure by conversation.
    pub const BY_CONVERSATION: &str = "vault.by_conversation";
    /// submission UUID -> reason (`retention` or `erasure`): purged submissions, so a FormSubmitted
    /// read again (replay, re-drive) never brings one back.
    pub const PURGED: &str = "vault.purged";
    /// `site \0 form` -> submission UUID: one submission per form. The first FormSubmitted of a form
    /// (in topic order, so a replay decides the same) is the submission; a later one is refused.
    /// Removed with the submission when it is purged.
    pub const BY_FORM: &str = "vault.by_form";
}
