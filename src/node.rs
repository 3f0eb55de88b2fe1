//! The node context: what every request handler of a running node shares (settings, producer, key
//! ring, stores, audit log, clock, metrics), below the HTTP gateway and the operations code that use
//! it and the wiring (`service`) that builds it. Also the one way a submission enters the system:
//! [`Node::submit`] seals it at the edge and makes it durable.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::domain::template::Template;
use crate::events::Event;
use crate::kafka::runtime::Clock;
use crate::kafka::{EventProducer, KafkaError, KafkaSettings};
use crate::store::Store;
use crate::vault::detokenize::Detokenizer;
use crate::vault::offrecord::{OffRecordStore, Secret};
use crate::vault::seal::{SealError, SubmissionContext, seal_submission};

/// Why a submission was not made durable. None of these is the visitor's fault.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("site {0:?} is not configured")]
    UnknownSite(String),
    #[error("no data key for the site: {0}")]
    Key(crate::handlers::keys::KeyCreationError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("the submission could not be produced: {0}")]
    Produce(KafkaError),
}

/// A visitor's submission as the gateway hands it over: already validated, not yet sealed.
pub struct Submission<'a> {
    pub site_id: &'a str,
    pub conversation_id: &'a str,
    pub form_id: &'a str,
    pub agent_id: &'a str,
    pub template: &'a Template,
    pub answers: BTreeMap<String, Secret>,
}

/// The parts of a running node that request handlers share.
pub struct Node {
    pub settings: Settings,
    pub kafka: KafkaSettings,
    pub producer: EventProducer,
    pub ring: Arc<KeyRing>,
    pub off_record: Arc<OffRecordStore>,
    pub detokenizer: Arc<Detokenizer>,
    /// The tokenizer's store (the vault), for inspection.
    pub vault: Store,
    /// The gateway projection's store (form key state).
    pub gateway: Store,
    /// The visibility projection's store (senders, live conversations).
    pub visibility: Store,
    /// The sessions projection's store (ended agent sessions, all of them on every node).
    pub sessions: Store,
    /// Audit events recorded on this node, relayed to Kafka.
    pub audit: Arc<crate::audit::AuditLog>,
    pub clock: Clock,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The handlers this node runs.
    pub handlers: Vec<HandlerInfo>,
    /// Signs and checks the events only the service produces (derived from the master key).
    pub signer: Arc<crate::crypto::mac::EventSigner>,
    /// The conversation partitions this node owns (see `kafka::runtime::Ownership`).
    pub ownership: Arc<crate::kafka::runtime::Ownership>,
    /// The partition count of the conversation-keyed topics on the broker.
    pub partitions: i32,
    /// The node directory's store (which node owns which partition, where it is reached).
    pub directory: Store,
    /// Signs and checks requests forwarded between nodes (`crypto::hop`).
    pub hop: Arc<crate::crypto::hop::HopSigner>,
    /// A client for watermarks (readiness and lag, replay's progress, read-your-writes in
    /// `cluster::catch_up`), made on first use: see [`Node::watermark_client`].
    pub watermarks: std::sync::OnceLock<Arc<rdkafka::consumer::BaseConsumer>>,
}

/// A handler this node runs: its name, its topics and its store (for readiness and lag).
#[derive(Clone)]
pub struct HandlerInfo {
    pub name: &'static str,
    /// Its consumer group (shared, or this node's own: see `kafka::runtime::Scope`).
    pub group: String,
    pub topics: Vec<crate::topics::Topic>,
    pub store: Store,
    /// Conversation-keyed (owned per partition) or read whole by every node.
    pub scope: crate::kafka::runtime::Scope,
}

impl Node {
    /// The node's one client for topic watermarks, made on first use (no group membership: it only
    /// reads metadata and watermarks).
    pub fn watermark_client(&self) -> Result<Arc<rdkafka::consumer::BaseConsumer>, crate::kafka::KafkaError> {
        if let Some(c) = self.watermarks.get() {
            return Ok(c.clone());
        }
        let client: rdkafka::consumer::BaseConsumer = self
            .kafka
            .client_config()
            .set("group.id", format!("{}-watermarks", self.kafka.group_prefix))
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| self.kafka.client_error(e))?;
        // Two callers racing here make two clients; one is kept.
        Ok(self.watermarks.get_or_init(|| Arc::new(client)).clone())
    }

    /// The partition of a conversation's events (murmur2, as the Java client places them).
    pub fn partition_of(&self, conversation_id: &str) -> i32 {
        crate::topics::partition_for(conversation_id.as_bytes(), self.partitions)
    }

    /// Seals a submission at the edge and produces it (acks=all) before returning, so the visitor is
    /// told it worked only once it is durable. Off-the-record answers stay in this node's memory.
    pub async fn submit(&self, s: Submission<'_>) -> Result<uuid::Uuid, SubmitError> {
        let site = self.settings.sites.get(s.site_id).ok_or_else(|| SubmitError::UnknownSite(s.site_id.to_string()))?;
        let now = (self.clock)();
        let key = crate::handlers::keys::current_key(&self.ring, &self.producer, s.site_id, now)
            .await
            .map_err(SubmitError::Key)?;
        let submission_id = uuid::Uuid::new_v4();
        let ctx = SubmissionContext {
            site_id: s.site_id,
            conversation_id: s.conversation_id,
            form_id: s.form_id,
            agent_id: s.agent_id,
            template: s.template,
            submission_id,
            event_id: uuid::Uuid::new_v4(),
            now_ms: now,
            node_id: &self.settings.node_id,
        };
        let sealed = seal_submission(&key, &ctx, s.answers)?;
        self.off_record.hold(submission_id, sealed.off_record, now + (site.off_record_ttl_secs as i64) * 1000);
        if let Err(e) = self.producer.send(&Event::FormSubmitted(sealed.event)).await {
            self.off_record.forget(&submission_id);
            return Err(SubmitError::Produce(e));
        }
        tracing::debug!(%submission_id, form_id = %s.form_id, site_id = %s.site_id, key_id = %key.id, "submission sealed and produced");
        Ok(submission_id)
    }
}
