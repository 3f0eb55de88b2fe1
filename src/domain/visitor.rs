//! The visitor's one-time keys (seed steps 1-3): a form's state as the events describe it, and the
//! rules for opening and submitting it. Pure: time and fresh keys are passed in.

use serde::{Deserialize, Serialize};

use crate::domain::otk::{OtkSecret, Purpose};
use crate::events::{FormIssued, FormOpened};

/// One issued form, as the gateway projection keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormState {
    pub site_id: String,
    pub form_id: String,
    pub conversation_id: String,
    pub agent_id: String,
    pub template_id: String,
    pub template_version: i32,
    pub open_key_hash: String,
    pub open_expires_at: i64,
    pub reopen_limit: i32,
    pub open_count: i32,
    pub submit_key_hash: Option<String>,
    pub submit_expires_at: i64,
    pub submitted: bool,
}

impl FormState {
    pub fn issued(e: &FormIssued) -> FormState {
        FormState {
            site_id: e.header.site_id.clone(),
            form_id: e.form_id.clone(),
            conversation_id: e.header.conversation_id.clone(),
            agent_id: e.agent_id.clone(),
            template_id: e.template_id.clone(),
            template_version: e.template_version,
            open_key_hash: e.open_key_hash.clone(),
            open_expires_at: e.open_expires_at,
            reopen_limit: e.reopen_limit,
            open_count: 0,
            submit_key_hash: None,
            submit_expires_at: 0,
            submitted: false,
        }
    }

    /// Opens left before the reopen limit.
    pub fn opens_left(&self) -> i32 {
        (self.reopen_limit - self.open_count).max(0)
    }

    pub fn opened(&mut self, e: &FormOpened) {
        self.open_count = self.open_count.max(e.open_count);
        self.submit_key_hash = Some(e.submit_key_hash.clone());
        self.submit_expires_at = e.submit_expires_at;
    }
}

/// Why a key was refused. The visitor sees a clear page that does not say which keys exist; the
/// audit event carries the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No such form for this site, or the key does not match: forged, cross-site or mistyped.
    Invalid,
    Expired,
    /// The form was already submitted.
    AlreadySubmitted,
    ReopenLimit,
}

impl KeyRefusal {
    pub fn code(self) -> &'static str {
        match self {
            KeyRefusal::Invalid => "invalid",
            KeyRefusal::Expired => "expired",
            KeyRefusal::AlreadySubmitted => "already_submitted",
            KeyRefusal::ReopenLimit => "reopen_limit",
        }
    }
}

/// A form and the key presented for it, checked: what the caller may act on (no `expect` after a
/// check).
#[derive(Debug, PartialEq)]
pub struct Checked<'a> {
    pub state: &'a FormState,
    pub key: &'a OtkSecret,
}

/// Opening with the link's key: allowed until the form is submitted, the key expires, or the form
/// has been opened `reopen_limit` times.
pub fn check_open<'a>(
    state: Option<&'a FormState>,
    site_id: &str,
    form_id: &str,
    key: Option<&'a OtkSecret>,
    now_ms: i64,
) -> Result<Checked<'a>, KeyRefusal> {
    let state = state.filter(|s| s.site_id == site_id && s.form_id == form_id).ok_or(KeyRefusal::Invalid)?;
    let key = key.ok_or(KeyRefusal::Invalid)?;
    if !key.verify(&state.open_key_hash, Purpose::Open, site_id, form_id) {
        return Err(KeyRefusal::Invalid);
    }
    if state.submitted {
        return Err(KeyRefusal::AlreadySubmitted);
    }
    if now_ms >= state.open_expires_at {
        return Err(KeyRefusal::Expired);
    }
    if state.open_count >= state.reopen_limit {
        return Err(KeyRefusal::ReopenLimit);
    }
    Ok(Checked { state, key })
}

/// Submitting with the page's key: only the latest submit key, once, before it expires.
pub fn check_submit<'a>(
    state: Option<&'a FormState>,
    site_id: &str,
    form_id: &str,
    key: Option<&'a OtkSecret>,
    now_ms: i64,
) -> Result<Checked<'a>, KeyRefusal> {
    let state = state.filter(|s| s.site_id == site_id && s.form_id == form_id).ok_or(KeyRefusal::Invalid)?;
    let key = key.ok_or(KeyRefusal::Invalid)?;
    let hash = state.submit_key_hash.as_deref().ok_or(KeyRefusal::Invalid)?;
    if !key.verify(hash, Purpose::Submit, site_id, form_id) {
        return Err(KeyRefusal::Invalid);
    }
    if state.submitted {
        return Err(KeyRefusal::AlreadySubmitted);
    }
    if now_ms >= state.submit_expires_at {
        return Err(KeyRefusal::Expired);
    }
    Ok(Checked { state, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> OtkSecret {
        OtkSecret::parse(&c.to_string().repeat(22)).unwrap()
    }

    fn issued() -> FormState {
        FormState {
            site_id: "acme".into(),
            form_id: "f1".into(),
            conversation_id: "c1".into(),
            agent_id: "a1".into(),
            template_id: "t".into(),
            template_version: 1,
            open_key_hash: key('o').hash(Purpose::Open, "acme", "f1"),
            open_expires_at: 1_000,
            reopen_limit: 2,
            open_count: 0,
            submit_key_hash: None,
            submit_expires_at: 0,
            submitted: false,
        }
    }

    fn open(s: &mut FormState, submit: char, at: i64) {
        s.open_count += 1;
        s.submit_key_hash = Some(key(submit).hash(Purpose::Submit, "acme", "f1"));
        s.submit_expires_at = at + 500;
    }

    #[test]
    fn the_open_key_opens_up_to_the_reopen_limit_then_is_refused() {
        let mut s = issued();
        assert!(check_open(Some(&s), "acme", "f1", Some(&key('o')), 10).is_ok());
        open(&mut s, 'a', 10);
        assert!(check_open(Some(&s), "acme", "f1", Some(&key('o')), 20).is_ok(), "reopen allowed");
        open(&mut s, 'b', 20);
        assert_eq!(check_open(Some(&s), "acme", "f1", Some(&key('o')), 30), Err(KeyRefusal::ReopenLimit));
    }

    #[test]
    fn forged_cross_site_expired_and_missing_keys_are_refused() {
        let s = issued();
        assert_eq!(check_open(Some(&s), "acme", "f1", Some(&key('x')), 10), Err(KeyRefusal::Invalid));
        assert_eq!(check_open(Some(&s), "other", "f1", Some(&key('o')), 10), Err(KeyRefusal::Invalid));
        assert_eq!(check_open(Some(&s), "acme", "f2", Some(&key('o')), 10), Err(KeyRefusal::Invalid));
        assert_eq!(check_open(None, "acme", "f1", Some(&key('o')), 10), Err(KeyRefusal::Invalid));
        assert_eq!(check_open(Some(&s), "acme", "f1", None, 10), Err(KeyRefusal::Invalid));
        assert_eq!(check_open(Some(&s), "acme", "f1", Some(&key('o')), 1_000), Err(KeyRefusal::Expired));
    }

    #[test]
    fn only_the_latest_submit_key_submits_once_and_the_open_key_never_submits() {
        let mut s = issued();
        open(&mut s, 'a', 10);
        open(&mut s, 'b', 20);
        assert_eq!(
            check_submit(Some(&s), "acme", "f1", Some(&key('a')), 30),
            Err(KeyRefusal::Invalid),
            "superseded by the reopen"
        );
        assert_eq!(
            check_submit(Some(&s), "acme", "f1", Some(&key('o')), 30),
            Err(KeyRefusal::Invalid),
            "open key cannot submit"
        );
        assert!(check_submit(Some(&s), "acme", "f1", Some(&key('b')), 30).is_ok());
        assert_eq!(check_submit(Some(&s), "acme", "f1", Some(&key('b')), 520), Err(KeyRefusal::Expired));
        s.submitted = true;
        assert_eq!(check_submit(Some(&s), "acme", "f1", Some(&key('b')), 30), Err(KeyRefusal::AlreadySubmitted));
        assert_eq!(check_open(Some(&s), "acme", "f1", Some(&key('o')), 30), Err(KeyRefusal::AlreadySubmitted));
    }
}
