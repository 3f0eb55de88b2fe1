//! `secureforms audit verify`: checks the tamper-evident chains of FormRetrieved records on
//! `agent-events` end to end.

use anyhow::Context;

use super::GlobalArgs;
use crate::audit::{AuditChain, verify};
use crate::events::{Codec, Event};
use crate::service::{integrity_key, kafka_settings, master_key, resolve_brokers};
use crate::topics::Topic;

/// The audit trail.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check every node's chain of FormRetrieved records on agent-events: each record's MAC (an edit
    /// shows), and per node an unbroken run of sequence numbers from 1 (a deleted record shows).
    /// Exits 1 when anything is wrong, naming the node and the sequence numbers.
    #[command(after_help = "Examples:\n  secureforms audit verify\n  secureforms audit verify --json")]
    Verify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(global: &GlobalArgs, cmd: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::Verify { json } = cmd;
    let settings = global.settings()?;
    let master = master_key(&settings).context("the chain's key comes from the master key or integrity_key_file")?;
    let chain = AuditChain::new(&integrity_key(&settings, &master)?, &settings.node_id);
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "audit");
    let records = tokio::task::block_in_place(|| crate::kafka::reader::read_to_end(&kafka, Topic::AgentEvents))?;
    let retrieved = records.iter().filter_map(|m| {
        let payload = rdkafka::message::Message::payload(m)?;
        match Codec::get().decode(payload) {
            Ok(Event::FormRetrieved(r)) => Some(r),
            _ => None,
        }
    });
    let report = verify(&chain, retrieved);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (node, (n, first, last)) in &report.nodes {
            println!("node {node}: {n} records, seq {first} to {last}");
        }
        if report.unchained > 0 {
            println!("{} FormRetrieved records carry no chain (written before schema version 2)", report.unchained);
        }
        for p in &report.problems {
            println!("PROBLEM: {p}");
        }
        if report.problems.is_empty() {
            println!("ok: every chain is intact");
        }
    }
    if !report.problems.is_empty() {
        anyhow::bail!("the audit trail failed verification ({} problems)", report.problems.len());
    }
    Ok(())
}
