//! The idempotent producer (enable.idempotence, acks=all). Every event is keyed by its record key
//! (the conversation id for conversation events) so one conversation stays on one partition.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{KafkaError, KafkaSettings};
use crate::events::{Codec, Event};
use crate::topics::Topic;

#[derive(Clone)]
pub struct EventProducer {
    inner: FutureProducer,
    settings: KafkaSettings,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// How long librdkafka keeps retrying one record before giving up on it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl EventProducer {
    pub fn new(settings: &KafkaSettings) -> Result<EventProducer, KafkaError> {
        let inner: FutureProducer = settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string())
            .create()
            .map_err(|e| settings.client_error(e))?;
        Ok(EventProducer { inner, settings: settings.clone(), metrics: None })
    }

    /// Counts what this producer delivers, per topic.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> EventProducer {
        self.metrics = Some(metrics);
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

    /// Produces already-encoded bytes (outbox entries, re-driven dead letters).
    pub async fn send_raw(&self, topic: Topic, key: &[u8], payload: &[u8]) -> Result<(i32, i64), KafkaError> {
        let name = self.settings.names.name(topic);
        self.send_to(&name, key, payload).await
    }

    pub async fn send_to(&self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(i32, i64), KafkaError> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        let delivery = self.inner.send(record, DELIVERY_TIMEOUT).await;
        match delivery {
            Ok(d) => {
                if let Some(m) = &self.metrics {
                    m.produced(topic);
                }
                Ok((d.partition, d.offset))
            }
            Err((source, _)) => Err(KafkaError::Delivery { topic: topic.to_string(), source }),
        }
    }

    /// Waits for everything in flight (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.inner.flush(timeout) {
            tracing::warn!(%error, "producer flush did not complete; undelivered outbox entries are re-sent at next start");
        }
    }
}
