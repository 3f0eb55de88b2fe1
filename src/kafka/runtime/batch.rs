//! One batch: decode, authenticate and apply each record, stage the outputs in the outbox, and commit
//! state, outbox and offsets to sled in one atomic write.

use std::collections::HashMap;

use rdkafka::message::{Message, OwnedMessage};

use super::dead_letter::{INBOUND_EVENT_MAX, dead_letter, record_mac, record_size};
use super::failpoint::failpoint;
use super::offsets::{offset_key, read_offset};
use super::outbox::{OutboxEntry, OutboxRow};
use super::{ApplyError, Handler, RecordMeta};
use crate::events::{Codec, Event};
use crate::kafka::{KafkaError, KafkaSettings};
use crate::store::{Store, Tx, trees};
use crate::topics::Topic;

/// Applies a batch and commits it to sled. Returns the outbox row it wrote (None when the batch
/// caused no outputs).
#[allow(clippy::too_many_arguments)] // the run loop's state, passed through as is
pub(super) async fn process_batch<H: Handler + ?Sized>(
    settings: &KafkaSettings,
    store: &Store,
    handler: &mut H,
    group: &str,
    batch: &[&OwnedMessage],
    emitted: &HashMap<(String, i32), i64>,
    moved: &super::placement::Moved,
    now_ms: i64,
    metrics: &crate::metrics::Metrics,
    verify_with: Option<&crate::crypto::mac::EventSigner>,
) -> Result<Option<OutboxRow>, KafkaError> {
    let mut tx = store.begin();
    let mut outbox = Vec::new();
    for m in batch {
        let okey = offset_key(group, m.topic(), m.partition());
        let next = tx.get(trees::OFFSETS, &okey)?.and_then(|v| read_offset(&v)).unwrap_or(0);
        if m.offset() < next {
            tracing::debug!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "already applied; skipped"
            );
            continue;
        }
        let topic = settings.names.parse(m.topic());
        if topic == Some(Topic::ChatEvents) && moved.contains(&(m.partition(), m.offset())) {
            // Applied on its conversation's partition, from the copy sent there.
            tx.insert(trees::OFFSETS, okey, (m.offset() + 1).to_be_bytes().to_vec());
            continue;
        }
        metrics.consumed(handler.name(), m.topic());
        let (outputs, replay) = match topic {
            None => (
                vec![dead_letter(m, group, "apply", format!("topic {} is not one this consumer knows", m.topic()))],
                false,
            ),
            Some(topic) => {
                let replay = emitted.get(&(m.topic().to_string(), m.partition())).is_some_and(|&e| m.offset() < e);
                let meta = RecordMeta { topic, partition: m.partition(), offset: m.offset(), replay };
                (apply_one(handler, &mut tx, m, &meta, group, now_ms, verify_with)?, replay)
            }
        };
        for e in &outputs {
            if let Event::DeadLetter(d) = e {
                metrics.dead_letter(handler.name(), &d.error_kind);
            }
        }
        // A replayed record's outputs were delivered by the run that first applied it: counted, not re-sent.
        let outputs = if replay { Vec::new() } else { outputs };
        for event in &outputs {
            let payload = Codec::get().encode(event)?;
            outbox.push(OutboxEntry { topic: event.kind().topic(), key: event.record_key().into_bytes(), payload });
        }
        tx.insert(trees::OFFSETS, okey, (m.offset() + 1).to_be_bytes().to_vec());
    }
    let row = if outbox.is_empty() {
        None
    } else {
        let key = OutboxRow::key(group, store.generate_id()?);
        tx.insert(trees::OUTBOX, key.clone(), OutboxRow::encode_entries(&outbox));
        Some(OutboxRow { key, entries: outbox })
    };
    failpoint(handler.name(), "before-commit");
    if row.is_some() {
        // Its outputs leave the node once this returns: the state that caused them is on the disk
        // first (ADR 4, 25).
        store.commit(tx).await?;
    } else {
        // Nothing leaves the node: state and offsets commit together, and a crash that loses them
        // only means the records are applied again from the topic (ADR 25).
        store.commit_lazy(tx)?;
    }
    Ok(row)
}

fn apply_one<H: Handler + ?Sized>(
    handler: &mut H,
    tx: &mut Tx<'_>,
    m: &OwnedMessage,
    meta: &RecordMeta,
    group: &str,
    now_ms: i64,
    verify_with: Option<&crate::crypto::mac::EventSigner>,
) -> Result<Vec<Event>, KafkaError> {
    let Some(payload) = m.payload() else {
        if meta.topic.spec().cleanup_policy == "compact" {
            return Ok(vec![]); // a tombstone
        }
        return Ok(vec![dead_letter(m, group, "decode", "record has no value".into())]);
    };
    let event = match Codec::get().decode(payload) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, topic = m.topic(), partition = m.partition(), offset = m.offset(), "undecodable record sent to the dead-letter topic; fix the producer, then re-drive it");
            return Ok(vec![dead_letter(m, group, error.kind(), error.to_string())]);
        }
    };
    let size = record_size(m);
    if !event.kind().service_only() && size > INBOUND_EVENT_MAX {
        tracing::warn!(
            event_type = event.kind().name(),
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            bytes = size,
            "a chat-bus event too large to answer was sent to the dead-letter topic; check its producer"
        );
        return Ok(vec![dead_letter(
            m,
            group,
            "too_large",
            format!(
                "{} of {size} bytes (key and value): events from outside this service are at most {INBOUND_EVENT_MAX} bytes, since what answers them repeats their ids and must fit in a record",
                event.kind().name()
            ),
        )]);
    }
    if let Some(signer) = verify_with
        && event.kind().service_only()
        && !signer.verify(m.key().unwrap_or_default(), payload, record_mac(m))
    {
        tracing::warn!(
            event_type = event.kind().name(),
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            "an event only this service produces arrived without its valid MAC and was sent to the dead-letter topic; someone else can write to this topic: check the topic ACLs"
        );
        return Ok(vec![dead_letter(
            m,
            group,
            "unauthenticated",
            format!(
                "{} without a valid {} header: not produced by this service (forged or altered), or written by a node with another master key: check that every node has the same SECUREFORMS_MASTER_KEY",
                event.kind().name(),
                crate::crypto::mac::HEADER
            ),
        )]);
    }
    match handler.apply(tx, &event, meta, now_ms) {
        Ok(outputs) => Ok(outputs),
        Err(ApplyError::Unprocessable(reason)) => {
            tracing::warn!(%reason, event_type = event.kind().name(), topic = m.topic(), partition = m.partition(), offset = m.offset(), "record could not be applied and was sent to the dead-letter topic");
            Ok(vec![dead_letter(m, group, "apply", reason)])
        }
        Err(ApplyError::Store(e)) => Err(e.into()),
    }
}
