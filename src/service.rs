//! `secureforms serve`: connects to the brokers (or starts the embedded one), makes sure the topics
//! exist, publishes the configured templates, and runs the handlers until shutdown.
//!
//! Tasks and channels: each handler runs as one tokio task owning one consumer and one sled store
//! (see `kafka::runtime`); a `watch` channel carries the shutdown notice; each task finishes its
//! batch, commits, and returns, and the service waits for all of them before stopping the embedded
//! broker.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::broker::{self, BrokerError, EmbeddedBroker};
use crate::config::Settings;
use crate::crypto::{KeyError, KeyRing, MasterKey};
use crate::events::{Event, EventHeader, EventKind, FormTemplateDefined};
use crate::handlers::gateway::GatewayProjection;
use crate::handlers::issuer::Issuer;
use crate::handlers::keys::{KeysHandler, load_ring};
use crate::handlers::retrieval::RetrievalProjection;
use crate::handlers::tokenizer::Tokenizer;
use crate::handlers::visibility::VisibilityProjection;
use crate::kafka::admin::Admin;
use crate::kafka::runtime::{self, Clock};
use crate::kafka::{EventProducer, Handler, KafkaError, KafkaSettings};
use crate::store::{Store, StoreError};
use crate::topics::{TopicAction, TopicNames};
use crate::domain::template::Template;
use crate::vault::detokenize::Detokenizer;
use crate::vault::offrecord::{OffRecordStore, Secret};
use crate::vault::seal::{SealError, SubmissionContext, seal_submission};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("handler {0} stopped unexpectedly: {1}")]
    HandlerStopped(&'static str, String),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("site {0:?} is not configured")]
    UnknownSite(String),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
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

/// Kafka settings for a set of bootstrap servers.
pub fn kafka_settings(settings: &Settings, brokers: String, client: &str) -> KafkaSettings {
    KafkaSettings {
        brokers,
        names: TopicNames::new(settings.topic_prefix.clone()),
        group_prefix: settings.group_prefix.clone(),
        client_id: format!("secureforms-{}-{client}", settings.node_id),
        max_batch: settings.max_batch,
    }
}

/// The brokers a command talks to: the configured ones, or the embedded broker of a running `serve`.
pub fn resolve_brokers(settings: &Settings) -> Result<String, BrokerError> {
    match &settings.brokers {
        Some(b) if !b.trim().is_empty() => Ok(b.clone()),
        _ => broker::running_address(&settings.data_dir),
    }
}

/// Where each store lives. The vault has its own directory: deleting it and restarting rebuilds it
/// from the topics.
pub fn store_dir(settings: &Settings, handler: &str) -> PathBuf {
    match handler {
        "tokenizer" => settings.data_dir.join("vault"),
        other => settings.data_dir.join("state").join(other),
    }
}

pub fn master_key(settings: &Settings) -> Result<MasterKey, KeyError> {
    let env = std::env::var("SECUREFORMS_MASTER_KEY").ok();
    MasterKey::load(env.as_deref(), settings.master_key_file.as_deref())
}

/// Publishes each configured template once per version, so templates are events and replayable.
pub async fn publish_templates(settings: &Settings, producer: &EventProducer, store: &Store, now_ms: i64) -> Result<usize, ServiceError> {
    let published = store.tree("sys.templates_published")?;
    let mut count = 0;
    for (site_id, site) in &settings.sites {
        for t in &site.templates {
            let key = format!("{site_id}/{}/{}", t.id, t.version);
            if published.contains_key(&key).map_err(StoreError::from)? {
                continue;
            }
            let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("template/{key}").as_bytes());
            let event = Event::FormTemplateDefined(FormTemplateDefined {
                header: EventHeader::new(EventKind::FormTemplateDefined, id, now_ms, site_id, "", &t.id),
                template_id: t.id.clone(),
                version: t.version,
                title: t.title.clone(),
                instructions: t.instructions.clone(),
                questions: t.to_event_questions(),
            });
            producer.send(&event).await?;
            published.insert(key.as_bytes(), &[1u8][..]).map_err(StoreError::from)?;
            count += 1;
        }
    }
    store.flush().await?;
    Ok(count)
}

/// Creates missing topics and logs drift.
pub async fn apply_topics(kafka: &KafkaSettings, replication_factor: i32) -> Result<Vec<TopicAction>, KafkaError> {
    let actions = Admin::new(kafka)?.apply(replication_factor).await?;
    let created = actions.iter().filter(|a| matches!(a, TopicAction::Create { .. })).count();
    if created > 0 {
        tracing::info!(created, prefix = %kafka.names.prefix(), "topics created");
    }
    for a in &actions {
        match a {
            TopicAction::Create { name, .. } => tracing::debug!(topic = %name, "topic created"),
            TopicAction::Drift { name, differences } => {
                tracing::warn!(topic = %name, differences = %differences.join("; "), "topic differs from its declaration in topics/; change it on the broker or in the file")
            }
            TopicAction::UpToDate { .. } => {}
        }
    }
    Ok(actions)
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
    /// The visibility projection's store (senders, live conversations, ended sessions).
    pub visibility: Store,
    /// Audit events recorded on this node, relayed to Kafka.
    pub audit: Arc<crate::audit::AuditLog>,
    pub clock: Clock,
}

/// A running service: its shared parts and its tasks (handlers, sweeper, HTTP server).
pub struct Service {
    pub node: Arc<Node>,
    /// Where the HTTP gateway listens, when it runs.
    pub http_addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, Result<(), KafkaError>)>,
}

impl std::ops::Deref for Service {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Service {
    /// Starts every handler against `brokers`, and the HTTP gateway when `http_listen` is set. The
    /// master key must be configured.
    pub async fn start(settings: Settings, brokers: String, clock: Clock) -> Result<Service, ServiceError> {
        let master = master_key(&settings)?;
        let kafka = kafka_settings(&settings, brokers, "service");
        apply_topics(&kafka, settings.replication_factor).await?;
        let producer = EventProducer::new(&kafka)?;
        let stores = ["issuer", "keys", "tokenizer", "retrieval", "gateway", "visibility", "audit"]
            .into_iter()
            .map(|h| Ok((h, Store::open(&store_dir(&settings, h))?)))
            .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
        let n = publish_templates(&settings, &producer, &stores["issuer"], clock()).await?;

        let ring = Arc::new(KeyRing::new(master));
        let keys_loaded = load_ring(&ring, &stores["keys"])?;
        let off_record = Arc::new(OffRecordStore::new());
        let (audit, audit_writer) = crate::audit::AuditLog::open(stores["audit"].clone())?;
        let detokenizer =
            Arc::new(Detokenizer::new(stores["tokenizer"].clone(), stores["retrieval"].clone(), ring.clone(), off_record.clone()).with_audit(audit.clone()));
        let (stop, stop_rx) = watch::channel(false);
        let node = Arc::new(Node {
            settings,
            kafka,
            producer,
            ring,
            off_record,
            detokenizer,
            vault: stores["tokenizer"].clone(),
            gateway: stores["gateway"].clone(),
            visibility: stores["visibility"].clone(),
            audit,
            clock,
        });
        let mut service = Service { node: node.clone(), http_addr: None, stop, tasks: JoinSet::new() };
        let sites = Arc::new(node.settings.sites.clone());
        service.spawn(KeysHandler::new(node.ring.clone()), &stores["keys"], &stop_rx);
        service.spawn(Issuer::new(sites.clone(), node.settings.public_url.clone()), &stores["issuer"], &stop_rx);
        service.spawn(Tokenizer::new(sites), &stores["tokenizer"], &stop_rx);
        service.spawn(RetrievalProjection, &stores["retrieval"], &stop_rx);
        service.spawn(GatewayProjection, &stores["gateway"], &stop_rx);
        service.spawn(VisibilityProjection, &stores["visibility"], &stop_rx);
        {
            let (audit, producer, stop) = (node.audit.clone(), node.producer.clone(), stop_rx.clone());
            service.tasks.spawn(async move { ("audit relay", audit.relay(producer, stop).await) });
            let stop = stop_rx.clone();
            service.tasks.spawn(async move { ("audit writer", audit_writer.run(stop).await) });
        }
        {
            // Expired off-the-record answers are dropped (and zeroized) within seconds.
            let (store, clock, mut stop) = (node.off_record.clone(), node.clock.clone(), stop_rx.clone());
            service.tasks.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => return ("off-record sweeper", Ok(())),
                        _ = tick.tick() => {
                            let dropped = store.sweep(clock());
                            if dropped > 0 {
                                tracing::debug!(dropped, "expired off-the-record answers dropped");
                            }
                        }
                    }
                }
            });
        }
        if let Some(listen) = node.settings.http_listen.clone().filter(|l| !l.is_empty()) {
            let server = crate::http::bind(node.clone(), &listen).await?;
            service.http_addr = Some(server.local_addr());
            let mut stop = stop_rx.clone();
            service.tasks.spawn(async move {
                let result = server.run(async move { let _ = stop.changed().await; }).await;
                ("http gateway", result.map_err(|e| KafkaError::Topic { topic: "http".into(), message: e.to_string() }))
            });
        }
        tracing::info!(templates_published = n, keys_loaded, brokers = %node.kafka.brokers, http = ?service.http_addr, master_key_id = %node.ring.master().id(), "service starting");
        Ok(service)
    }

    fn spawn<H: Handler>(&mut self, handler: H, store: &Store, stop: &watch::Receiver<bool>) {
        let name = handler.name();
        let n = &self.node;
        let (k, s, p, c, r) = (n.kafka.clone(), store.clone(), n.producer.clone(), n.clock.clone(), stop.clone());
        self.tasks.spawn(async move { (name, runtime::run(k, s, p, handler, c, r).await) });
    }

    /// Waits until `shutdown` resolves or a task fails, then stops everything.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
        let failure = tokio::select! {
            _ = shutdown => { tracing::info!("shutdown requested; finishing in-flight batches"); None }
            Some(joined) = self.tasks.join_next() => Some(match joined {
                Ok((name, Ok(()))) => ServiceError::HandlerStopped(name, "it returned without being asked to stop".into()),
                Ok((name, Err(e))) => ServiceError::HandlerStopped(name, e.to_string()),
                Err(e) => ServiceError::HandlerStopped("unknown", e.to_string()),
            }),
        };
        self.stop().await;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Asks every task to stop after its batch, and waits for them.
    pub async fn stop(&mut self) {
        let _ = self.stop.send(true);
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok((name, Err(error))) = joined {
                tracing::error!(%error, handler = name, "task failed while stopping");
            }
        }
        self.node.producer.flush(std::time::Duration::from_secs(10));
        tracing::info!("service stopped");
    }
}

impl Node {
    /// Seals a submission at the edge and produces it (acks=all) before returning, so the visitor is
    /// told it worked only once it is durable. Off-the-record answers stay in this node's memory.
    pub async fn submit(&self, s: Submission<'_>) -> Result<uuid::Uuid, ServiceError> {
        let site = self.settings.sites.get(s.site_id).ok_or_else(|| ServiceError::UnknownSite(s.site_id.to_string()))?;
        let now = (self.clock)();
        let key = crate::handlers::keys::current_key(&self.ring, &self.producer, s.site_id, now).await?;
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
            return Err(e.into());
        }
        tracing::debug!(%submission_id, form_id = %s.form_id, site_id = %s.site_id, key_id = %key.id, "submission sealed and produced");
        Ok(submission_id)
    }
}

/// Runs the whole service until `shutdown` resolves.
pub async fn serve(settings: Settings, clock: Clock, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    if settings.sites.is_empty() {
        tracing::warn!("no sites are configured, so every FormSent will be rejected; pass --config with a [sites.<id>] table (see config/secureforms.example.toml)");
    }
    // Fail on a missing master key before starting anything.
    master_key(&settings)?;
    let embedded = match &settings.brokers {
        Some(b) if !b.trim().is_empty() => None,
        _ => {
            let bin = broker::find_binary(settings.broker_bin.as_deref())?;
            Some(EmbeddedBroker::start(&bin, &settings.data_dir, settings.embedded_broker_port).await?)
        }
    };
    let brokers = embedded.as_ref().map(|b| b.addr().to_string()).or_else(|| settings.brokers.clone()).unwrap_or_default();
    let result = match Service::start(settings, brokers, clock).await {
        Ok(service) => service.run_until(shutdown).await,
        Err(e) => Err(e),
    };
    if let Some(b) = embedded {
        b.stop().await;
    }
    result
}
