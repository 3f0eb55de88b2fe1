//! Erasure on request (GDPR art. 17). One SubmissionPurged receipt (reason `erasure`) per
//! conversation, keyed by the conversation so it sits after that conversation's submissions in the
//! same partition: every node's tokenizer removes the listed submissions and every other submission
//! of the conversation it holds at that point, and tombstones them. A replay from the beginning
//! meets the submissions first and the receipt after, so it ends the same way; an erased
//! submission's ciphertext left on the submissions topic stays sealed, and becomes unreadable for
//! good when its period's data key is destroyed by the retention purge.

use std::time::Duration;

use serde::Serialize;

use super::purge::{OpsError, wait_applied};
use crate::domain::retention::format_ms;
use crate::events::{Event, EventHeader, EventKind, SubmissionPurged};
use crate::handlers::visibility::VisibilityView;
use crate::node::Node;
use crate::vault::VaultView;

/// Whose data to erase.
#[derive(Debug, Clone, PartialEq)]
pub enum EraseTarget {
    /// One conversation; in every site that has it unless a site is given.
    Conversation { site: Option<String>, conversation: String },
    /// Every conversation the chat bus tagged with this visitor reference in a site.
    Visitor { site: String, visitor_ref: String },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErasedConversation {
    pub site_id: String,
    pub conversation_id: String,
    pub submissions_erased: usize,
    pub receipt_event_id: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EraseReport {
    pub at: String,
    pub conversations: Vec<ErasedConversation>,
}

/// The (site, conversation) pairs a target names, from the visibility projection.
fn conversations(node: &Node, target: &EraseTarget) -> Result<Vec<(String, String)>, OpsError> {
    let known = VisibilityView::new(node.visibility.clone());
    let vault = VaultView::new(node.vault.clone());
    match target {
        EraseTarget::Conversation { site: Some(site), conversation } => Ok(vec![(site.clone(), conversation.clone())]),
        EraseTarget::Conversation { site: None, conversation } => {
            let sites = super::purge::sites_with_data(node)?;
            let mut out = Vec::new();
            for site in sites {
                if known.knows_conversation(&site, conversation)? || vault.has_conversation(&site, conversation)? {
                    out.push((site, conversation.clone()));
                }
            }
            if out.is_empty() {
                return Err(OpsError::Invalid(format!(
                    "no site knows conversation {conversation:?}; check the id, or pass --site to record an erasure receipt anyway"
                )));
            }
            Ok(out)
        }
        EraseTarget::Visitor { site, visitor_ref } => {
            let out: Vec<(String, String)> =
                known.visitor_conversations(site, visitor_ref)?.into_iter().map(|c| (site.clone(), c)).collect();
            if out.is_empty() {
                return Err(OpsError::Invalid(format!(
                    "site {site:?} has no conversation tagged with visitor reference {visitor_ref:?} (the chat bus sets visitor_ref on FormSent v2); \
                     erase by --conversation instead"
                )));
            }
            Ok(out)
        }
    }
}

/// Erases now: emits the receipts and waits until this node's vault no longer holds the submissions.
pub async fn erase(node: &Node, target: &EraseTarget) -> Result<EraseReport, OpsError> {
    let now = (node.clock)();
    let mut report = EraseReport { at: format_ms(now), conversations: Vec::new() };
    let mut all = Vec::new();
    for (site, conversation) in conversations(node, target)? {
        let ids = VaultView::new(node.vault.clone()).submissions_in(&site, &conversation)?;
        let event_id = uuid::Uuid::new_v4();
        let event = Event::SubmissionPurged(SubmissionPurged {
            header: EventHeader::new(
                EventKind::SubmissionPurged,
                event_id,
                now,
                &site,
                &conversation,
                &format!("erasure/{conversation}"),
            ),
            submission_ids: ids.iter().map(|u| u.to_string()).collect(),
            reason: "erasure".into(),
            destroyed_key_ids: Vec::new(),
            as_of: now,
            count: ids.len() as i32,
        });
        node.producer.send(&event).await?;
        tracing::info!(site_id = %site, conversation_id = %conversation, submissions = ids.len(), %event_id, "erasure receipt emitted");
        report.conversations.push(ErasedConversation {
            site_id: site,
            conversation_id: conversation,
            submissions_erased: ids.len(),
            receipt_event_id: event_id.to_string(),
        });
        all.extend(ids);
    }
    wait_applied(node, &all, &[], Duration::from_secs(60)).await?;
    Ok(report)
}
