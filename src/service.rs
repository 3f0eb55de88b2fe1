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
use crate::handlers::directory::DirectoryProjection;
use crate::handlers::gateway::GatewayProjection;
use crate::handlers::issuer::Issuer;
use crate::handlers::keys::{KeysHandler, load_ring};
use crate::handlers::retrieval::RetrievalProjection;
use crate::handlers::sessions::SessionsProjection;
use crate::handlers::tokenizer::Tokenizer;
use crate::handlers::visibility::VisibilityProjection;
use crate::kafka::admin::Admin;
use crate::kafka::runtime::{self, Clock};
use crate::kafka::{EventProducer, Handler, KafkaError, KafkaSettings};
use crate::node::{HandlerInfo, Node};
use crate::store::{Store, StoreError};
use crate::topics::{TopicAction, TopicNames};
use crate::vault::detokenize::Detokenizer;
use crate::vault::offrecord::OffRecordStore;

/// Why one of a node's tasks stopped.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Readiness(#[from] crate::ops::readiness::ReadinessError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("handler {0} stopped unexpectedly: {1}")]
    HandlerStopped(&'static str, String),
    #[error("cannot start the consumers' runtime: {0}; check the process's thread limit (ulimit -u)")]
    Runtime(String),
    #[error(transparent)]
    Submit(#[from] crate::node::SubmitError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("the handlers did not catch up with the topics within {0} s; check the brokers and the logs")]
    NotReady(u64),
}

impl ServiceError {
    /// The brokers could not be reached (metadata, admin or delivery failures): worth retrying.
    pub fn is_brokers_unavailable(&self) -> bool {
        matches!(self, ServiceError::Kafka(KafkaError::Client(..) | KafkaError::Delivery { .. }))
    }
}

/// Kafka settings for a set of bootstrap servers.
pub fn kafka_settings(settings: &Settings, brokers: String, client: &str) -> KafkaSettings {
    KafkaSettings {
        brokers,
        kind: settings.broker_kind,
        names: TopicNames::new(settings.topic_prefix.clone()),
        group_prefix: settings.group_prefix.clone(),
        client_id: format!("secureforms-{}-{client}", settings.node_id),
        node_id: settings.node_id.clone(),
        max_batch: settings.max_batch,
        properties: {
            let mut p = settings.kafka_properties.clone();
            // The SASL password from SECUREFORMS_KAFKA_PASSWORD, unless the config file sets one.
            if let Some(pw) = crate::secrets::kafka_password() {
                p.entry("sasl.password".into()).or_insert_with(|| pw.to_string());
            }
            p
        },
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
    let env = crate::secrets::master_key();
    MasterKey::load(env.as_ref().map(|v| v.as_str()), settings.master_key_file.as_deref())
}

/// The master keys used before the current one (`previous_master_key_files`), while their data keys
/// are re-wrapped.
pub fn previous_master_keys(settings: &Settings) -> Result<Vec<MasterKey>, KeyError> {
    settings.previous_master_key_files.iter().map(|f| MasterKey::load(None, Some(f))).collect()
}

/// The key ring's masters: the current one and the previous ones.
pub fn key_ring(settings: &Settings) -> Result<KeyRing, KeyError> {
    Ok(KeyRing::with_previous(master_key(settings)?, previous_master_keys(settings)?))
}

/// The root of the event MACs and the audit chain: `integrity_key_file`, else derived from the
/// master key (ADR 19).
pub fn integrity_key(settings: &Settings, master: &MasterKey) -> Result<crate::crypto::IntegrityKey, KeyError> {
    match &settings.integrity_key_file {
        Some(f) => crate::crypto::IntegrityKey::load(f),
        None => Ok(crate::crypto::IntegrityKey::from_master(master)),
    }
}

/// Publishes each configured template once per version, so templates are events and replayable.
pub async fn publish_templates(
    settings: &Settings,
    producer: &EventProducer,
    store: &Store,
    now_ms: i64,
) -> Result<usize, ServiceError> {
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

/// A running service: its shared parts and its tasks (handlers, sweeper, HTTP server).
pub struct Service {
    pub node: Arc<Node>,
    /// Where the HTTP gateway listens, when it runs.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, when they are.
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, Result<(), TaskError>)>,
    shadow: bool,
    /// A node that serves (gateway and workers), not a passing process (replay, operations).
    serving: bool,
    /// Where the consumers run: below the request path's CPU priority.
    batch: BatchRuntime,
}

/// The runtime the consumers and the purge worker run on (ADR 26). Its threads, and the Kafka
/// client threads and blocking tasks they start, run [`BATCH_NICE`] steps below the rest of the
/// process. A node applying a burst of batches (a tokenizer catching up after an outage, a replay)
/// still gives the CPU to a waiting HTTP request (an agent's retrieval, a visitor's submit) first.
struct BatchRuntime(Option<tokio::runtime::Runtime>);

/// How far below the request path the consumers' threads run (nice steps; CPU weight about 1 to 3).
pub const BATCH_NICE: i32 = 5;

impl BatchRuntime {
    fn start() -> Result<BatchRuntime, ServiceError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("sf-batch")
            .on_thread_start(lower_this_threads_priority)
            .enable_all()
            .build()
            .map_err(|e| ServiceError::Runtime(e.to_string()))?;
        Ok(BatchRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("the batch runtime lives as long as the service").handle()
    }
}

impl Drop for BatchRuntime {
    fn drop(&mut self) {
        // Its tasks have ended (or are abandoned with the service); nothing here may block.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Lowers the calling thread's CPU priority by [`BATCH_NICE`] (on Linux the nice value is per
/// thread, and threads it starts inherit it). Lowering needs no privilege; failing only means
/// equal priority, so it is logged, not fatal.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread's own id.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (now + BATCH_NICE).min(19)) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a consumer thread's priority; it runs at the request path's");
        }
    }
}

/// The consumer group of the conversation-keyed handlers (`<group_prefix>-owners`): its members own
/// the partitions.
pub const OWNERS: &str = "owners";

/// Every consumer a full node runs, in the order a replay of everything rebuilds them.
pub const ALL_HANDLERS: [&str; 8] =
    ["keys", "issuer", "tokenizer", "retrieval", "gateway", "visibility", "sessions", "directory"];

/// Which parts of a node to start.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Handlers to run (names from [`ALL_HANDLERS`]).
    pub handlers: Vec<&'static str>,
    /// HTTP gateway (when `http_listen` is set), audit relay, off-the-record sweeper, purge worker.
    pub node_tasks: bool,
    /// Apply everything, emit nothing (see `RunContext::shadow`).
    pub shadow: bool,
}

impl StartOptions {
    /// A full node.
    pub fn node() -> StartOptions {
        StartOptions { handlers: ALL_HANDLERS.to_vec(), node_tasks: true, shadow: false }
    }

    /// Only the given handlers, nothing else (replay).
    pub fn handlers(handlers: Vec<&'static str>) -> StartOptions {
        StartOptions { handlers, node_tasks: false, shadow: false }
    }

    /// An operations replica: keys, tokenizer and visibility as a shadow.
    pub fn ops() -> StartOptions {
        StartOptions { handlers: vec!["keys", "tokenizer", "visibility"], node_tasks: false, shadow: true }
    }

    fn runs(&self, handler: &str) -> bool {
        self.handlers.contains(&handler)
    }
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
        Service::start_with(settings, brokers, clock, StartOptions::node()).await
    }

    /// Starts the parts `options` asks for.
    pub async fn start_with(
        settings: Settings,
        brokers: String,
        clock: Clock,
        options: StartOptions,
    ) -> Result<Service, ServiceError> {
        Service::start_on(settings, brokers, clock, options, None).await
    }

    /// Starts the parts `options` asks for, serving HTTP on `listeners` when given (bound before the
    /// brokers answered; see [`crate::http::listener`]) or on listeners bound now.
    pub async fn start_on(
        settings: Settings,
        brokers: String,
        clock: Clock,
        options: StartOptions,
        listeners: Option<crate::http::listener::Listeners>,
    ) -> Result<Service, ServiceError> {
        let ring = Arc::new(key_ring(&settings)?);
        let integrity = integrity_key(&settings, ring.master())?;
        let mut kafka = kafka_settings(&settings, brokers, if options.shadow { "ops" } else { "service" });
        apply_topics(&kafka, settings.replication_factor).await?;
        // A node never runs on topics that place one conversation on different partition numbers.
        let observed = Admin::new(&kafka)?.observe(&kafka.names).await?;
        if let Some(wrong) = crate::topics::co_partitioning(&kafka.names, &observed) {
            return Err(KafkaError::Topic { topic: kafka.names.prefix().to_string(), message: wrong }.into());
        }
        let partitions = observed
            .get(&kafka.names.name(crate::topics::Topic::ChatEvents))
            .map(|o| o.partitions)
            .unwrap_or_else(crate::topics::conversation_partitions);
        // Learned once, so the clients can be tuned for the broker (see runtime::fetch_wait_ms).
        kafka.kind = Some(Admin::new(&kafka)?.broker_kind().await?);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let signer = Arc::new(crate::crypto::mac::EventSigner::new(&integrity));
        if settings.accept_unsigned_events {
            tracing::warn!(
                "accept_unsigned_events is on: events only this service produces are applied without their MAC, so anyone who can write to the topics can forge them; turn it off once the topics written before MACs are past"
            );
        }
        let producer = EventProducer::new(&kafka)?.with_metrics(metrics.clone()).with_signer(signer.clone());
        let stores = ALL_HANDLERS
            .iter()
            .chain(["audit"].iter())
            .map(|h| Ok((*h, Store::open(&store_dir(&settings, h))?)))
            .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
        let n = if options.node_tasks {
            publish_templates(&settings, &producer, &stores["issuer"], clock()).await?
        } else {
            0
        };

        let keys_loaded = load_ring(&ring, &stores["keys"])?;
        let off_record = Arc::new(OffRecordStore::new());
        let chain = crate::audit::AuditChain::new(&integrity, &settings.node_id);
        let (audit, audit_writer) =
            crate::audit::AuditLog::open(stores["audit"].clone(), &store_dir(&settings, "audit.journal"), Some(chain))?;
        let audit_writer = audit_writer.with_metrics(metrics.clone());
        let detokenizer = Arc::new(
            Detokenizer::new(
                stores["tokenizer"].clone(),
                stores["retrieval"].clone(),
                ring.clone(),
                off_record.clone(),
            )
            .with_audit(audit.clone()),
        );
        let (stop, stop_rx) = watch::channel(false);
        let sites = Arc::new(settings.sites.clone());
        let keys_handler = KeysHandler::new(ring.clone());
        let keys = Arc::new(crate::crypto::KeyDeriver::new(&integrity));
        let issuer = Issuer::new(sites.clone(), settings.public_url.clone(), keys.clone());
        let tokenizer = Tokenizer::new(sites, ring.clone(), metrics.clone(), keys);
        // Every handler, once: what the node reports on (readiness, lag) and what it runs.
        let handlers: Vec<Box<dyn Handler>> = vec![
            Box::new(keys_handler),
            Box::new(issuer),
            Box::new(tokenizer),
            Box::new(RetrievalProjection),
            Box::new(GatewayProjection),
            Box::new(VisibilityProjection),
            Box::new(SessionsProjection),
            Box::new(DirectoryProjection),
        ];
        let handlers: Vec<Box<dyn Handler>> = handlers.into_iter().filter(|h| options.runs(h.name())).collect();
        let running: Vec<HandlerInfo> = handlers
            .iter()
            .map(|h| HandlerInfo {
                name: h.name(),
                group: kafka.handler_group(h.name(), h.scope()),
                topics: h.topics(),
                store: stores[h.name()].clone(),
                scope: h.scope(),
            })
            .collect();
        let node_id = settings.node_id.clone();
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
            sessions: stores["sessions"].clone(),
            audit,
            clock,
            metrics,
            handlers: running,
            signer,
            ownership: Arc::new(runtime::Ownership::default()),
            partitions,
            directory: stores["directory"].clone(),
            watermarks: std::sync::OnceLock::new(),
            hop: Arc::new(crate::crypto::hop::HopSigner::new(&integrity, &node_id)),
        });
        let mut service = Service {
            node: node.clone(),
            http_addr: None,
            metrics_addr: None,
            stop,
            tasks: JoinSet::new(),
            shadow: options.shadow,
            serving: options.node_tasks && !options.shadow,
            batch: BatchRuntime::start()?,
        };
        let (mut together, mut alone) = (Vec::new(), Vec::new());
        for h in handlers {
            let store = stores[h.name()].clone();
            let member = runtime::Member::new(h, store, &node.kafka);
            match member.handler.scope() {
                runtime::Scope::Partitioned => together.push(member),
                runtime::Scope::EveryNode => alone.push(member),
            }
        }
        for member in alone {
            let group = member.state.clone();
            service.spawn(vec![member], group, None, &stop_rx);
        }
        if !together.is_empty() {
            // One consumer for all conversation-keyed state: partition p of every such topic has
            // one owner (ADR 22).
            if service.serving {
                // A serving node: owning nothing is normal only while other nodes own every partition.
                let (directory, me, partitions) =
                    (node.directory.clone(), node.settings.node_id.clone(), node.partitions);
                node.ownership.set_covered_elsewhere(Box::new(move || {
                    let Ok(nodes) = crate::handlers::directory::DirectoryView::new(directory.clone()).nodes() else {
                        return false;
                    };
                    (0..partitions)
                        .all(|p| crate::handlers::directory::owner_among(&nodes, p).is_some_and(|e| e.node_id != me))
                }));
            } else {
                // Replay and operations replicas rebuild everything: they must hold every partition.
                node.ownership.expect_all(node.partitions);
            }
            service.spawn(together, node.kafka.group_id(OWNERS), Some(node.ownership.clone()), &stop_rx);
        }
        {
            let (node, stop) = (node.clone(), stop_rx.clone());
            service.tasks.spawn(async move {
                ("readiness", crate::ops::readiness::run(node, stop).await.map_err(TaskError::from))
            });
        }
        if options.node_tasks {
            service.spawn_node_tasks(audit_writer, &stop_rx, listeners).await?;
        }
        tracing::info!(templates_published = n, keys_loaded, metrics = ?service.metrics_addr, brokers = %node.kafka.brokers, http = ?service.http_addr, master_key_id = %node.ring.master().id(), handlers = ?node.handlers.iter().map(|h| h.name).collect::<Vec<_>>(), "service starting");
        Ok(service)
    }

    /// What a full node runs besides its handlers: the audit writer and relay, the off-the-record
    /// sweeper, the purge worker, the HTTP gateway and the operations listener.
    async fn spawn_node_tasks(
        &mut self,
        audit_writer: crate::audit::AuditWriter,
        stop_rx: &watch::Receiver<bool>,
        listeners: Option<crate::http::listener::Listeners>,
    ) -> Result<(), ServiceError> {
        let node = self.node.clone();
        {
            let (audit, producer, stop) = (node.audit.clone(), node.producer.clone(), stop_rx.clone());
            self.tasks
                .spawn(async move { ("audit relay", audit.relay(producer, stop).await.map_err(TaskError::from)) });
            let stop = stop_rx.clone();
            self.tasks.spawn(async move { ("audit writer", audit_writer.run(stop).await.map_err(TaskError::from)) });
        }
        {
            // Expired off-the-record answers are dropped (and zeroized) within seconds.
            let (store, clock, mut stop) = (node.off_record.clone(), node.clock.clone(), stop_rx.clone());
            self.tasks.spawn(async move {
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
        if node.settings.purge_interval_secs > 0 {
            // Batch work, nobody waiting on it: below the request path with the consumers (ADR 26).
            let (node, stop) = (node.clone(), stop_rx.clone());
            self.tasks.spawn_on(
                async move { ("purge worker", crate::ops::purge::worker(node, stop).await.map_err(TaskError::from)) },
                self.batch.handle(),
            );
        }
        // Bound already when `serve` started them before the brokers answered; else bound here.
        let listeners = match listeners {
            Some(l) => l,
            None => crate::http::listener::Listeners::bind(&node.settings).await?,
        };
        if let Some(gateway) = listeners.gateway {
            gateway.install(crate::http::router(crate::http::AppState::new(node.clone(), gateway.https())?));
            self.http_addr = Some(gateway.local_addr());
            // Other nodes forward requests for this node's partitions to this gateway.
            if let Some(url) = crate::cluster::advertise_url(&node, self.http_addr, gateway.https()) {
                let (node, stop) = (node.clone(), stop_rx.clone());
                self.tasks.spawn(async move {
                    ("announcer", crate::cluster::run_announcer(node, url, stop).await.map_err(TaskError::from))
                });
            }
            let stop = stop_rx.clone();
            self.tasks.spawn(async move { ("http gateway", gateway.run_until(stop).await.map_err(TaskError::Http)) });
        }
        if let Some(operations) = listeners.operations {
            operations.install(crate::http::ops_router(node.clone()));
            self.metrics_addr = Some(operations.local_addr());
            let stop = stop_rx.clone();
            self.tasks
                .spawn(async move { ("metrics listener", operations.run_until(stop).await.map_err(TaskError::Http)) });
        }
        Ok(())
    }

    /// Waits until every handler has caught up with the topics as they were at start (what /readyz
    /// reports), or fails after `timeout`.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> Result<(), ServiceError> {
        let deadline = std::time::Instant::now() + timeout;
        while !self.node.metrics.is_ready() {
            if std::time::Instant::now() > deadline {
                return Err(ServiceError::NotReady(timeout.as_secs()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        members: Vec<runtime::Member>,
        group: String,
        ownership: Option<Arc<runtime::Ownership>>,
        stop: &watch::Receiver<bool>,
    ) {
        let name = members.first().map(|m| m.handler.name()).unwrap_or("none");
        let name = if ownership.is_some() { OWNERS } else { name };
        let n = &self.node;
        let verify_with = (!n.settings.accept_unsigned_events).then(|| n.signer.clone());
        let ctx = runtime::RunContext {
            clock: n.clock.clone(),
            metrics: n.metrics.clone(),
            shadow: self.shadow,
            verify_with,
            static_membership: self.serving && n.kafka.kind == Some(crate::kafka::BrokerKind::Kafka),
            conversation_partitions: ownership.is_some().then_some(n.partitions),
        };
        let (k, p, r) = (n.kafka.clone(), n.producer.clone(), stop.clone());
        self.tasks.spawn_on(
            async move {
                (name, runtime::run_together(k, p, members, group, ownership, ctx, r).await.map_err(TaskError::from))
            },
            self.batch.handle(),
        );
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

    /// Whether a task has ended on its own (it logs which and why).
    pub fn failed(&mut self) -> bool {
        match self.tasks.try_join_next() {
            None => false,
            Some(Ok((name, result))) => {
                tracing::error!(task = name, error = ?result.err().map(|e| e.to_string()), "task stopped on its own");
                true
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "task panicked");
                true
            }
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

/// Runs the whole service until `shutdown` resolves.
pub async fn serve(settings: Settings, clock: Clock, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    if settings.sites.is_empty() {
        tracing::warn!(
            "no sites are configured, so every FormSent will be rejected; pass --config with a [sites.<id>] table (see config/secureforms.example.toml)"
        );
    }
    // Fail on a missing or unreadable key before starting anything.
    let ring = key_ring(&settings)?;
    integrity_key(&settings, ring.master())?;
    // Listening from the start: while the brokers do not answer, /healthz is 200, /readyz 503 and
    // every other request 503 with Retry-After.
    let listeners = crate::http::listener::Listeners::bind(&settings).await?;
    let embedded = match &settings.brokers {
        Some(b) if !b.trim().is_empty() => None,
        _ => Some(crate::broker::SupervisedBroker::start(EmbeddedBroker::start_for(&settings).await?, &settings)),
    };
    let brokers =
        embedded.as_ref().map(|b| b.addr().to_string()).or_else(|| settings.brokers.clone()).unwrap_or_default();
    tokio::pin!(shutdown);
    // Brokers that do not answer yet are waited for, with backoff: a node started while Kafka is
    // away (or restarting) keeps trying instead of exiting.
    let mut backoff = std::time::Duration::from_secs(1);
    let started = loop {
        let attempt = Service::start_on(
            settings.clone(),
            brokers.clone(),
            clock.clone(),
            StartOptions::node(),
            Some(listeners.clone()),
        );
        match attempt.await {
            Ok(service) => break Some(service),
            Err(error) if error.is_brokers_unavailable() => {
                tracing::warn!(%error, %brokers, retry_in_s = backoff.as_secs(), "the brokers do not answer; retrying (check that Kafka is up and reachable from this node)");
                tokio::select! {
                    _ = &mut shutdown => break None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
            Err(error) => {
                listeners.finish().await;
                if let Some(b) = embedded {
                    b.stop().await;
                }
                return Err(error);
            }
        }
    };
    let result = match started {
        Some(service) => service.run_until(shutdown).await,
        None => Ok(()),
    };
    listeners.finish().await;
    if let Some(b) = embedded {
        b.stop().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's nice value.
    #[cfg(target_os = "linux")]
    fn nice() -> i32 {
        // SAFETY: plain syscalls on the calling thread's own id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_consumers_run_below_the_request_path_and_so_does_their_blocking_work() {
        let mine = nice();
        let batch = BatchRuntime::start().unwrap();
        let on_batch = |f: fn() -> i32| batch.handle().block_on(batch.handle().spawn(async move { f() })).unwrap();
        let worker = on_batch(nice);
        let blocking = batch.handle().block_on(batch.handle().spawn_blocking(nice)).unwrap();
        let expected = (mine + BATCH_NICE).min(19);
        assert_eq!((worker, blocking), (expected, expected), "this thread runs at {mine}");
        // A thread the consumers' code starts (as librdkafka does for its clients) inherits it.
        let started = on_batch(|| std::thread::spawn(nice).join().unwrap());
        assert_eq!(started, expected);
        assert_eq!(nice(), mine, "the rest of the process keeps its priority");
        drop(batch);
    }
}
