//! The retention purge (ADR 0011). As of a clock, for each site:
//!
//! 1. submissions older than the site's retention (13 months by default) are read from the vault's
//!    retention index, a range scan that costs what expires, and listed in SubmissionPurged receipts
//!    (reason `retention`, at most [`RECEIPT_CHUNK`] ids each);
//! 2. data keys of periods whose every submission has expired are destroyed: DataKeyDestroyed, keyed
//!    by the key id on the compacted keys topic, so compaction drops the wrapped key it supersedes.
//!    Every copy of the ciphertext (the submissions topic, backups of the vault) is then unreadable;
//! 3. every node's tokenizer removes the listed submissions and tombstones them; this node waits
//!    until its own vault shows the result.
//!
//! Event ids are derived from what is purged, so two nodes purging the same set write the same ids
//! (consumers dedupe), and re-running a purge as of the same date is a no-op.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::DEFAULT_RETENTION_MONTHS;
use crate::domain::retention::{format_ms, period_expired};
use crate::events::{DataKeyDestroyed, Event, EventHeader, EventKind, SubmissionPurged};
use crate::kafka::KafkaError;
use crate::node::Node;
use crate::store::StoreError;
use crate::vault::VaultView;

/// How far past the node's clock a purge may be dated (clock skew between hosts).
const FUTURE_TOLERANCE_MS: i64 = 5 * 60 * 1000;

/// Most submission ids in one receipt (keeps records well under the broker's message size limit).
pub const RECEIPT_CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SitePurge {
    pub site_id: String,
    pub retention_months: u32,
    /// Submissions made before this instant had expired.
    pub expired_before: String,
    pub submissions_purged: usize,
    pub keys_destroyed: Vec<String>,
    pub receipts: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PurgeReport {
    pub as_of: String,
    pub dry_run: bool,
    pub sites: Vec<SitePurge>,
}

impl PurgeReport {
    pub fn submissions(&self) -> usize {
        self.sites.iter().map(|s| s.submissions_purged).sum()
    }

    pub fn keys(&self) -> usize {
        self.sites.iter().map(|s| s.keys_destroyed.len()).sum()
    }
}

/// Every site with data in the vault index, or a key, or a configuration (cost: one seek per site).
pub(crate) fn sites_with_data(node: &Node) -> Result<Vec<String>, StoreError> {
    let mut sites: std::collections::BTreeSet<String> = node.settings.sites.keys().cloned().collect();
    sites.extend(node.ring.list().into_iter().filter(|k| k.state == "active").map(|k| k.site));
    sites.extend(VaultView::new(node.vault.clone()).sites()?);
    Ok(sites.into_iter().collect())
}

fn retention_of(node: &Node, site: &str) -> u32 {
    node.settings.sites.get(site).map(|c| c.retention_months).unwrap_or(DEFAULT_RETENTION_MONTHS)
}

/// Expired submission ids of a site, oldest first (see [`VaultView::expired`]).
pub fn expired(
    vault: &crate::store::Store,
    site: &str,
    months: u32,
    as_of: i64,
) -> Result<Vec<uuid::Uuid>, StoreError> {
    VaultView::new(vault.clone()).expired(site, months, as_of)
}

fn receipt_id(site: &str, reason: &str, ids: &[uuid::Uuid], keys: &[String]) -> uuid::Uuid {
    let mut name = format!("purge/{reason}/{site}");
    for id in ids {
        name.push('/');
        name.push_str(&id.to_string());
    }
    for k in keys {
        name.push_str("/key:");
        name.push_str(k);
    }
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes())
}

/// Runs the retention purge as of `as_of` (ms). With `dry_run`, reports what would go and emits
/// nothing.
pub async fn purge(node: &Node, as_of: i64, dry_run: bool) -> Result<PurgeReport, OpsError> {
    let now = (node.clock)();
    if !dry_run && as_of > now + FUTURE_TOLERANCE_MS {
        return Err(OpsError::Invalid(format!(
            "--as-of {} is in the future (now is {}): a purge as of a future date would destroy data keys still in use; \
             preview it with --dry-run",
            format_ms(as_of),
            format_ms(now)
        )));
    }
    let mut report = PurgeReport { as_of: format_ms(as_of), dry_run, sites: Vec::new() };
    let mut waiting_ids = Vec::new();
    let mut waiting_keys = Vec::new();
    for site in sites_with_data(node)? {
        let months = retention_of(node, &site);
        let ids = expired(&node.vault, &site, months, as_of)?;
        // KeyRing::list is sorted by id.
        let keys: Vec<String> = node
            .ring
            .list()
            .into_iter()
            .filter(|k| k.state == "active" && k.site == site && period_expired(&k.period, months, as_of))
            .map(|k| k.id)
            .collect();
        if ids.is_empty() && keys.is_empty() {
            continue;
        }
        let mut sp = SitePurge {
            site_id: site.clone(),
            retention_months: months,
            expired_before: format_ms(crate::domain::retention::add_months(as_of, -(months as i32))),
            submissions_purged: ids.len(),
            keys_destroyed: keys.clone(),
            receipts: 0,
        };
        if !dry_run {
            // Keys first: a receipt only names keys that are destroyed.
            for key_id in &keys {
                let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("destroy/{key_id}").as_bytes());
                let event = Event::DataKeyDestroyed(DataKeyDestroyed {
                    header: EventHeader::new(EventKind::DataKeyDestroyed, id, now, &site, "", key_id),
                    key_id: key_id.clone(),
                    reason: "retention".into(),
                });
                node.producer.send(&event).await?;
                node.metrics.key_destroyed("retention");
                tracing::info!(key_id = %key_id, site_id = %site, "data key destroyed (retention); data sealed with it is now unreadable everywhere");
            }
            // One receipt (or more, in chunks) per conversation, keyed by it: it lands on the
            // conversation's partition, where whichever node owns that partition applies it.
            let vault = VaultView::new(node.vault.clone());
            let mut by_conversation: std::collections::BTreeMap<String, Vec<uuid::Uuid>> = Default::default();
            for id in &ids {
                let conversation = vault.conversation_of(id)?.unwrap_or_default();
                by_conversation.entry(conversation).or_default().push(*id);
            }
            let mut chunks: Vec<(&str, &[uuid::Uuid])> = by_conversation
                .iter()
                .flat_map(|(c, ids)| ids.chunks(RECEIPT_CHUNK).map(move |chunk| (c.as_str(), chunk)))
                .collect();
            if chunks.is_empty() {
                chunks.push(("", &[]));
            }
            let last = chunks.len() - 1;
            for (i, (conversation, chunk)) in chunks.into_iter().enumerate() {
                let destroyed = if i == last { keys.clone() } else { Vec::new() };
                let id = receipt_id(&site, "retention", chunk, &destroyed);
                let event = Event::SubmissionPurged(SubmissionPurged {
                    header: EventHeader::new(
                        EventKind::SubmissionPurged,
                        id,
                        now,
                        &site,
                        conversation,
                        &format!("retention/{site}"),
                    ),
                    submission_ids: chunk.iter().map(|u| u.to_string()).collect(),
                    reason: "retention".into(),
                    destroyed_key_ids: destroyed,
                    as_of,
                    count: chunk.len() as i32,
                });
                node.producer.send(&event).await?;
                sp.receipts += 1;
            }
            tracing::info!(site_id = %site, submissions = ids.len(), keys = keys.len(), receipts = sp.receipts, as_of = %report.as_of, "retention purge emitted");
            waiting_ids.extend(ids);
            waiting_keys.extend(keys);
        }
        report.sites.push(sp);
    }
    if !dry_run {
        wait_applied(node, &waiting_ids, &waiting_keys, Duration::from_secs(60)).await?;
        node.metrics.purge_runs.inc();
    }
    Ok(report)
}

/// Waits until this node's vault no longer holds `ids` and its key ring has destroyed `keys`.
pub async fn wait_applied(node: &Node, ids: &[uuid::Uuid], keys: &[String], timeout: Duration) -> Result<(), OpsError> {
    let deadline = std::time::Instant::now() + timeout;
    let vault = VaultView::new(node.vault.clone());
    let mut pending: Vec<uuid::Uuid> = ids.to_vec();
    loop {
        // A store that cannot be read keeps the submission pending: never reported as purged.
        pending.retain(|id| vault.holds(id).unwrap_or(true));
        let keys_left =
            keys.iter().filter(|k| !matches!(node.ring.get(k), Err(crate::crypto::KeyError::Destroyed(_)))).count();
        if pending.is_empty() && keys_left == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(OpsError::Timeout(format!(
                "the receipts were produced, but after {} s this node's vault still holds {} of the submissions and {keys_left} keys are not destroyed; \
                 check the tokenizer and keys consumers are running (consumer_lag in /metrics); they apply the receipts when they catch up",
                timeout.as_secs(),
                pending.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The purge worker: once the node is ready, purges as of the node's clock every
/// `purge_interval_secs`.
pub async fn worker(node: Arc<Node>, mut stop: watch::Receiver<bool>) -> Result<(), KafkaError> {
    let every = Duration::from_secs(node.settings.purge_interval_secs.max(1));
    loop {
        if node.metrics.is_ready() {
            match purge(&node, (node.clock)(), false).await {
                Ok(r) if r.submissions() + r.keys() > 0 => {
                    tracing::info!(submissions = r.submissions(), keys = r.keys(), "retention purge done")
                }
                Ok(_) => tracing::debug!("retention purge: nothing expired"),
                Err(error) => tracing::error!(%error, "retention purge failed; it runs again at the next interval"),
            }
        }
        let wait = if node.metrics.is_ready() { every } else { Duration::from_millis(500) };
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
