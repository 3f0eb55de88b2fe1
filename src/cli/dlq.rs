use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;

use super::GlobalArgs;
use crate::events::{Codec, Event};
use crate::kafka::EventProducer;
use crate::kafka::reader::read_to_end;
use crate::service::{kafka_settings, resolve_brokers};
use crate::topics::Topic;

/// Dead letters: records a consumer could not decode or apply, kept with the reason.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters: source topic, partition, offset, error kind and reason.
    #[command(after_help = "Example:\n  secureforms dlq list\n  secureforms dlq list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// After fixing the cause, send dead letters back to their source topic, byte for byte, each
    /// once (progress is kept in the consumer group <group_prefix>-dlq-redrive). Consumers apply a
    /// re-driven record once: they dedupe on event ids and state.
    #[command(
        after_help = "Examples:\n  secureforms dlq redrive --dry-run\n  secureforms dlq redrive --error-kind apply --source-topic secureforms.keys"
    )]
    Redrive {
        /// Only letters with this error kind (decode, unknown_schema, apply).
        #[arg(long)]
        error_kind: Option<String>,
        /// Only letters from this source topic (full name).
        #[arg(long)]
        source_topic: Option<String>,
        /// Show what would be re-driven; send nothing, move no progress.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(global: &GlobalArgs, cmd: DlqCommand) -> anyhow::Result<()> {
    let settings = global.settings()?;
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "dlq");
    match cmd {
        DlqCommand::List { json } => {
            let records = tokio::task::block_in_place(|| read_to_end(&kafka, Topic::DeadLetters))?;
            let mut rows = Vec::new();
            for m in &records {
                if let Some(Ok(Event::DeadLetter(d))) = m.payload().map(|p| Codec::get().decode(p)) {
                    rows.push(serde_json::json!({"dlq_offset": m.offset(), "source_topic": d.source_topic, "source_partition": d.source_partition,
                        "source_offset": d.source_offset, "error_kind": d.error_kind, "reason": d.reason, "consumer_group": d.consumer_group,
                        "bytes": d.payload.len(), "redrive_count": d.redrive_count}));
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{} dead letter(s)", rows.len());
                for r in rows {
                    println!(
                        "{}/{}@{} [{}] {}",
                        r["source_topic"].as_str().unwrap_or(""),
                        r["source_partition"],
                        r["source_offset"],
                        r["error_kind"].as_str().unwrap_or(""),
                        r["reason"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Redrive { error_kind, source_topic, dry_run } => {
            let producer = EventProducer::new(&kafka)?;
            let group = format!("{}-dlq-redrive", settings.group_prefix);
            let consumer: StreamConsumer = kafka
                .client_config()
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .map_err(|e| kafka.client_error(e))?;
            let topic = kafka.names.name(Topic::DeadLetters);
            consumer.subscribe(&[&topic]).map_err(|e| kafka.client_error(e))?;
            // Stop once every partition is done up to where it ended when we started.
            let md = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(&topic), crate::kafka::ADMIN_TIMEOUT))
                .map_err(|e| kafka.client_error(e))?;
            let partitions = md.topics().first().map(|t| t.partitions().len() as i32).unwrap_or(0);
            let mut ends = std::collections::BTreeMap::new();
            for p in 0..partitions {
                let (_, high) =
                    tokio::task::block_in_place(|| consumer.fetch_watermarks(&topic, p, crate::kafka::ADMIN_TIMEOUT))
                        .map_err(|e| kafka.client_error(e))?;
                ends.insert(p, high);
            }
            let mut done: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
            let (mut sent, mut skipped, mut repeats) = (0, 0, 0);
            // Every consumer group that could not take a record dead-letters it: one re-drive of
            // the record reaches them all.
            let mut seen = std::collections::HashSet::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let finished = |done: &std::collections::BTreeMap<i32, i64>| {
                    ends.iter().all(|(p, high)| done.get(p).copied().unwrap_or(0) >= *high)
                };
                if finished(&done) {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "could not read the dead-letter topic to its end within 120 s; check the brokers and run again (progress is kept)"
                    );
                }
                let m = match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => return Err(kafka.client_error(e).into()),
                    Err(_) => {
                        // Idle: what the group already committed counts as done.
                        if let Ok(committed) =
                            tokio::task::block_in_place(|| consumer.committed(Duration::from_secs(5)))
                        {
                            for e in committed.elements() {
                                if let rdkafka::Offset::Offset(o) = e.offset() {
                                    let d = done.entry(e.partition()).or_insert(0);
                                    *d = (*d).max(o);
                                }
                            }
                        }
                        continue;
                    }
                };
                let entry = done.entry(m.partition()).or_insert(0);
                *entry = (*entry).max(m.offset() + 1);
                let letter = match m.payload().map(|p| Codec::get().decode(p)) {
                    Some(Ok(Event::DeadLetter(d))) => d,
                    _ => {
                        skipped += 1;
                        continue;
                    }
                };
                let wanted = error_kind.as_ref().is_none_or(|k| *k == letter.error_kind)
                    && source_topic.as_ref().is_none_or(|t| *t == letter.source_topic);
                if !wanted {
                    skipped += 1;
                } else if !seen.insert((letter.source_topic.clone(), letter.source_partition, letter.source_offset)) {
                    repeats += 1;
                } else if letter.payload.is_empty() && letter.reason.contains(crate::kafka::runtime::NOT_COPIED) {
                    // Nothing to send back: the record was too large to copy into the letter.
                    println!(
                        "left {}/{}@{}: the record was too large to copy into its letter; fix its producer and produce it again",
                        letter.source_topic, letter.source_partition, letter.source_offset
                    );
                    skipped += 1;
                } else if dry_run {
                    println!(
                        "would re-drive {}/{}@{} ({})",
                        letter.source_topic, letter.source_partition, letter.source_offset, letter.reason
                    );
                    sent += 1;
                    continue;
                } else {
                    // Exactly what came, with the MAC it came with (if any): a re-drive never signs.
                    producer
                        .send_with_mac(
                            &letter.source_topic,
                            letter.source_key.as_deref().unwrap_or_default(),
                            &letter.payload,
                            letter.source_mac.as_deref(),
                        )
                        .await?;
                    println!("re-drove {}/{}@{}", letter.source_topic, letter.source_partition, letter.source_offset);
                    sent += 1;
                }
                consumer.commit_message(&m, CommitMode::Sync).map_err(|e| kafka.client_error(e))?;
            }
            println!(
                "{} {} dead letter(s), {} left as they are, {} of the same records from other consumer groups",
                if dry_run { "would re-drive" } else { "re-drove" },
                sent,
                skipped,
                repeats
            );
            Ok(())
        }
    }
}
