//! The idempotent producer (enable.idempotence, acks=all). Every event is keyed by its record key
//! (the conversation id for conversation events) so one conversation stays on one partition.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{KafkaError, KafkaSettings};
use crate::crypto::mac::{self, EventSigner};
use crate::events::{Codec, Event};
use crate::topics::Topic;

/// Clones share one librdkafka producer. After a fatal error (an idempotence sequence the broker
/// refuses) or a record that timed out (the broker was away longer than the delivery timeout), the
/// shared producer is replaced by a fresh one with a new producer id, so the node recovers without a
/// restart; the records are retried by their callers (outbox, HTTP) with the same event ids.
#[derive(Clone)]
pub struct EventProducer {
    inner: Arc<RwLock<FutureProducer>>,
    settings: KafkaSettings,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Signs the events only this service produces (see [`crate::crypto::mac`]).
    signer: Option<Arc<EventSigner>>,
}

/// How long librdkafka keeps retrying one record before giving up on it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl EventProducer {
    pub fn new(settings: &KafkaSettings) -> Result<EventProducer, KafkaError> {
        let inner = create(settings)?;
        Ok(EventProducer {
            inner: Arc::new(RwLock::new(inner)),
            settings: settings.clone(),
            metrics: None,
            signer: None,
        })
    }

    fn current(&self) -> FutureProducer {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces `failed` by a fresh producer, unless another caller already did.
    fn reset(&self, failed: &FutureProducer, why: &str) {
        let mut slot = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if slot.client().native_ptr() != failed.client().native_ptr() {
            return;
        }
        match create(&self.settings) {
            Ok(fresh) => {
                tracing::warn!(
                    reason = why,
                    "producer replaced by a fresh one (new producer id); undelivered records are retried"
                );
                *slot = fresh;
                if let Some(m) = &self.metrics {
                    m.producer_resets.inc();
                }
            }
            Err(error) => tracing::error!(%error, "cannot create a fresh producer; keeping the failed one"),
        }
    }

    /// Counts what this producer delivers, per topic.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> EventProducer {
        self.metrics = Some(metrics);
        self
    }

    /// Signs what this producer sends of the kinds only the service produces. Only a producer of
    /// the service itself (or a CLI command acting as it) gets one.
    pub fn with_signer(mut self, signer: Arc<EventSigner>) -> EventProducer {
        self.signer = Some(signer);
        self
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Encodes and produces one event to its topic; returns (partition, offset) once the broker has
    /// acknowledged it on all in-sync replicas.
    pub async fn send(&self, event: &Event) -> Result<(i32, i64), KafkaError> {
        let payload = Codec::get().encode(event)?;
        self.send_raw(event.kind().topic(), event.record_key().as_bytes(), &payload).await
    }

    /// Produces already-encoded bytes of an event this service made (its outboxes), signed when
    /// this producer signs and the event is of a kind only the service produces.
    pub async fn send_raw(&self, topic: Topic, key: &[u8], payload: &[u8]) -> Result<(i32, i64), KafkaError> {
        let name = self.settings.names.name(topic);
        let tag = match &self.signer {
            Some(signer) if Codec::get().kind_of(payload).is_some_and(|k| k.service_only()) => {
                Some(signer.sign(key, payload))
            }
            _ => None,
        };
        self.send_with_mac(&name, key, payload, tag.as_deref()).await
    }

    /// Produces bytes as they are, never signed (raw chat-bus records, tools).
    pub async fn send_to(&self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(i32, i64), KafkaError> {
        self.send_with_mac(topic, key, payload, None).await
    }

    /// Produces bytes with the given MAC header (a re-driven dead letter keeps the one it came with).
    pub async fn send_with_mac(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        tag: Option<&str>,
    ) -> Result<(i32, i64), KafkaError> {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(tag) = tag {
            record = record.headers(OwnedHeaders::new().insert(Header { key: mac::HEADER, value: Some(tag) }));
        }
        let producer = self.current();
        let delivery = producer.send(record, DELIVERY_TIMEOUT).await;
        match delivery {
            Ok(d) => {
                if let Some(m) = &self.metrics {
                    m.produced(topic);
                }
                Ok((d.partition, d.offset))
            }
            Err((source, _)) => {
                if let Some(why) = needs_fresh_producer(&producer, &source) {
                    self.reset(&producer, why);
                }
                Err(KafkaError::Delivery { topic: topic.to_string(), source })
            }
        }
    }

    /// Waits for everything in flight (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.current().flush(timeout) {
            tracing::warn!(%error, "producer flush did not complete; undelivered outbox entries are re-sent at next start");
        }
    }
}

fn create(settings: &KafkaSettings) -> Result<FutureProducer, KafkaError> {
    let mut config = settings.client_config();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The Java client's partitioner (murmur2 of the key), so a chat bus in any language and this
        // service put a conversation on the same partition number of every topic.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", LINGER_MS)
        .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string());
    settings.finish(config).create().map_err(|e| settings.client_error(e))
}

/// How long the producer waits to fill a batch. Every event the service produces is awaited by
/// someone (a visitor's submit, the next hop of the flow), so batching buys little and costs latency.
const LINGER_MS: &str = "0";

/// Why a failed delivery calls for a fresh producer, if it does.
fn needs_fresh_producer(producer: &FutureProducer, error: &RdError) -> Option<&'static str> {
    if producer.client().fatal_error().is_some() {
        return Some("fatal producer error");
    }
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => {
            Some("record timed out (broker away longer than the delivery timeout)")
        }
        Some(
            RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::InvalidProducerEpoch,
        ) => Some("the broker refused the producer's sequence"),
        _ => None,
    }
}
