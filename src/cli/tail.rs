use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::GlobalArgs;
use crate::events::Codec;
use crate::events::codec::value_to_json;
use crate::kafka::ADMIN_TIMEOUT;
use crate::service::{kafka_settings, resolve_brokers};
use crate::topics::TopicNames;

/// Print a topic's events as JSON lines, decoded from Avro (like kcat, for our schemas).
///
/// Each line holds the record's partition, offset and key and the decoded event; bytes fields are
/// base64. A record that does not decode is printed with the error instead. Reads from the
/// beginning, joins no consumer group and commits nothing.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  secureforms tail form-links\n  secureforms tail secureforms.dead-letters --max 10\n  secureforms tail chat-events --from-end --idle-exit 30\n  secureforms tail dead-letters --until-end"
)]
pub struct Args {
    /// Topic: its short name (form-links) or its full name (secureforms.form-links).
    topic: String,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<usize>,
    /// Stop when no record arrived for this many seconds (default: follow forever).
    #[arg(long)]
    idle_exit: Option<u64>,
    /// Start at the end instead of the beginning.
    #[arg(long, conflicts_with = "until_end")]
    from_end: bool,
    /// Stop once every partition is read up to where it ended when tail started.
    #[arg(long)]
    until_end: bool,
}

pub async fn run(global: &GlobalArgs, args: Args) -> anyhow::Result<()> {
    let settings = global.settings()?;
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "tail");
    let names = TopicNames::new(settings.topic_prefix.clone());
    let topic = if names.parse(&args.topic).is_some() {
        args.topic.clone()
    } else if let Some(t) = crate::topics::Topic::from_suffix(&args.topic) {
        names.name(t)
    } else {
        args.topic.clone()
    };
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", format!("{}-tail-{}", settings.group_prefix, uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| kafka.client_error(e))?;
    let md = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(&topic), ADMIN_TIMEOUT))
        .map_err(|e| kafka.client_error(e))?;
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    let known = md.topics().first().map(|t| t.error().is_none()).unwrap_or(false);
    if partitions == 0 || !known {
        anyhow::bail!("topic {topic} does not exist; `secureforms topics list` shows the topics");
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(&topic, p, if args.from_end { Offset::End } else { Offset::Beginning })
            .context("building the assignment")?;
    }
    consumer.assign(&tpl).map_err(|e| kafka.client_error(e))?;
    // Partition -> offset tail must reach before it may stop (with --until-end).
    let mut remaining = std::collections::BTreeMap::new();
    if args.until_end {
        for p in 0..partitions as i32 {
            let (low, high) = tokio::task::block_in_place(|| consumer.fetch_watermarks(&topic, p, ADMIN_TIMEOUT))
                .map_err(|e| kafka.client_error(e))?;
            if high > low {
                remaining.insert(p, high);
            }
        }
    }

    let mut out = std::io::stdout().lock();
    let mut printed = 0usize;
    let mut last = Instant::now();
    loop {
        if args.max.is_some_and(|m| printed >= m) || (args.until_end && remaining.is_empty()) {
            break;
        }
        let wait = match args.idle_exit {
            Some(s) => {
                let left = Duration::from_secs(s).saturating_sub(last.elapsed());
                if left.is_zero() {
                    break;
                }
                left
            }
            None => Duration::from_secs(3600),
        };
        let m = match tokio::time::timeout(wait, consumer.recv()).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consume error");
                continue;
            }
            Ok(Ok(m)) => m,
        };
        last = Instant::now();
        if remaining.get(&m.partition()).is_some_and(|&end| m.offset() + 1 >= end) {
            remaining.remove(&m.partition());
        }
        let key = m.key().map(|k| String::from_utf8_lossy(k).to_string());
        let mut line =
            serde_json::json!({ "topic": m.topic(), "partition": m.partition(), "offset": m.offset(), "key": key });
        match m.payload().map(|p| Codec::get().decode_value(p)) {
            None => line["tombstone"] = true.into(),
            Some(Ok((kind, value))) => {
                line["type"] = kind.name().into();
                line["event"] = value_to_json(&value);
            }
            Some(Err(e)) => line["error"] = e.to_string().into(),
        }
        writeln!(out, "{line}")?;
        out.flush()?;
        printed += 1;
    }
    Ok(())
}
