//! Who may see a submission (seed step 6 and the visibility rules). Pure.
//!
//! An agent may retrieve a submission only if the token's site is the submission's site, the token
//! carries "use secure form within a conversation", the agent is the one who sent the form, and the
//! conversation is still live. A manager sees responses in conversation history only with "view
//! secure form responses in conversation history" (off by default), and never off-the-record ones.

use serde::{Deserialize, Serialize};

pub const USE_SECURE_FORM: &str = "use_secure_form";
pub const VIEW_RESPONSES_IN_HISTORY: &str = "view_secure_form_responses_in_history";
pub const MANAGER_ROLE: &str = "agent_manager";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub live: bool,
    /// The agent holding the conversation now (changes on transfer or reassignment).
    pub current_agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionOwner {
    pub site_id: String,
    pub conversation_id: String,
    pub form_id: String,
    /// The agent who sent the form: the only one who may retrieve it.
    pub sender: String,
    pub submitted_at: i64,
    pub template_id: String,
}

/// Why a retrieval was denied before any key was looked at. Codes go into FormRetrieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    UnknownSubmission,
    WrongSite,
    PermissionDenied,
    NotSender,
    ConversationClosed,
}

impl Denial {
    pub fn code(self) -> &'static str {
        match self {
            Denial::UnknownSubmission => "unknown_submission",
            Denial::WrongSite => "wrong_site",
            Denial::PermissionDenied => "permission_denied",
            Denial::NotSender => "not_sender",
            Denial::ConversationClosed => "conversation_closed",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Denial::UnknownSubmission => "no such submission",
            Denial::WrongSite => "the submission belongs to another site",
            Denial::PermissionDenied => "the token lacks the \"use secure form within a conversation\" permission",
            Denial::NotSender => "only the agent who sent the form can retrieve it",
            Denial::ConversationClosed => {
                "the conversation has ended; secure form data is only available while it is live"
            }
        }
    }
}

/// The agent asking, as its token says.
pub struct Requester<'a> {
    pub agent_id: &'a str,
    pub site_id: &'a str,
    pub permissions: &'a [String],
}

/// Whether `who` may retrieve a submission; when so, the submission's owner record (what the caller
/// acts on next).
pub fn may_retrieve<'a>(
    who: &Requester<'_>,
    owner: Option<&'a SubmissionOwner>,
    conversation: Option<&Conversation>,
) -> Result<&'a SubmissionOwner, Denial> {
    let owner = owner.ok_or(Denial::UnknownSubmission)?;
    if owner.site_id != who.site_id {
        return Err(Denial::WrongSite);
    }
    if !who.permissions.iter().any(|p| p == USE_SECURE_FORM) {
        return Err(Denial::PermissionDenied);
    }
    if owner.sender != who.agent_id {
        return Err(Denial::NotSender);
    }
    if !conversation.is_some_and(|c| c.live) {
        return Err(Denial::ConversationClosed);
    }
    Ok(owner)
}

/// Whether a manager's history view may show responses.
pub fn may_view_responses_in_history(permissions: &[String]) -> bool {
    permissions.iter().any(|p| p == VIEW_RESPONSES_IN_HISTORY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> SubmissionOwner {
        SubmissionOwner {
            site_id: "acme".into(),
            conversation_id: "c1".into(),
            form_id: "f1".into(),
            sender: "alice".into(),
            submitted_at: 0,
            template_id: "t".into(),
        }
    }

    fn live(agent: &str) -> Conversation {
        Conversation { live: true, current_agent: Some(agent.into()) }
    }

    fn ask(agent: &str, site: &str, perms: &[&str], conv: &Conversation) -> Result<(), Denial> {
        let permissions: Vec<String> = perms.iter().map(|p| p.to_string()).collect();
        let owner = owner();
        let allowed = may_retrieve(
            &Requester { agent_id: agent, site_id: site, permissions: &permissions },
            Some(&owner),
            Some(conv),
        )?;
        assert_eq!(allowed, &owner, "the owner record checked is the one returned");
        Ok(())
    }

    #[test]
    fn the_access_matrix() {
        let p = [USE_SECURE_FORM];
        assert_eq!(ask("alice", "acme", &p, &live("alice")), Ok(()), "the sender, live conversation");
        assert_eq!(ask("bob", "acme", &p, &live("alice")), Err(Denial::NotSender), "another agent in the conversation");
        assert_eq!(ask("carol", "acme", &p, &live("carol")), Err(Denial::NotSender), "the agent it was transferred to");
        let closed = Conversation { live: false, current_agent: Some("alice".into()) };
        assert_eq!(ask("alice", "acme", &p, &closed), Err(Denial::ConversationClosed), "the sender after close");
        assert_eq!(
            ask("alice", "acme", &[], &live("alice")),
            Err(Denial::PermissionDenied),
            "the sender without the permission"
        );
        assert_eq!(ask("alice", "other", &p, &live("alice")), Err(Denial::WrongSite), "a token of another site");
        assert_eq!(
            may_retrieve(
                &Requester { agent_id: "alice", site_id: "acme", permissions: &[USE_SECURE_FORM.into()] },
                None,
                None
            ),
            Err(Denial::UnknownSubmission)
        );
    }

    #[test]
    fn history_responses_need_the_permission_that_is_off_by_default() {
        assert!(!may_view_responses_in_history(&[]));
        assert!(!may_view_responses_in_history(&[USE_SECURE_FORM.into()]));
        assert!(may_view_responses_in_history(&[VIEW_RESPONSES_IN_HISTORY.into()]));
    }
}
