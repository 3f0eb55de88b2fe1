//! Operations: what ops run and watch besides the request path.
//!
//! - [`readiness`]: consumer lag per partition and the "caught up" latch behind `/readyz`.
//! - [`purge`]: the retention purge (13 months by default) with crypto-shredding, and its worker.
//! - [`erase`]: erasure on request (GDPR) by conversation or by site and visitor reference.
//! - [`replay`]: rebuilding projections and the vault from the topics, with progress.
//! - [`compliance`]: the per-site report of the seed's controls.
//!
//! Purge and erasure are decisions recorded as events (SubmissionPurged, DataKeyDestroyed): every
//! node applies them to its own vault, and a replay from the beginning applies them again, so a
//! removed answer never comes back.

pub mod compliance;
pub mod erase;
pub mod purge;
pub mod readiness;
pub mod replay;

use crate::config::Settings;

/// Where an operations replica keeps its state: its own copy of the keys, the vault and the
/// visibility projection, built from the topics under its own consumer groups, so it can run beside a
/// live node (whose stores it cannot open) and never takes that node's partitions.
pub fn ops_settings(settings: &Settings) -> Settings {
    let mut s = settings.clone();
    s.data_dir = settings.data_dir.join("ops");
    s.node_id = format!("{}-ops", settings.node_id);
    s.group_prefix = format!("{}-ops", settings.group_prefix);
    s
}

/// The brokers an operations command talks to: the configured ones, the embedded broker of a running
/// `serve` on this data dir, or an embedded broker started for the command (stopped with it).
pub async fn connect(
    settings: &Settings,
) -> Result<(String, Option<crate::broker::EmbeddedBroker>), crate::broker::BrokerError> {
    if let Some(b) = settings.brokers.as_ref().filter(|b| !b.trim().is_empty()) {
        return Ok((b.clone(), None));
    }
    if let Ok(addr) = crate::broker::running_address(&settings.data_dir) {
        return Ok((addr, None));
    }
    let b = crate::broker::EmbeddedBroker::start_for(settings).await?;
    Ok((b.addr().to_string(), Some(b)))
}
