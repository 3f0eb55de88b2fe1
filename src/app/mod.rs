//! The application layer: one function per use case. Each takes what the request parsed, decides
//! through the domain, acts through the node's views and stores, records its audit, and returns one
//! [`Refusal`] type whose HTTP status and audit reason are decided here, in one place. HTTP handlers
//! parse, call and render; a request forwarded from another node will call the same functions.
//!
//! - [`agent`]: retrieve a submission, a fresh retrieve key, a conversation's history.
//! - [`visitor`]: look at the link, open the form, submit the answers (their refusals are pages:
//!   [`visitor::VisitorRefusal`]).

pub mod agent;
pub mod visitor;

use crate::domain::access::Denial;
use crate::vault::detokenize::Refusal as KeyRefusal;

/// Why a use case did not serve a request: the caller's (a 4xx with the reason code, which is also
/// the audit reason) or the service's (503 with Retry-After, 500): never a refusal for trouble on our
/// side, never a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The access rules said no (sender, site, permission, live conversation, unknown submission).
    Access(Denial),
    /// The retrieve key said no (invalid, spent, expired, other purpose or session, purged).
    Key(KeyRefusal),
    /// A fresh key was asked with a key that was never issued for the submission.
    PreviousKeyNotIssued,
    /// A fresh key was asked from another session while the key's own session is still open.
    SessionStillOpen,
    /// History is for agent managers.
    NotAManager,
    /// The node cannot read or write its state store.
    Unavailable,
    /// The node has not caught up with what the requester can have seen (after a restart, or a
    /// partition that just moved here); answering now could refuse a valid key.
    CatchingUp,
    /// The audit record could not be written, so nothing was returned.
    AuditUnavailable,
    /// The submission could not be opened (key ring, corrupt record).
    Internal,
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Access(Denial::UnknownSubmission) | Refusal::Key(KeyRefusal::UnknownSubmission) => 404,
            Refusal::Access(_)
            | Refusal::Key(_)
            | Refusal::PreviousKeyNotIssued
            | Refusal::SessionStillOpen
            | Refusal::NotAManager => 403,
            Refusal::Unavailable | Refusal::AuditUnavailable | Refusal::CatchingUp => 503,
            Refusal::Internal => 500,
        }
    }

    /// The reason code in the answer and in the audit record.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Access(d) => d.code(),
            Refusal::Key(r) => r.code(),
            Refusal::PreviousKeyNotIssued => "invalid_key",
            Refusal::SessionStillOpen => "wrong_session",
            Refusal::NotAManager => "not_a_manager",
            Refusal::Unavailable => "unavailable",
            Refusal::CatchingUp => "catching_up",
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::Internal => "internal_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Access(d) => d.message().to_string(),
            Refusal::Key(r) => r.to_string(),
            Refusal::PreviousKeyNotIssued => {
                "previous_key is not a retrieve key issued for this submission; a fresh key is given to the holder of one"
                    .into()
            }
            Refusal::SessionStillOpen => {
                "this submission's key belongs to another of your sessions that is still open; ask from that session"
                    .into()
            }
            Refusal::NotAManager => "conversation history is for agent managers".into(),
            Refusal::Unavailable => {
                "this node cannot read its state store; retry after the Retry-After seconds".into()
            }
            Refusal::CatchingUp => {
                "this node is catching up with this conversation's events; retry after the Retry-After seconds".into()
            }
            Refusal::AuditUnavailable => {
                "the request could not be audited, so nothing was returned; try again shortly with the same key".into()
            }
            Refusal::Internal => "the submission could not be opened".into(),
        }
    }
}

/// Waits until this node's `handlers` have caught up on `partition` (see [`crate::cluster::catch_up`]):
/// a refusal decided before that could be false. No partition (the request names none): no wait.
pub(crate) async fn catch_up(
    node: &crate::node::Node,
    handlers: &[&str],
    partition: Option<i32>,
) -> Result<(), Refusal> {
    let Some(partition) = partition else { return Ok(()) };
    match crate::cluster::catch_up(node, handlers, partition).await {
        Ok(()) => Ok(()),
        Err(crate::cluster::CatchUpError::Store(error)) => Err(Refusal::from(error)),
        Err(error) => {
            tracing::warn!(%error, "answered 503: this node has not caught up with the request's partition");
            Err(Refusal::CatchingUp)
        }
    }
}

impl From<crate::store::StoreError> for Refusal {
    fn from(error: crate::store::StoreError) -> Refusal {
        tracing::error!(%error, "cannot read the node's state store; check the data directory's disk");
        Refusal::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_refusals_are_4xx_and_the_services_trouble_is_5xx() {
        assert_eq!(Refusal::Access(Denial::UnknownSubmission).status(), 404);
        assert_eq!(Refusal::Key(KeyRefusal::UnknownSubmission).status(), 404);
        assert_eq!(Refusal::Access(Denial::NotSender).status(), 403);
        assert_eq!(Refusal::Key(KeyRefusal::KeySpent).code(), "key_spent");
        assert_eq!(Refusal::SessionStillOpen.code(), "wrong_session");
        assert_eq!((Refusal::Unavailable.status(), Refusal::AuditUnavailable.status()), (503, 503));
        assert_eq!(Refusal::Internal.status(), 500);
    }
}
