//! `purge`, `erase`, `replay` and `compliance`: the operations commands.

use std::io::IsTerminal;
use std::time::Duration;

use super::GlobalArgs;
use crate::config::Settings;
use crate::kafka::runtime::system_clock;
use crate::node::Node;
use crate::ops::erase::EraseTarget;
use crate::ops::{compliance, connect, erase, ops_settings, purge, replay};
use crate::service::{Service, StartOptions, kafka_settings};

/// How long an operations replica may take to catch up with the topics.
const CATCH_UP: Duration = Duration::from_secs(600);

/// Retention purge: remove submissions older than each site's retention and destroy the data keys
/// of periods that have fully expired (crypto-shredding), with SubmissionPurged receipts.
///
/// Runs on an operations replica under <data_dir>/ops (its own copy of the vault, built from the
/// topics), so it works beside a running node; every node applies the receipts to its own vault.
/// The service also purges on its own every purge_interval_secs.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  secureforms purge --as-of 2027-12-31 --dry-run\n  secureforms purge --as-of 2027-12-31T00:00:00Z --json"
)]
pub struct PurgeArgs {
    /// Purge as of this date: YYYY-MM-DD (the end of that day, UTC) or RFC 3339. Default: now.
    #[arg(long)]
    as_of: Option<String>,
    /// Report what would be purged; emit nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

/// Erase on request (GDPR): remove a conversation's submissions (or every conversation of a visitor
/// reference in a site) from the vault now, for good, and emit a SubmissionPurged receipt (reason
/// erasure) per conversation.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  secureforms erase --conversation conv-42\n  secureforms erase --site acme --conversation conv-42\n  secureforms erase --site acme --visitor-ref crm-7781 --json"
)]
pub struct EraseArgs {
    /// The conversation whose submissions to erase.
    #[arg(long, required_unless_present = "visitor_ref", conflicts_with = "visitor_ref")]
    conversation: Option<String>,
    /// The site; required with --visitor-ref.
    #[arg(long)]
    site: Option<String>,
    /// The visitor reference the chat bus sent with FormSent (v2).
    #[arg(long, requires = "site")]
    visitor_ref: Option<String>,
    #[arg(long)]
    json: bool,
}

/// Rebuild projections, or all of them and the vault, from the topics. Stop the node first (its
/// stores are locked while it runs). Resumes an interrupted replay; shows records/s and ETA on a
/// terminal; prints records read, applied, skipped as purged and dead-lettered.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  secureforms replay\n  secureforms replay --projection vault\n  secureforms replay --projection visibility --json"
)]
pub struct ReplayArgs {
    /// all, or one of: keys, issuer, tokenizer (vault), retrieval, gateway, visibility.
    #[arg(long, default_value = "all")]
    projection: String,
    #[arg(long)]
    json: bool,
}

/// Per site, which controls hold: PCI policy gate, permissions, framing, retention setting, purge
/// worker, data key ages. Exits 1 when a control fails.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  secureforms compliance\n  secureforms compliance --json > compliance.json")]
pub struct ComplianceArgs {
    #[arg(long)]
    json: bool,
}

/// Runs `f` with the brokers to use (see [`connect`]); an embedded broker started for the command
/// is stopped afterwards, whatever `f` returned.
async fn with_brokers<T>(settings: &Settings, f: impl AsyncFnOnce(String) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let (brokers, embedded) = connect(settings).await?;
    let result = f(brokers).await;
    if let Some(b) = embedded {
        b.stop().await;
    }
    result
}

/// Starts an operations replica, waits until it has caught up, runs `f`, stops.
async fn with_ops_node<T>(global: &GlobalArgs, f: impl AsyncFnOnce(&Node) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let settings = global.settings()?;
    crate::service::key_ring(&settings)?;
    with_brokers(&settings, async |brokers| {
        let mut service =
            Service::start_with(ops_settings(&settings), brokers, system_clock(), StartOptions::ops()).await?;
        eprintln!("catching up with the topics (operations replica in {})...", settings.data_dir.join("ops").display());
        let out = match service.wait_ready(CATCH_UP).await {
            Ok(()) => f(&service.node).await,
            Err(e) => Err(e.into()),
        };
        service.stop().await;
        out
    })
    .await
}

pub async fn purge(global: &GlobalArgs, a: PurgeArgs) -> anyhow::Result<()> {
    let as_of = match &a.as_of {
        Some(t) => crate::domain::retention::parse_as_of(t).map_err(anyhow::Error::msg)?,
        None => system_clock()(),
    };
    let report = with_ops_node(global, async |node: &Node| Ok(purge::purge(node, as_of, a.dry_run).await?)).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run { "would purge" } else { "purged" };
    println!(
        "retention purge as of {}{}",
        report.as_of,
        if report.dry_run { " (dry run: nothing emitted)" } else { "" }
    );
    if report.sites.is_empty() {
        println!("nothing has expired");
    }
    for s in &report.sites {
        println!(
            "{:<16} retention {:>2} months: {verb} {} submissions made before {}; data keys destroyed: {}",
            s.site_id,
            s.retention_months,
            s.submissions_purged,
            s.expired_before,
            if s.keys_destroyed.is_empty() { "none".to_string() } else { s.keys_destroyed.join(", ") }
        );
    }
    Ok(())
}

pub async fn erase(global: &GlobalArgs, a: EraseArgs) -> anyhow::Result<()> {
    let target = match (a.conversation, a.visitor_ref) {
        (Some(conversation), None) => EraseTarget::Conversation { site: a.site, conversation },
        (None, Some(visitor_ref)) => {
            let site = a.site.ok_or_else(|| anyhow::anyhow!("--visitor-ref needs --site"))?;
            EraseTarget::Visitor { site, visitor_ref }
        }
        _ => anyhow::bail!("pass --conversation ID, or --site SITE --visitor-ref REF"),
    };
    let report = with_ops_node(global, async |node: &Node| Ok(erase::erase(node, &target).await?)).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for c in &report.conversations {
        println!(
            "erased {} submissions of conversation {} in site {} (receipt {})",
            c.submissions_erased, c.conversation_id, c.site_id, c.receipt_event_id
        );
    }
    Ok(())
}

pub async fn replay(global: &GlobalArgs, a: ReplayArgs) -> anyhow::Result<()> {
    let settings = global.settings()?;
    crate::service::key_ring(&settings)?;
    let handlers = replay::parse_projection(&a.projection)?;
    let show_progress = std::io::stderr().is_terminal();
    let s = with_brokers(&settings, async |brokers| {
        Ok(replay::replay(&settings, &brokers, system_clock(), handlers, show_progress).await?)
    })
    .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "replayed {} in {:.1} s{}: {} records read, {} applied, {} skipped as purged, {} dead-lettered",
            s.handlers.join(", "),
            s.seconds,
            if s.resumed { " (resumed)" } else { "" },
            s.read,
            s.applied,
            s.skipped_as_purged,
            s.dead_lettered
        );
    }
    Ok(())
}

pub async fn compliance(global: &GlobalArgs, a: ComplianceArgs) -> anyhow::Result<()> {
    let settings = global.settings()?;
    let keys = with_brokers(&settings, async |brokers| {
        let kafka = kafka_settings(&settings, brokers, "compliance");
        Ok(tokio::task::block_in_place(|| compliance::read_keys(&kafka))?)
    })
    .await?;
    let report = compliance::report(&settings, &keys, system_clock()());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", compliance::render_text(&report));
    }
    let failing: Vec<&str> =
        report.sites.iter().filter(|s| s.status == compliance::Status::Fail).map(|s| s.site_id.as_str()).collect();
    if !failing.is_empty() {
        anyhow::bail!("controls fail for site(s) {}: see the fix lines above", failing.join(", "));
    }
    Ok(())
}
