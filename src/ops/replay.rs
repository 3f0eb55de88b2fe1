//! `secureforms replay`: rebuilds projections (and the vault) from the topics.
//!
//! - Wipes the chosen handlers' stores, then runs only those handlers until each has applied every
//!   record the topics held when the replay began (the same "caught up" test as `/readyz`).
//! - The keys go first when they are part of it, so the tokenizer knows which data keys were
//!   destroyed before it meets their submissions.
//! - Emits nothing already emitted: the handlers run under the node's own consumer groups, whose
//!   committed offsets mark what was delivered (ADR 0007).
//! - Resumable: a marker file records a replay in progress; running it again after an interruption
//!   continues from the offsets the stores hold instead of wiping again. Idempotent: a finished
//!   replay run again rebuilds the same state.
//! - The node must be stopped: its stores are locked while it runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::purge::OpsError;
use super::readiness::{positions, watermarks};
use crate::config::Settings;
use crate::kafka::runtime::Clock;
use crate::service::{ALL_HANDLERS, Service, ServiceError, StartOptions, store_dir};
use crate::store::Store;

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct ReplaySummary {
    pub handlers: Vec<String>,
    /// Records the handlers read (a record read by two handlers counts twice).
    pub read: u64,
    pub applied: u64,
    /// FormSubmitted records not stored because they were already purged (retention, erasure,
    /// destroyed key).
    pub skipped_as_purged: u64,
    pub dead_lettered: u64,
    /// The run continued an interrupted replay instead of starting over.
    pub resumed: bool,
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Marker {
    handlers: Vec<String>,
}

fn marker_path(settings: &Settings) -> PathBuf {
    settings.data_dir.join("state").join("replay-in-progress.json")
}

/// Parses `--projection`: a handler name or `all`.
pub fn parse_projection(name: &str) -> Result<Vec<&'static str>, OpsError> {
    let name = match name {
        "vault" => "tokenizer",
        other => other,
    };
    if name == "all" {
        return Ok(ALL_HANDLERS.to_vec());
    }
    ALL_HANDLERS.iter().find(|h| **h == name).map(|h| vec![*h]).ok_or_else(|| {
        OpsError::Invalid(format!(
            "unknown projection {name:?}; choose one of: all, {} (vault = tokenizer)",
            ALL_HANDLERS.join(", ")
        ))
    })
}

/// Refuses to touch stores a running node holds.
fn ensure_not_in_use(settings: &Settings, handlers: &[&'static str]) -> Result<(), OpsError> {
    for h in handlers {
        let dir = store_dir(settings, h);
        if dir.exists()
            && let Err(e) = Store::open_within(&dir, std::time::Duration::ZERO)
        {
            return Err(OpsError::Invalid(format!(
                "cannot open the {h} store at {} ({e}); is `secureforms serve` running on this data dir? Stop it first: replay rebuilds the node's own state",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Progress shown while a phase runs: a bar on a terminal (records/s, ETA), nothing otherwise.
fn progress_bar(total: u64, show: bool, phase: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} records  {per_sec}  ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(phase.to_string());
    bar
}

/// Runs one phase (a set of handlers) until caught up. Returns the node's metrics for the summary.
async fn run_phase(
    settings: &Settings,
    brokers: &str,
    clock: Clock,
    handlers: Vec<&'static str>,
    show_progress: bool,
) -> Result<Arc<crate::metrics::Metrics>, OpsError> {
    let mut service =
        Service::start_with(settings.clone(), brokers.to_string(), clock, StartOptions::handlers(handlers.clone()))
            .await
            .map_err(|e| OpsError::Invalid(e.to_string()))?;
    let node = service.node.clone();
    let topics: Vec<_> = node.handlers.iter().flat_map(|h| h.topics.clone()).collect();
    let marks = tokio::task::spawn_blocking({
        let node = node.clone();
        move || watermarks(&node, &topics)
    })
    .await
    .map_err(|e| OpsError::Invalid(e.to_string()))??;
    let at_start = positions(&node, &marks)?;
    let start: u64 = at_start.values().map(|p| *p as u64).sum();
    let total: u64 = at_start
        .iter()
        .map(|((_, t, p), pos)| marks.get(&(t.clone(), *p)).map(|(_, h)| (*h - *pos).max(0) as u64).unwrap_or(0))
        .sum();
    let bar = progress_bar(total, show_progress, &handlers.join("+"));
    let result = loop {
        let now: u64 = positions(&node, &marks)?.values().map(|p| *p as u64).sum();
        bar.set_position(now.saturating_sub(start).min(total));
        if node.metrics.is_ready() {
            break Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A handler that stopped (e.g. its storage failed) never catches up: surface its error.
        if service.failed() {
            break Err(OpsError::Invalid(
                "a handler stopped during the replay; see the log above, fix it, and run replay again (it resumes)"
                    .into(),
            ));
        }
    };
    bar.finish_and_clear();
    service.stop().await;
    result.map(|_| node.metrics.clone())
}

/// Rebuilds `handlers` from the topics. `show_progress` draws a bar on stderr when it is a terminal.
pub async fn replay(
    settings: &Settings,
    brokers: &str,
    clock: Clock,
    handlers: Vec<&'static str>,
    show_progress: bool,
) -> Result<ReplaySummary, OpsError> {
    let started = Instant::now();
    ensure_not_in_use(settings, &handlers)?;
    let marker = Marker { handlers: handlers.iter().map(|h| h.to_string()).collect() };
    let path = marker_path(settings);
    let resumed =
        std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Marker>(&b).ok()).is_some_and(|m| m == marker);
    let io = |e: std::io::Error| OpsError::Invalid(format!("cannot write {}: {e}", path.display()));
    if !resumed {
        std::fs::create_dir_all(path.parent().expect("marker has a parent")).map_err(io)?;
        std::fs::write(&path, serde_json::to_vec(&marker).expect("marker serializes")).map_err(io)?;
        for h in &handlers {
            let dir = store_dir(settings, h);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| OpsError::Invalid(format!("cannot wipe {}: {e}", dir.display())))?;
            }
        }
        tracing::info!(handlers = ?handlers, "stores wiped; replaying from the beginning of the topics");
    } else {
        tracing::info!(handlers = ?handlers, "continuing an interrupted replay from the offsets the stores hold");
    }
    let mut phases: Vec<Vec<&'static str>> = Vec::new();
    if handlers.contains(&"keys") && handlers.len() > 1 {
        phases.push(vec!["keys"]);
        phases.push(handlers.iter().copied().filter(|h| *h != "keys").collect());
    } else {
        phases.push(handlers.clone());
    }
    let mut summary = ReplaySummary { handlers: marker.handlers.clone(), resumed, ..Default::default() };
    for phase in phases {
        let metrics = run_phase(settings, brokers, clock.clone(), phase, show_progress).await?;
        let read = metrics.total("secureforms_events_consumed_total", &[]) as u64;
        let dead = metrics.total("secureforms_dead_letters_total", &[]) as u64;
        let skipped = metrics.total("secureforms_submissions_skipped_purged_total", &[]) as u64;
        summary.read += read;
        summary.dead_lettered += dead;
        summary.skipped_as_purged += skipped;
        summary.applied += read.saturating_sub(dead + skipped);
    }
    std::fs::remove_file(&path).map_err(io)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

impl From<ServiceError> for OpsError {
    fn from(e: ServiceError) -> Self {
        OpsError::Invalid(e.to_string())
    }
}
