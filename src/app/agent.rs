//! The agent's use cases (seed steps 6-7): retrieve a submission with its one-time key, a fresh
//! retrieve key, and a conversation's history for managers. Every retrieval attempt, granted or
//! denied, is recorded as one FormRetrieved before anything is answered; answers never go into events
//! or logs.

use std::collections::BTreeMap;

use rand::SeedableRng;

use super::Refusal;
use crate::domain::access::{
    Denial, MANAGER_ROLE, Requester, SubmissionOwner, may_retrieve, may_view_responses_in_history,
};
use crate::domain::otk::OtkSecret;
use crate::events::{Event, EventHeader, EventKind, FormReady, FormRetrieved};
use crate::handlers::sessions::SessionsView;
use crate::handlers::visibility::VisibilityView;
use crate::node::Node;
use crate::vault::detokenize::{DetokenizeError, Retrieved};
use crate::vault::offrecord::{OffRecord, Secret};

/// The agent asking, as its verified token says.
pub struct Agent<'a> {
    pub id: &'a str,
    pub site: &'a str,
    /// The agent's session on the chat platform (`sid`).
    pub session: &'a str,
    pub roles: &'a [String],
    pub permissions: &'a [String],
}

impl Agent<'_> {
    fn requester(&self) -> Requester<'_> {
        Requester { agent_id: self.id, site_id: self.site, permissions: self.permissions }
    }
}

/// What a granted retrieval returns. Off-the-record answers were read once: they are forgotten.
pub struct Retrieval {
    pub retrieved: Retrieved,
}

/// A fresh retrieve key, delivered to the caller and as a FormReady.
pub struct FreshKey {
    pub retrieve_key: String,
    pub retrieve_expires_at: i64,
}

/// One secure form in a conversation's history.
pub struct HistoryEntry {
    pub owner: SubmissionOwner,
    pub submission_id: uuid::Uuid,
    /// Stored answers (never off-the-record ones), when the manager may see them.
    pub answers: Option<BTreeMap<String, Secret>>,
    /// Why the answers are not there, when they are not.
    pub note: Option<String>,
}

fn visibility(node: &Node) -> VisibilityView {
    VisibilityView::new(node.visibility.clone())
}

/// Records one retrieval attempt (relayed to Kafka by the audit log). `spent` is the key hash a
/// granted retrieval spent. Returns whether it was recorded.
async fn audit(
    node: &Node,
    owner: Option<&SubmissionOwner>,
    submission: &str,
    agent: (&str, Option<&str>),
    outcome: &str,
    reason: &str,
    spent: Option<&str>,
) -> bool {
    let (agent, session) = agent;
    let (site, conv, form) =
        owner.map(|o| (o.site_id.as_str(), o.conversation_id.as_str(), o.form_id.as_str())).unwrap_or(("", "", ""));
    let event = Event::FormRetrieved(FormRetrieved {
        header: EventHeader::new(EventKind::FormRetrieved, uuid::Uuid::new_v4(), (node.clock)(), site, conv, form),
        form_id: form.to_string(),
        submission_id: submission.to_string(),
        agent_id: agent.to_string(),
        session_id: session.map(str::to_string),
        outcome: outcome.to_string(),
        reason: reason.to_string(),
        // Linked into this node's chain when it is recorded.
        chain: None,
    });
    tracing::info!(submission_id = submission, agent_id = agent, outcome, reason, "retrieval attempt");
    node.metrics.retrieval(outcome == "granted", if reason.is_empty() { "ok" } else { reason });
    if spent.is_some() || ["invalid_key", "wrong_purpose", "key_expired", "key_spent"].contains(&reason) {
        node.metrics.otk("retrieve", if spent.is_some() { "accepted" } else { reason });
    }
    match node.audit.record(&event, spent).await {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, "could not record the retrieval audit event; check the data directory's disk");
            false
        }
    }
}

/// Records a retrieval attempt refused before it reached the use case (a refused token, a body that
/// does not parse): every attempt leaves one audit record. `agent` is who the token named, if anyone.
pub async fn record_refused_attempt(node: &Node, submission: &str, agent: Option<(&str, &str)>, reason: &str) {
    let owner = uuid::Uuid::parse_str(submission).ok().and_then(|id| visibility(node).owner(&id).ok().flatten());
    let (id, session) = agent.map(|(a, s)| (a, Some(s))).unwrap_or(("", None));
    audit(node, owner.as_ref(), submission, (id, session), "denied", reason, None).await;
}

/// Whether a denial could come from this node not having applied yet what the agent has seen (a
/// FormReady the workspace got, a transfer the chat bus made): then the node catches up and decides
/// again before anything is recorded.
fn lag_could_explain(r: &Refusal) -> bool {
    matches!(
        r,
        Refusal::Access(Denial::UnknownSubmission | Denial::NotSender)
            | Refusal::Key(
                crate::vault::detokenize::Refusal::UnknownSubmission | crate::vault::detokenize::Refusal::InvalidKey
            )
            | Refusal::PreviousKeyNotIssued
    )
}

/// The partition a request is about: the one its key names, else its conversation's.
fn partition_of(node: &Node, key: &str, owner: Option<&SubmissionOwner>) -> Option<i32> {
    OtkSecret::parse(key).and_then(|k| k.partition()).or_else(|| owner.map(|o| node.partition_of(&o.conversation_id)))
}

/// Retrieve a submission's answers with its one-time key: only the sender, with the permission,
/// while the conversation is live, with an unspent key of this purpose and session. A refusal that
/// this node's lag could explain is decided again once it has caught up (never a false refusal in
/// the audit trail); if it cannot catch up in time, 503.
pub async fn retrieve(node: &Node, agent: &Agent<'_>, submission: uuid::Uuid, key: &str) -> Result<Retrieval, Refusal> {
    let mut caught_up = false;
    loop {
        match try_retrieve(node, agent, submission, key, !caught_up).await {
            Err(Attempt::Lagging(partition)) => {
                super::catch_up(node, crate::cluster::RETRIEVAL_STATE, partition).await?;
                caught_up = true;
            }
            Err(Attempt::Final(r)) => return Err(r),
            Ok(r) => return Ok(r),
        }
    }
}

/// How one evaluation of a request ended, short of success.
enum Attempt {
    /// Refused, and recorded as refused.
    Final(Refusal),
    /// Would be refused, but this node may be behind: catch up on the partition and try again.
    Lagging(Option<i32>),
}

impl From<Refusal> for Attempt {
    fn from(r: Refusal) -> Attempt {
        Attempt::Final(r)
    }
}

impl From<crate::store::StoreError> for Attempt {
    fn from(e: crate::store::StoreError) -> Attempt {
        Attempt::Final(Refusal::from(e))
    }
}

async fn try_retrieve(
    node: &Node,
    agent: &Agent<'_>,
    submission: uuid::Uuid,
    key: &str,
    may_lag: bool,
) -> Result<Retrieval, Attempt> {
    let view = visibility(node);
    let id = submission.to_string();
    let who = (agent.id, Some(agent.session));
    let known = view.owner(&submission)?;
    let conv = match &known {
        Some(o) => view.conversation(&o.site_id, &o.conversation_id)?,
        None => None,
    };
    let owner = match may_retrieve(&agent.requester(), known.as_ref(), conv.as_ref()) {
        Ok(owner) => owner.clone(),
        Err(d) if may_lag && lag_could_explain(&Refusal::Access(d)) => {
            return Err(Attempt::Lagging(partition_of(node, key, known.as_ref())));
        }
        Err(d) => {
            audit(node, known.as_ref(), &id, who, "denied", d.code(), None).await;
            return Err(Refusal::Access(d).into());
        }
    };
    let sent_from = view.sent_from_session(&owner.site_id, &owner.form_id)?;
    let now = (node.clock)();
    let refused = |r: Refusal| async {
        audit(node, Some(&owner), &id, who, "denied", r.code(), None).await;
        Attempt::Final(r)
    };
    let got = match node.detokenizer.detokenize_in_session(
        agent.site,
        submission,
        key,
        Some(agent.session),
        sent_from.as_deref(),
        now,
    ) {
        Ok(got) => got,
        Err(DetokenizeError::Refused(r)) if may_lag && lag_could_explain(&Refusal::Key(r)) => {
            return Err(Attempt::Lagging(partition_of(node, key, Some(&owner))));
        }
        Err(DetokenizeError::Refused(r)) => return Err(refused(Refusal::Key(r)).await),
        Err(DetokenizeError::Store(error)) => {
            tracing::error!(%error, submission_id = %id, "cannot read the vault; check the data directory's disk");
            return Err(refused(Refusal::Unavailable).await);
        }
        Err(error) => {
            tracing::error!(%error, submission_id = %id, "detokenizing failed; check the master key and the key ring");
            return Err(refused(Refusal::Internal).await);
        }
    };
    if !audit(node, Some(&owner), &id, who, "granted", "", Some(&got.spent_key_hash)).await {
        // Nothing is returned, so nothing was spent: the same key works on a retry.
        node.detokenizer.release(&got.spent_key_hash);
        return Err(Refusal::AuditUnavailable.into());
    }
    // Off-the-record answers are read once: the granted retrieval that returns them forgets them.
    if matches!(&got.off_record, OffRecord::Present(a) if !a.is_empty()) {
        node.off_record.forget(&submission);
    }
    Ok(Retrieval { retrieved: got })
}

/// A fresh one-time retrieve key for the sender, while the conversation is live, for a caller that
/// holds a key issued for this submission before; bound to the caller's session. A key whose own
/// session is still open stays with it.
pub async fn fresh_key(
    node: &Node,
    agent: &Agent<'_>,
    submission: uuid::Uuid,
    previous_key: &str,
) -> Result<FreshKey, Refusal> {
    let mut caught_up = false;
    loop {
        match try_fresh_key(node, agent, submission, previous_key).await {
            Err(r) if !caught_up && lag_could_explain(&r) => {
                let known = visibility(node).owner(&submission)?;
                super::catch_up(
                    node,
                    crate::cluster::RETRIEVAL_STATE,
                    partition_of(node, previous_key, known.as_ref()),
                )
                .await?;
                caught_up = true;
            }
            other => return other,
        }
    }
}

async fn try_fresh_key(
    node: &Node,
    agent: &Agent<'_>,
    submission: uuid::Uuid,
    previous_key: &str,
) -> Result<FreshKey, Refusal> {
    let view = visibility(node);
    let known = view.owner(&submission)?;
    let conv = match &known {
        Some(o) => view.conversation(&o.site_id, &o.conversation_id)?,
        None => None,
    };
    let owner = may_retrieve(&agent.requester(), known.as_ref(), conv.as_ref()).map_err(Refusal::Access)?.clone();
    let detok = |e: DetokenizeError| match e {
        DetokenizeError::Store(error) => Refusal::from(error),
        other => {
            tracing::error!(error = %other, "cannot read the retrieval projection; check the data directory");
            Refusal::Unavailable
        }
    };
    if !node.detokenizer.was_issued(&owner.site_id, &submission, previous_key).map_err(detok)? {
        return Err(Refusal::PreviousKeyNotIssued);
    }
    // A token of another session plus a key read off the topic get nothing while the key's session
    // is open; once it ended, the agent's new session moves on.
    let bound = match node.detokenizer.key_session(&submission).map_err(detok)? {
        Some(s) => Some(s),
        None => view.sent_from_session(&owner.site_id, &owner.form_id)?,
    };
    if let Some(bound) = bound.filter(|b| b != agent.session)
        && !SessionsView::new(node.sessions.clone()).ended(&owner.site_id, &bound)?
    {
        return Err(Refusal::SessionStillOpen);
    }
    let t = (node.clock)();
    let ttl = node.settings.sites.get(&owner.site_id).map(|s| s.retrieve_key_ttl_secs).unwrap_or(60);
    let record = node.detokenizer.record(&submission).map_err(detok)?;
    let key =
        OtkSecret::generate_for(&mut rand::rngs::StdRng::from_os_rng(), node.partition_of(&owner.conversation_id));
    let ready = FormReady {
        header: EventHeader::new(
            EventKind::FormReady,
            uuid::Uuid::new_v4(),
            t,
            &owner.site_id,
            &owner.conversation_id,
            &owner.form_id,
        ),
        form_id: owner.form_id.clone(),
        submission_id: submission.to_string(),
        agent_id: owner.sender.clone(),
        retrieve_key: key.expose().to_string(),
        retrieve_expires_at: t + (ttl as i64) * 1000,
        off_record_field_ids: record.map(|r| r.off_record_field_ids).unwrap_or_default(),
        // Usable only from the session that asked for it.
        session_id: Some(agent.session.to_string()),
    };
    // Through the same ordered log as the audit events: the projection must see an earlier
    // retrieval's FormRetrieved before this key, or it would mark the new key spent.
    if let Err(error) = node.audit.record(&Event::FormReady(ready.clone()), None).await {
        tracing::error!(%error, "could not record a fresh retrieve key; check the data directory's disk");
        return Err(Refusal::Unavailable);
    }
    // Read-your-writes: the key is returned once this node's retrieval projection has it, so it
    // works as soon as the caller holds it.
    let deadline = std::time::Instant::now() + crate::cluster::CATCH_UP_WAIT;
    while !node.detokenizer.was_issued(&owner.site_id, &submission, &ready.retrieve_key).map_err(detok)? {
        if std::time::Instant::now() >= deadline {
            tracing::warn!(submission_id = %submission, "a fresh retrieve key was recorded but not yet applied here; answered 503 (the agent asks again). Check the audit relay and consumer_lag in /metrics");
            return Err(Refusal::CatchingUp);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(FreshKey { retrieve_key: ready.retrieve_key, retrieve_expires_at: ready.retrieve_expires_at })
}

/// A conversation's secure forms, for agent managers. Answers only with "view secure form responses
/// in conversation history" (off by default), each audited before it is returned; off-the-record
/// answers never.
pub async fn history(node: &Node, agent: &Agent<'_>, conversation: &str) -> Result<Vec<HistoryEntry>, Refusal> {
    if !agent.roles.iter().any(|r| r == MANAGER_ROLE) {
        return Err(Refusal::NotAManager);
    }
    let with_answers = may_view_responses_in_history(agent.permissions);
    // Complete as of now: everything the brokers hold for the conversation is applied first.
    super::catch_up(node, &["visibility", "tokenizer"], Some(node.partition_of(conversation))).await?;
    let view = visibility(node);
    let mut entries = Vec::new();
    for submission in view.submissions_in(agent.site, conversation)? {
        let Some(owner) = view.owner(&submission)? else { continue };
        let mut entry = HistoryEntry { owner, submission_id: submission, answers: None, note: None };
        if !with_answers {
            entry.note = Some("a secure form was submitted; responses are hidden".into());
        } else {
            match node.detokenizer.open_for_history(agent.site, submission) {
                Ok(answers) => {
                    // Recorded before any answer leaves the service (ADR 9).
                    let who = (agent.id, Some(agent.session));
                    let id = submission.to_string();
                    if !audit(node, Some(&entry.owner), &id, who, "granted", "history_view", None).await {
                        return Err(Refusal::AuditUnavailable);
                    }
                    entry.answers = Some(answers);
                }
                Err(DetokenizeError::Store(error)) => return Err(Refusal::from(error)),
                Err(e) => entry.note = Some(format!("responses unavailable: {e}")),
            }
        }
        entries.push(entry);
    }
    Ok(entries)
}
