//! The pipeline benchmark (`scripts/bench.sh`, or `cargo bench --bench pipeline -- --brokers ...`):
//! measures, in one run against the same broker,
//! 1. raw passthrough: consume FormSubmitted-sized records and produce each to another topic
//!    (same batching, same producer settings, same delivery (one batch in flight while the next
//!    is read), no state, no durability);
//! 2. the tokenizer: consume FormSubmitted -> vault durable in sled -> FormReady produced -> offsets
//!    durable, through the real consumer runtime;
//! 3. latency from FormSubmitted produced to FormReady consumed, at a steady rate.
//!
//! Each phase uses fresh topics (a unique prefix), so phases do not disturb each other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use secureforms::config::{Settings, SiteConfig};
use secureforms::crypto::{KeyMaterial, data_key_id, period_of};
use secureforms::events::{Codec, Event};
use secureforms::handlers::tokenizer::Tokenizer;
use secureforms::kafka::runtime::{self, RunContext, system_clock};
use secureforms::kafka::{EventProducer, KafkaSettings};
use secureforms::service::{apply_topics, kafka_settings, resolve_brokers};
use secureforms::store::Store;
use secureforms::topics::{Topic, TopicNames};
use secureforms::vault::offrecord::Secret;
use secureforms::vault::seal::{SubmissionContext, seal_submission};

pub struct BenchOptions {
    pub records: usize,
    pub latency_rate: u32,
    pub latency_secs: u64,
    pub retrieve_rate: u32,
    pub retrieve_secs: u64,
    /// Forms per cluster size in the cluster phase (0: no cluster phase).
    pub cluster_forms: usize,
    /// The broker's process, to report its CPU per record (scripts/bench.sh passes it).
    pub broker_pid: Option<u32>,
    /// Records through the passthrough and the tokenizer, untimed, before measuring (0: none).
    pub warmup_records: usize,
}

/// The cluster phase: visitors' open + submit through the nodes in turn (no sticky routing), until
/// every FormReady is out, with 1, 2 and 3 nodes; and the agent retrieve through the owner next to
/// through another node (the cost of forwarding).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterReport {
    pub forms: usize,
    /// (nodes, forms submitted -> FormReady per second).
    pub throughput: Vec<(usize, f64)>,
    pub retrieve_requests: usize,
    pub owner_p50_ms: f64,
    pub owner_p99_ms: f64,
    pub forwarded_p50_ms: f64,
    pub forwarded_p99_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub brokers: String,
    /// kafka or tansu.
    pub broker_kind: String,
    /// The librdkafka properties the run applied over the service's own (empty: as shipped).
    pub client_properties: BTreeMap<String, String>,
    pub records: usize,
    pub record_bytes: usize,
    /// Records through each path, untimed, before measuring.
    pub warmup_records: usize,
    pub passthrough_per_sec: f64,
    pub tokenizer_per_sec: f64,
    /// CPU microseconds per record of the bench process (producing the input, consuming the output,
    /// and the copier or the tokenizer) in each phase; the difference is what the durable path costs.
    pub passthrough_cpu_us: f64,
    pub tokenizer_cpu_us: f64,
    /// The same for the broker process, when the bench knows its pid (`--broker-pid`).
    pub passthrough_broker_cpu_us: Option<f64>,
    pub tokenizer_broker_cpu_us: Option<f64>,
    pub ratio: f64,
    /// The tokenizer's per-batch work with no broker (decode, MAC check, apply, encode, sled commit
    /// and flush, output MAC), one thread: the ceiling of the tokenizer phase on this machine.
    pub tokenizer_alone_per_sec: f64,
    pub tokenizer_alone_cpu_us: f64,
    pub latency_rate: u32,
    pub latency_samples: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub retrieve_rate: u32,
    pub retrieve_requests: usize,
    pub retrieve_ok: usize,
    pub retrieve_p50_ms: f64,
    pub retrieve_p99_ms: f64,
    pub retrieve_max_ms: f64,
    /// Purge scan (find the expired submissions) with the same number expiring in two vault sizes.
    pub purge_expired: usize,
    pub purge_small_vault: usize,
    pub purge_large_vault: usize,
    pub purge_small_ms: f64,
    pub purge_large_ms: f64,
    pub cluster: Option<ClusterReport>,
}

/// CPU time used so far by this process (all threads), and by the broker process when its pid is
/// known (Linux /proc; None elsewhere or when it cannot be read).
#[derive(Clone, Copy)]
struct CpuMark {
    own: Duration,
    broker: Option<Duration>,
}

fn cpu_mark(broker_pid: Option<u32>) -> CpuMark {
    // SAFETY: getrusage writes into the struct it is given and reads nothing else.
    let own = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    let broker = broker_pid.and_then(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) : utime is the 14th, stime the 15th.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
    });
    CpuMark { own, broker }
}

/// CPU microseconds per record between two marks: (this process, the broker).
fn cpu_per_record(from: CpuMark, to: CpuMark, records: usize) -> (f64, Option<f64>) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / records as f64;
    (per(to.own - from.own), from.broker.zip(to.broker).map(|(a, b)| per(b - a)))
}

fn names(prefix: &str) -> TopicNames {
    TopicNames::new(prefix)
}

fn fresh(settings: &Settings, brokers: &str, phase: &str) -> KafkaSettings {
    let mut k = kafka_settings(settings, brokers.to_string(), "bench");
    let p = format!("bench-{}-{phase}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    k.names = names(&p);
    k.group_prefix = p.trim_end_matches('.').to_string();
    k
}

/// Sealed FormSubmitted records like the gateway produces (4 answers, one off the record).
fn submissions(n: usize) -> Vec<(uuid::Uuid, Event)> {
    let now = system_clock()();
    let id = data_key_id("bench", &period_of(now), 1);
    let material = KeyMaterial::random();
    let key = secureforms::crypto::keyring::DataKey {
        id: id.clone(),
        site: "bench".into(),
        period: period_of(now),
        generation: 1,
        master_key_id: String::new(),
        material,
    };
    let template: secureforms::domain::template::Template = toml::from_str(
        r#"id = "card-payment"
           title = "Card payment"
           [[questions]]
           id = "cardholder"
           label = "Name on card"
           kind = "short_text"
           [[questions]]
           id = "pan"
           label = "Card number"
           kind = "card_number"
           [[questions]]
           id = "expiry"
           label = "Expiry"
           kind = "card_expiry"
           [[questions]]
           id = "cvv"
           label = "CVV"
           kind = "cvv""#,
    )
    .expect("bench template parses");
    (0..n)
        .map(|i| {
            let sid = uuid::Uuid::new_v4();
            let (conv, form) = (format!("conv-{}", i % 97), format!("form-{}", sid.simple()));
            let ctx = SubmissionContext {
                site_id: "bench",
                conversation_id: &conv,
                form_id: &form,
                agent_id: "agent-1",
                template: &template,
                submission_id: sid,
                event_id: uuid::Uuid::new_v4(),
                now_ms: now,
                node_id: "bench",
            };
            let answers: BTreeMap<String, Secret> =
                [("cardholder", "A Visitor"), ("pan", "4111111111111111"), ("expiry", "12/30"), ("cvv", "123")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Secret::new(v.to_string())))
                    .collect();
            let sealed = seal_submission(&key, &ctx, answers).expect("bench sealing");
            (sid, Event::FormSubmitted(sealed.event))
        })
        .collect()
}

async fn produce_all(producer: &EventProducer, events: &[(uuid::Uuid, Event)]) -> anyhow::Result<()> {
    for chunk in events.chunks(1000) {
        for r in futures::future::join_all(chunk.iter().map(|(_, e)| producer.send(e))).await {
            r?;
        }
    }
    Ok(())
}

fn reader(k: &KafkaSettings, topic: &str, partitions: i32) -> anyhow::Result<StreamConsumer> {
    let c: StreamConsumer = k
        .client_config()
        .set("group.id", format!("{}-reader", k.group_prefix))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| k.client_error(e))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).map_err(|e| k.client_error(e))?;
    }
    c.assign(&tpl).map_err(|e| k.client_error(e))?;
    Ok(c)
}

/// Waits until `n` records arrived on `topic`; returns when the last one did.
async fn wait_for(c: &StreamConsumer, n: usize) -> Instant {
    let mut seen = 0;
    while seen < n {
        if c.recv().await.is_ok() {
            seen += 1;
        }
    }
    Instant::now()
}

/// Runs the copier (consume -> produce, no state) until `n` records moved. Delivers as the runtime
/// does: a batch's records go out on a task of their own while the next batch is read, and the next
/// batch goes out once they are acknowledged (one batch in flight).
async fn copy(consumer: &StreamConsumer, producer: &EventProducer, max_batch: usize, n: usize) -> anyhow::Result<()> {
    let mut moved = 0;
    let mut in_flight: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    while moved < n {
        let mut batch = Vec::new();
        if let Ok(m) = consumer.recv().await {
            batch.push(m.detach());
        }
        while batch.len() < max_batch {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        if let Some(previous) = in_flight.take() {
            previous.await??;
        }
        moved += batch.len();
        let producer = producer.clone();
        in_flight = Some(tokio::spawn(async move {
            let sends = batch.iter().map(|m| {
                producer.send_raw(Topic::AgentEvents, m.key().unwrap_or_default(), m.payload().unwrap_or_default())
            });
            for r in futures::future::join_all(sends).await {
                r?;
            }
            Ok(())
        }));
    }
    if let Some(last) = in_flight {
        last.await??;
    }
    Ok(())
}

/// Passthrough: a consumer that copies each record to the output topic. Warmed with one record,
/// then timed from the first produce to the last copy seen on the output.
async fn passthrough(
    k: &KafkaSettings,
    events: &[(uuid::Uuid, Event)],
    broker_pid: Option<u32>,
) -> anyhow::Result<(f64, (f64, Option<f64>))> {
    apply_topics(k, 1).await?;
    let producer = EventProducer::new(k)?;
    let consumer = reader(k, &k.names.name(Topic::Submissions), Topic::Submissions.spec().partitions)?;
    let out_reader = reader(k, &k.names.name(Topic::AgentEvents), Topic::AgentEvents.spec().partitions)?;
    let warm = submissions(1);
    produce_all(&producer, &warm).await?;
    let (copied, _) = tokio::join!(copy(&consumer, &producer, k.max_batch, 1), wait_for(&out_reader, 1));
    copied?;
    let n = events.len();
    let cpu = cpu_mark(broker_pid);
    let start = Instant::now();
    let (produced, copied, end) = tokio::join!(
        produce_all(&producer, events),
        copy(&consumer, &producer, k.max_batch, n),
        wait_for(&out_reader, n)
    );
    produced?;
    copied?;
    Ok((n as f64 / (end - start).as_secs_f64(), cpu_per_record(cpu, cpu_mark(broker_pid), n)))
}

fn bench_sites() -> Arc<BTreeMap<String, SiteConfig>> {
    Arc::new(BTreeMap::new())
}

/// The tokenizer as the service runs it (its key ring only answers "destroyed?" here: empty).
fn bench_tokenizer() -> Tokenizer {
    let master = secureforms::crypto::MasterKey::from_base64(&secureforms::crypto::MasterKey::generate_base64())
        .expect("a generated master key parses");
    let keys = secureforms::crypto::KeyDeriver::new(&secureforms::crypto::IntegrityKey::from_master(&master));
    Tokenizer::new(
        bench_sites(),
        Arc::new(secureforms::crypto::KeyRing::new(master)),
        Arc::new(secureforms::metrics::Metrics::new()),
        Arc::new(keys),
    )
}

/// The tokenizer on the real runtime. Warmed with one record (group joined, partitions assigned),
/// then timed like the passthrough.
async fn tokenizer(
    k: &KafkaSettings,
    dir: &std::path::Path,
    events: &[(uuid::Uuid, Event)],
    broker_pid: Option<u32>,
) -> anyhow::Result<(f64, (f64, Option<f64>))> {
    apply_topics(k, 1).await?;
    let signer = bench_signer();
    let producer = EventProducer::new(k)?.with_signer(signer.clone());
    let out_reader = reader(k, &k.names.name(Topic::AgentEvents), Topic::AgentEvents.spec().partitions)?;
    let store = Store::open(&dir.join("tokenizer"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(runtime::run(
        k.clone(),
        store,
        producer.clone(),
        bench_tokenizer(),
        RunContext::new(system_clock(), Some(signer)),
        stop_rx,
    ));
    produce_all(&producer, &submissions(1)).await?;
    wait_for(&out_reader, 1).await;
    let cpu = cpu_mark(broker_pid);
    let start = Instant::now();
    let (produced, end) = tokio::join!(produce_all(&producer, events), wait_for(&out_reader, events.len()));
    produced?;
    let used = cpu_per_record(cpu, cpu_mark(broker_pid), events.len());
    let _ = stop_tx.send(true);
    task.await??;
    Ok((events.len() as f64 / (end - start).as_secs_f64(), used))
}

/// The tokenizer's per-batch work alone, with no broker: the runtime's own step (decode, MAC check,
/// apply, encode, sled commit and flush) on signed records as the consumer hands them over, in
/// batches of the consumer's size, plus the MAC the producer puts on each output. One thread, as
/// the loop runs. The Kafka phase cannot run faster than this; on a machine whose cores the broker
/// and the load share, it runs slower.
async fn tokenizer_alone(
    k: &KafkaSettings,
    dir: &std::path::Path,
    events: &[(uuid::Uuid, Event)],
) -> anyhow::Result<(f64, f64)> {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
    let signer = bench_signer();
    let topic = k.names.name(Topic::Submissions);
    let partitions = Topic::Submissions.spec().partitions as usize;
    let messages = events
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            let payload = Codec::get().encode(e)?;
            let key = e.record_key().into_bytes();
            let mac = signer.sign(&key, &payload);
            let headers = OwnedHeaders::new()
                .insert(Header { key: secureforms::crypto::mac::HEADER, value: Some(mac.as_bytes()) });
            let (partition, offset) = ((i % partitions) as i32, (i / partitions) as i64);
            Ok(OwnedMessage::new(
                Some(payload),
                Some(key),
                topic.clone(),
                rdkafka::Timestamp::NotAvailable,
                partition,
                offset,
                Some(headers),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = Store::open(&dir.join("tokenizer-alone"))?;
    let mut handler = bench_tokenizer();
    let metrics = secureforms::metrics::Metrics::new();
    let cpu = cpu_mark(None);
    let start = Instant::now();
    for chunk in messages.chunks(k.max_batch) {
        let batch: Vec<&OwnedMessage> = chunk.iter().collect();
        let now = system_clock()();
        let outputs =
            runtime::apply_and_commit(k, &store, &mut handler, "bench-alone", &batch, now, &metrics, Some(&signer))
                .await?;
        anyhow::ensure!(outputs.len() == batch.len(), "every submission gives one FormReady");
        for out in &outputs {
            std::hint::black_box(signer.sign(&out.key, &out.payload));
        }
    }
    let elapsed = start.elapsed();
    let (cpu_us, _) = cpu_per_record(cpu, cpu_mark(None), events.len());
    Ok((events.len() as f64 / elapsed.as_secs_f64(), cpu_us))
}

async fn latency(k: &KafkaSettings, dir: &std::path::Path, rate: u32, secs: u64) -> anyhow::Result<Vec<f64>> {
    apply_topics(k, 1).await?;
    let signer = bench_signer();
    let producer = EventProducer::new(k)?.with_signer(signer.clone());
    let store = Store::open(&dir.join("latency"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(runtime::run(
        k.clone(),
        store,
        producer.clone(),
        bench_tokenizer(),
        RunContext::new(system_clock(), Some(signer)),
        stop_rx,
    ));
    let out_reader = reader(k, &k.names.name(Topic::AgentEvents), Topic::AgentEvents.spec().partitions)?;
    // Warm up: one record through the whole path before measuring.
    let warm = submissions(1);
    produce_all(&producer, &warm).await?;
    wait_for(&out_reader, 1).await;

    let n = (rate as u64 * secs) as usize;
    let events = submissions(n);
    let sent: Arc<dashmap::DashMap<String, Instant>> = Arc::new(dashmap::DashMap::new());
    let sender = {
        let (producer, sent) = (producer.clone(), sent.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::new();
            for (sid, e) in &events {
                tick.tick().await;
                sent.insert(sid.to_string(), Instant::now());
                let p = producer.clone();
                let e = e.clone();
                inflight.push(tokio::spawn(async move { p.send(&e).await }));
            }
            for f in inflight {
                let _ = f.await;
            }
        }
    };
    let receiver = async {
        let mut samples = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(secs + 120);
        while samples.len() < n && Instant::now() < deadline {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), out_reader.recv()).await
                && let Some(Ok(Event::FormReady(r))) = m.payload().map(|p| Codec::get().decode(p))
            {
                let at = Instant::now();
                // The record may arrive before the sender noted its time only in theory; wait for it.
                loop {
                    if let Some(t) = sent.get(&r.submission_id) {
                        samples.push((at - *t).as_secs_f64() * 1000.0);
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
        samples
    };
    let ((), samples) = tokio::join!(sender, receiver);
    let _ = stop_tx.send(true);
    task.await??;
    if samples.len() < n {
        anyhow::bail!("{} of {n} FormReady arrived in time; check the dead letters", samples.len());
    }
    Ok(samples)
}

/// Agent retrieval at a steady rate: a real service (HTTP gateway, projections) with one ready
/// submission per request in live conversations; each request presents its own one-time key.
async fn retrieve_latency(
    brokers: &str,
    dir: &std::path::Path,
    rate: u32,
    secs: u64,
) -> anyhow::Result<(Vec<f64>, usize)> {
    use secureforms::node::Submission;
    use secureforms::service::Service;
    let bench_err = |m: String| anyhow::anyhow!(m);
    let n = (rate as u64 * secs) as usize;
    let p = format!("bench-{}-ret.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let root = dir.join("retrieve");
    std::fs::create_dir_all(&root).map_err(|e| bench_err(e.to_string()))?;
    write_private(&root.join("master.key"), secureforms::crypto::MasterKey::generate_base64().as_bytes())
        .map_err(|e| bench_err(e.to_string()))?;
    let secret = "bench-shared-secret-of-at-least-32-bytes";
    write_private(&root.join("jwt.secret"), secret.as_bytes()).map_err(|e| bench_err(e.to_string()))?;
    let mut s: Settings = toml::from_str(BENCH_SITE).map_err(|e| bench_err(e.to_string()))?;
    s.brokers = Some(brokers.to_string());
    s.topic_prefix = p.clone();
    s.group_prefix = p.trim_end_matches('.').to_string();
    s.data_dir = root.clone();
    s.master_key_file = Some(root.join("master.key"));
    s.http_listen = Some("127.0.0.1:0".into());
    s.metrics_listen = None;
    s.purge_interval_secs = 0;
    s.agent_auth.jwt_secret_file = Some(root.join("jwt.secret"));
    let mut service =
        Service::start(s, brokers.to_string(), system_clock()).await.map_err(|e| bench_err(e.to_string()))?;
    service.wait_ready(Duration::from_secs(120)).await.map_err(|e| bench_err(e.to_string()))?;
    let addr = service.http_addr.ok_or_else(|| bench_err("no http address".into()))?;
    // One agent per conversation, as in a contact centre: the agent API's per-agent rate limit
    // (ten requests a second each) is not what this phase measures.
    let conversations = 500;
    let sends: Vec<Event> =
        (0..conversations).map(|c| bench_form_sent(&format!("conv-{c}"), &format!("f-{c}"), c)).collect();
    for r in futures::future::join_all(sends.iter().map(|e| service.producer.send(e))).await {
        r?;
    }
    let template = service.settings.sites["bench"].templates[0].clone();
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let subs = chunk.iter().map(|i| {
            // One form per submission (a form has one submission); 500 conversations.
            let (conv, form) = (format!("conv-{}", i % conversations), format!("f-{i}"));
            let agent = format!("bench-agent-{}", i % conversations);
            let template = &template;
            let node = &service.node;
            async move {
                let answers: BTreeMap<String, Secret> =
                    [("pan", "4111111111111111"), ("expiry", "12/39"), ("cvv", "123")]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), Secret::new(v.to_string())))
                        .collect();
                node.submit(Submission {
                    site_id: "bench",
                    conversation_id: &conv,
                    form_id: &form,
                    agent_id: &agent,
                    template,
                    answers,
                })
                .await
            }
        });
        for r in futures::future::join_all(subs).await {
            ids.push(r.map_err(|e| bench_err(e.to_string()))?);
        }
    }
    // Every submission's FormReady, and the projections caught up.
    let k = kafka_settings(&service.settings, brokers.to_string(), "bench");
    let out = reader(&k, &k.names.name(Topic::AgentEvents), Topic::AgentEvents.spec().partitions)?;
    let mut keys: HashMap<String, String> = HashMap::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while keys.len() < n {
        if Instant::now() > deadline {
            return Err(bench_err(format!("{} of {n} FormReady within 120 s; check the dead letters", keys.len())));
        }
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), out.recv()).await
            && let Some(Ok(Event::FormReady(r))) = m.payload().map(|p| Codec::get().decode(p))
        {
            keys.insert(r.submission_id, r.retrieve_key);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while service.detokenizer.known_keys() < n
        || service.visibility.tree(secureforms::handlers::visibility::trees::SUBMISSIONS).map(|t| t.len()).unwrap_or(0)
            < n
    {
        if Instant::now() > deadline {
            return Err(bench_err("projections did not catch up within 120 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tokens = (0..conversations).map(|c| bench_token(c, secret)).collect::<anyhow::Result<Vec<_>>>()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(256).build().map_err(|e| bench_err(e.to_string()))?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = Vec::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        tick.tick().await;
        let (client, token, key) = (client.clone(), tokens[i % conversations].clone(), keys[&id.to_string()].clone());
        let url = format!("http://{addr}/api/v1/submissions/{id}/retrieve");
        inflight.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = client.post(url).bearer_auth(token).json(&serde_json::json!({ "key": key })).send().await;
            let ok = match r {
                Ok(resp) => resp.status().is_success() && resp.bytes().await.is_ok(),
                Err(_) => false,
            };
            (start.elapsed().as_secs_f64() * 1000.0, ok)
        }));
    }
    let mut samples = Vec::with_capacity(n);
    let mut ok = 0;
    for f in inflight {
        let (ms, good) = f.await.map_err(|e| bench_err(e.to_string()))?;
        samples.push(ms);
        ok += usize::from(good);
    }
    service.stop().await;
    Ok((samples, ok))
}

/// A FormSent of the bench site: agent `bench-agent-<agent>`, one per conversation.
fn bench_form_sent(conversation: &str, form: &str, agent: usize) -> Event {
    Event::FormSent(secureforms::events::FormSent {
        header: secureforms::events::EventHeader::new(
            secureforms::events::EventKind::FormSent,
            uuid::Uuid::new_v4(),
            system_clock()(),
            "bench",
            conversation,
            form,
        ),
        form_id: form.to_string(),
        agent_id: format!("bench-agent-{agent}"),
        agent_profile: "agent".into(),
        template_id: "card-payment".into(),
        visitor_ref: None,
        agent_session_id: None,
    })
}

/// The token of agent `bench-agent-<agent>` (session `bench-<agent>`), signed with `secret`.
fn bench_token(agent: usize, secret: &str) -> anyhow::Result<String> {
    let claims = secureforms::http::auth::AgentClaims {
        sub: format!("bench-agent-{agent}"),
        site: "bench".into(),
        roles: vec!["agent".into()],
        permissions: vec!["use_secure_form".into()],
        sid: format!("bench-{agent}"),
        exp: system_clock()() / 1000 + 3600,
        nbf: None,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

const CLUSTER_SECRET: &str = "bench-shared-secret-of-at-least-32-bytes";

/// Starts `n` nodes of one deployment (one master key, their own ids and data directories, gateways
/// on free loopback ports) and waits until they own every partition between them and each node's
/// directory names every owner.
async fn cluster_nodes(
    brokers: &str,
    root: &std::path::Path,
    n: usize,
) -> anyhow::Result<Vec<secureforms::service::Service>> {
    use secureforms::service::Service;
    let p = format!("bench-{}-c{n}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    std::fs::create_dir_all(root)?;
    write_private(&root.join("master.key"), secureforms::crypto::MasterKey::generate_base64().as_bytes())?;
    write_private(&root.join("jwt.secret"), CLUSTER_SECRET.as_bytes())?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut s: Settings = toml::from_str(BENCH_SITE)?;
        s.brokers = Some(brokers.to_string());
        s.topic_prefix = p.clone();
        s.group_prefix = p.trim_end_matches('.').to_string();
        s.node_id = format!("bench-node-{i}");
        s.data_dir = root.join(format!("node-{i}"));
        s.master_key_file = Some(root.join("master.key"));
        s.http_listen = Some("127.0.0.1:0".into());
        s.metrics_listen = None;
        s.purge_interval_secs = 0;
        s.public_url = "http://bench.invalid".into();
        s.agent_auth.jwt_secret_file = Some(root.join("jwt.secret"));
        // Every bench visitor comes from 127.0.0.1: the per-client limit is not what is measured.
        let unlimited = secureforms::config::Rate { per_minute: 10_000_000, burst: 100_000 };
        s.rate_limits.visitor_per_client = unlimited;
        s.rate_limits.api_per_client = unlimited;
        let node = Service::start(s, brokers.to_string(), system_clock()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        node.wait_ready(Duration::from_secs(120)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        nodes.push(node);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let partitions = nodes[0].partitions;
        let owner = |p: i32| nodes.iter().position(|x| x.ownership.owns(p));
        let settled = (0..partitions).all(|p| {
            let Some(o) = owner(p) else { return false };
            nodes.iter().filter(|x| x.ownership.owns(p)).count() == 1
                && nodes.iter().all(|x| {
                    secureforms::handlers::directory::DirectoryView::new(x.directory.clone())
                        .owner_of(p)
                        .ok()
                        .flatten()
                        .is_some_and(|e| e.node_id == nodes[o].settings.node_id)
                })
        }) && nodes.iter().all(|x| !x.ownership.owned().is_empty() || nodes.len() > partitions as usize);
        if settled {
            return Ok(nodes);
        }
        anyhow::ensure!(Instant::now() < deadline, "{n} nodes did not settle their partitions within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One cluster size: `forms` visitors open and submit through the nodes in turn (16 at a time);
/// returns forms per second (first open to last FormReady), and the nodes, the FormReady keys and
/// the submission ids for the retrieve measurement.
async fn cluster_flow(
    brokers: &str,
    root: &std::path::Path,
    n: usize,
    forms: usize,
) -> anyhow::Result<(f64, Vec<secureforms::service::Service>, Vec<(String, String, String)>)> {
    let nodes = cluster_nodes(brokers, root, n).await?;
    let k = kafka_settings(&nodes[0].settings, brokers.to_string(), "bench");
    let links = reader(&k, &k.names.name(Topic::FormLinks), nodes[0].partitions)?;
    let ready = reader(&k, &k.names.name(Topic::AgentEvents), nodes[0].partitions)?;
    let sends: Vec<Event> = (0..forms).map(|c| bench_form_sent(&format!("cconv-{c}"), &format!("cf-{c}"), c)).collect();
    for r in futures::future::join_all(sends.iter().map(|e| nodes[0].producer.send(e))).await {
        r?;
    }
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while paths.len() < forms {
        anyhow::ensure!(Instant::now() < deadline, "{} of {forms} FormIssued within 120 s", paths.len());
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), links.recv()).await
            && let Some(Ok(Event::FormIssued(i))) = m.payload().map(|p| Codec::get().decode(p))
        {
            paths.insert(i.form_id, i.link.trim_start_matches("http://bench.invalid").to_string());
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let bases: Vec<String> = nodes.iter().map(|x| format!("http://{}", x.http_addr.expect("a gateway"))).collect();
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut visits = Vec::new();
    for (i, path) in paths.values().enumerate() {
        let (client, base, path, gate) = (client.clone(), bases[i % n].clone(), path.clone(), gate.clone());
        visits.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let (form_path, key) = path.split_once("?k=").ok_or_else(|| anyhow::anyhow!("a link with a key"))?;
            let page = client
                .post(format!("{base}{form_path}/open"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("k={key}"))
                .send()
                .await?
                .text()
                .await?;
            let at = page.find("name=\"k\" value=\"").ok_or_else(|| anyhow::anyhow!("an opened form"))? + 16;
            let end = page[at..].find('"').ok_or_else(|| anyhow::anyhow!("a submit key"))? + at;
            let body = format!("k={}&pan=4111111111111111&expiry=12%2F39&cvv=123", &page[at..end]);
            let r = client
                .post(format!("{base}{form_path}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "submit answered {}", r.status());
            anyhow::Ok(())
        }));
    }
    for v in visits {
        v.await??;
    }
    let mut keys: BTreeMap<String, (String, String)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while keys.len() < forms {
        anyhow::ensure!(Instant::now() < deadline, "{} of {forms} FormReady within 120 s", keys.len());
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), ready.recv()).await
            && let Some(Ok(Event::FormReady(r))) = m.payload().map(|p| Codec::get().decode(p))
        {
            keys.insert(r.header.conversation_id.clone(), (r.submission_id, r.retrieve_key));
        }
    }
    let per_sec = forms as f64 / started.elapsed().as_secs_f64();
    let keyed = keys.into_iter().map(|(conv, (id, key))| (conv, id, key)).collect();
    Ok((per_sec, nodes, keyed))
}

/// Retrieve latency through the owner and through a node that forwards to it, alternating, at 100
/// requests/s (one agent per conversation, so the per-agent limit is not what is measured).
async fn forwarding_cost(
    nodes: &[secureforms::service::Service],
    keyed: &[(String, String, String)],
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let (mut owner, mut forwarded) = (Vec::new(), Vec::new());
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for (i, (conv, id, key)) in keyed.iter().enumerate() {
        tick.tick().await;
        let c: usize = conv.trim_start_matches("cconv-").parse()?;
        let token = bench_token(c, CLUSTER_SECRET)?;
        let p = nodes[0].partition_of(conv);
        let o = nodes.iter().position(|x| x.ownership.owns(p)).ok_or_else(|| anyhow::anyhow!("no owner of {p}"))?;
        let via_owner = i % 2 == 0;
        let node = if via_owner { o } else { (o + 1) % nodes.len() };
        let url = format!("http://{}/api/v1/submissions/{id}/retrieve", nodes[node].http_addr.expect("a gateway"));
        let start = Instant::now();
        let r = client.post(url).bearer_auth(token).json(&serde_json::json!({ "key": key })).send().await?;
        anyhow::ensure!(r.status().is_success(), "retrieve answered {}", r.status());
        r.bytes().await?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if via_owner { owner.push(ms) } else { forwarded.push(ms) }
    }
    owner.sort_by(|a, b| a.total_cmp(b));
    forwarded.sort_by(|a, b| a.total_cmp(b));
    Ok((owner, forwarded))
}

async fn cluster_phase(brokers: &str, dir: &std::path::Path, forms: usize) -> anyhow::Result<ClusterReport> {
    let mut throughput = Vec::new();
    let mut cost = (Vec::new(), Vec::new());
    for n in 1..=3 {
        let (per_sec, nodes, keyed) = cluster_flow(brokers, &dir.join(format!("cluster-{n}")), n, forms).await?;
        throughput.push((n, per_sec));
        if n == 2 {
            cost = forwarding_cost(&nodes, &keyed).await?;
        }
        for mut node in nodes {
            node.stop().await;
        }
    }
    let (owner, forwarded) = cost;
    Ok(ClusterReport {
        forms,
        throughput,
        retrieve_requests: owner.len() + forwarded.len(),
        owner_p50_ms: percentile(&owner, 0.50),
        owner_p99_ms: percentile(&owner, 0.99),
        forwarded_p50_ms: percentile(&forwarded, 0.50),
        forwarded_p99_ms: percentile(&forwarded, 0.99),
    })
}

const BENCH_SITE: &str = r#"
[sites.bench]
enabled = true
retrieve_key_ttl_secs = 3600
[sites.bench.pci_policy]
min_password_length = 8
failed_logins_before_disable = 3
idle_operator_action = "logout"
[[sites.bench.templates]]
id = "card-payment"
title = "Card payment"
[[sites.bench.templates.questions]]
id = "pan"
label = "Card number"
kind = "card_number"
[[sites.bench.templates.questions]]
id = "expiry"
label = "Expiry"
kind = "card_expiry"
[[sites.bench.templates.questions]]
id = "cvv"
label = "CVV"
kind = "cvv"
"#;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run_bench(settings: &Settings, brokers: &str, opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    let events = submissions(opts.records);
    let record_bytes = Codec::get().encode(&events[0].1)?.len();
    let dir = tempfile_dir()?;
    // A broker started for the bench is cold: Apache Kafka's JVM compiles its produce and fetch
    // paths while the first phases run, which cost it 45-85 us of CPU per record instead of 8-15 us
    // warm, so the phases measured the JIT. Untimed runs of both paths first, then of the two
    // latency phases: their paths (topic creation, group joins, small produce and fetch requests)
    // were still compiling when they ran, and the retrieve p99 of a broker's first run was 4.3-7.4
    // ms against 1.9-2.0 ms in the next run on the same broker.
    if opts.warmup_records > 0 {
        let warm = submissions(opts.warmup_records);
        let warm_dir = dir.path().join("warm");
        passthrough(&fresh(settings, brokers, "warm-pass"), &warm, None).await?;
        tokenizer(&fresh(settings, brokers, "warm-tok"), &warm_dir, &warm, None).await?;
        latency(&fresh(settings, brokers, "warm-lat"), &warm_dir, opts.latency_rate, opts.latency_secs).await?;
        retrieve_latency(brokers, &warm_dir, opts.retrieve_rate, opts.retrieve_secs).await?;
    }
    phase("passthrough");
    let (pass, pass_cpu) = passthrough(&fresh(settings, brokers, "pass"), &events, opts.broker_pid).await?;
    phase("tokenizer");
    let (tok, tok_cpu) =
        tokenizer(&fresh(settings, brokers, "tok"), dir.path(), &submissions(opts.records), opts.broker_pid).await?;
    phase("tokenizer-alone");
    let (alone, alone_cpu) =
        tokenizer_alone(&fresh(settings, brokers, "alone"), dir.path(), &submissions(opts.records)).await?;
    phase("latency");
    let mut lat = latency(&fresh(settings, brokers, "lat"), dir.path(), opts.latency_rate, opts.latency_secs).await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    phase("retrieve");
    let (mut ret, retrieve_ok) = retrieve_latency(brokers, dir.path(), opts.retrieve_rate, opts.retrieve_secs).await?;
    ret.sort_by(|a, b| a.total_cmp(b));
    phase("purge");
    let (expired, small, large) = (PURGE_EXPIRED, PURGE_SMALL, PURGE_SMALL * 10);
    let purge_small_ms = purge_scan(dir.path(), small, expired)?;
    let purge_large_ms = purge_scan(dir.path(), large, expired)?;
    phase("cluster");
    let cluster =
        if opts.cluster_forms > 0 { Some(cluster_phase(brokers, dir.path(), opts.cluster_forms).await?) } else { None };
    phase("report");
    let broker_kind = secureforms::kafka::admin::Admin::new(&fresh(settings, brokers, "kind"))?.broker_kind().await?;
    Ok(BenchReport {
        brokers: brokers.to_string(),
        broker_kind: broker_kind.name().to_string(),
        client_properties: settings.kafka_properties.clone(),
        records: opts.records,
        record_bytes,
        warmup_records: opts.warmup_records,
        passthrough_per_sec: pass,
        tokenizer_per_sec: tok,
        passthrough_cpu_us: pass_cpu.0,
        tokenizer_cpu_us: tok_cpu.0,
        passthrough_broker_cpu_us: pass_cpu.1,
        tokenizer_broker_cpu_us: tok_cpu.1,
        ratio: tok / pass,
        tokenizer_alone_per_sec: alone,
        tokenizer_alone_cpu_us: alone_cpu,
        latency_rate: opts.latency_rate,
        latency_samples: lat.len(),
        latency_p50_ms: percentile(&lat, 0.50),
        latency_p99_ms: percentile(&lat, 0.99),
        latency_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        retrieve_rate: opts.retrieve_rate,
        retrieve_requests: ret.len(),
        retrieve_ok,
        retrieve_p50_ms: percentile(&ret, 0.50),
        retrieve_p99_ms: percentile(&ret, 0.99),
        retrieve_max_ms: ret.last().copied().unwrap_or(f64::NAN),
        purge_expired: expired,
        purge_small_vault: small,
        purge_large_vault: large,
        purge_small_ms,
        purge_large_ms,
        cluster,
    })
}

/// Marks on stderr when a phase starts (wall clock, Unix ms), so a profile of the broker or of this
/// process taken over the whole run can be cut into phases.
fn phase(name: &str) {
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    eprintln!("bench: phase {name} starts at {} (Unix ms)", at.as_millis());
}

const PURGE_EXPIRED: usize = 500;
const PURGE_SMALL: usize = 20_000;

/// Median time (ms) of the purge's expiry scan over a vault index of `total` submissions of which
/// `expired` are past retention (index entries only: the scan reads nothing else).
fn purge_scan(dir: &std::path::Path, total: usize, expired: usize) -> anyhow::Result<f64> {
    use secureforms::vault::record::time_key;
    let store = Store::open(&dir.join(format!("purge-{total}")))?;
    let index = store.tree(secureforms::vault::trees::BY_TIME)?;
    let old = secureforms::domain::retention::parse_as_of("2020-01-01").unwrap_or(0);
    let now = system_clock()();
    let mut batch = sled::Batch::default();
    for i in 0..total {
        let at = if i < expired { old + i as i64 } else { now - (i as i64 % 86_400_000) };
        batch.insert(time_key("bench", at, &uuid::Uuid::new_v4()), &[][..]);
    }
    index.apply_batch(batch).map_err(secureforms::store::StoreError::from)?;
    let mut times = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        let found = secureforms::ops::purge::expired(&store, "bench", 13, now)?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(found.len(), expired, "the scan finds exactly the expired entries");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(percentile(&times, 0.5))
}

/// A scratch directory for the bench's sled stores, removed when dropped.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<ScratchDir> {
    let p = std::env::temp_dir().join(format!("secureforms-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&p).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", p.display()))?;
    Ok(ScratchDir(p))
}

impl BenchReport {
    pub fn render(&self) -> String {
        let mut out = self.render_node();
        if let Some(c) = &self.cluster {
            out.push_str(&format!(
                "cluster: {} visitors (open + submit over HTTP, nodes in turn, 16 at a time) until every FormReady:\n",
                c.forms
            ));
            for (n, per_sec) in &c.throughput {
                out.push_str(&format!("\x20 {n} node(s)  {per_sec:>9.0} forms/s\n"));
            }
            out.push_str(&format!(
                "\x20 agent retrieve with 2 nodes, {} requests at 100/s: through the owner p50 {:.2} ms p99 {:.2} ms; through the other node (forwarded) p50 {:.2} ms p99 {:.2} ms\n",
                c.retrieve_requests, c.owner_p50_ms, c.owner_p99_ms, c.forwarded_p50_ms, c.forwarded_p99_ms
            ));
        }
        out
    }

    fn render_node(&self) -> String {
        let cpu = |own: f64, broker: Option<f64>| match broker {
            Some(b) => format!("{own:.0} / {b:.0} us"),
            None => format!("{own:.0} us / -"),
        };
        format!(
            "secureforms bench against {} ({}), client properties over the shipped ones: {:?}\n\
             records: {} FormSubmitted of {} bytes each, after {} untimed through each path{} (broker warm-up)\n\
             passthrough (consume -> produce)                                  {:>9.0} records/s\n\
             tokenizer   (consume -> vault durable -> FormReady -> offsets)    {:>9.0} records/s\n\
             ratio tokenizer / passthrough                                     {:>9.2}   (goal >= 0.90)\n\
             CPU per record, bench process / broker: passthrough {}, tokenizer {}\n\
             tokenizer's batch work alone, no broker, one thread               {:>9.0} records/s ({:.0} us CPU per record; {:.2} of the passthrough)\n\
             latency FormSubmitted produced -> FormReady consumed, {} records/s, {} samples:\n\
             \x20 p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (goal p99 <= 20 ms)\n\
             agent retrieve over HTTP (JWT, access rules, detokenize, audit durable), {} requests/s, {} requests, {} granted:\n\
             \x20 p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (goal p99 <= 2 ms)\n\
             purge expiry scan, {} expired: vault of {} {:.2} ms, vault of {} {:.2} ms, ratio {:.2}   (cost follows what expires: ~1, not {})\n",
            self.brokers,
            self.broker_kind,
            self.client_properties,
            self.records,
            self.record_bytes,
            self.warmup_records,
            if self.warmup_records > 0 { ", and one untimed run of the latency phases" } else { "" },
            self.passthrough_per_sec,
            self.tokenizer_per_sec,
            self.ratio,
            cpu(self.passthrough_cpu_us, self.passthrough_broker_cpu_us),
            cpu(self.tokenizer_cpu_us, self.tokenizer_broker_cpu_us),
            self.tokenizer_alone_per_sec,
            self.tokenizer_alone_cpu_us,
            self.tokenizer_alone_per_sec / self.passthrough_per_sec,
            self.latency_rate,
            self.latency_samples,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_max_ms,
            self.retrieve_rate,
            self.retrieve_requests,
            self.retrieve_ok,
            self.retrieve_p50_ms,
            self.retrieve_p99_ms,
            self.retrieve_max_ms,
            self.purge_expired,
            self.purge_small_vault,
            self.purge_small_ms,
            self.purge_large_vault,
            self.purge_large_ms,
            self.purge_large_ms / self.purge_small_ms,
            self.purge_large_vault / self.purge_small_vault,
        )
    }
}

/// A key file only its owner may read (the service refuses anything more open).
fn write_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
}

/// The bench's events are signed and checked as the service's are (the MAC is part of the cost).
fn bench_signer() -> std::sync::Arc<secureforms::crypto::mac::EventSigner> {
    let master = secureforms::crypto::MasterKey::from_base64(&secureforms::crypto::MasterKey::generate_base64())
        .expect("a generated master key parses");
    std::sync::Arc::new(secureforms::crypto::mac::EventSigner::new(&secureforms::crypto::IntegrityKey::from_master(
        &master,
    )))
}

/// Measure throughput and latency against a broker: raw consume->produce passthrough, the
/// tokenizer's durable path, their ratio, and FormSubmitted->FormReady latency (p50/p99).
///
/// Uses fresh topics under a unique prefix; leaves them behind (delete them on a shared cluster).
#[derive(Debug, clap::Parser)]
#[command(
    name = "pipeline",
    after_help = "Examples:\n  scripts/bench.sh --broker kafka\n  cargo bench --bench pipeline -- --brokers 127.0.0.1:9092 --broker-kind kafka --records 20000 --json"
)]
struct Args {
    #[command(flatten)]
    global: secureforms::cli::GlobalArgs,
    /// Passed by `cargo bench` to every bench target; nothing to do with it here.
    #[arg(long, hide = true)]
    bench: bool,
    /// Records for the throughput phases.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Steady produce rate for the latency phase (records/s).
    #[arg(long, default_value_t = 200)]
    latency_rate: u32,
    /// Duration of the latency phase (seconds).
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Steady request rate for the agent retrieve phase (requests/s).
    #[arg(long, default_value_t = 1000)]
    retrieve_rate: u32,
    /// Duration of the agent retrieve phase (seconds).
    #[arg(long, default_value_t = 5)]
    retrieve_secs: u64,
    /// Forms per cluster size in the cluster phase (1, 2 and 3 nodes); 0 skips it.
    #[arg(long, default_value_t = 300)]
    cluster_forms: usize,
    /// Pid of a broker on this machine, to report its CPU time per record too.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Records sent through the passthrough and the tokenizer, untimed, before measuring: a freshly
    /// started JVM broker spends its first tens of thousands of records compiling (0: no warm-up).
    /// With a warm-up, the latency and retrieve phases also run once untimed first.
    /// Default: 30,000 on Apache Kafka; none on tansu, which has no JIT to warm and slows as its
    /// store grows (after 60,000 warm-up records its passthrough fell from 14 k to 200 records/s).
    #[arg(long)]
    warmup_records: Option<usize>,
    /// Run with the client settings from before the latency tuning (linger.ms=2, Nagle on,
    /// fetch.wait.max.ms=20 on every broker), to
    /// compare: the report of a run with and one without says what the tuning buys.
    #[arg(long)]
    untuned: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.records == 0
        || args.latency_rate == 0
        || args.latency_secs == 0
        || args.retrieve_rate == 0
        || args.retrieve_secs == 0
    {
        anyhow::bail!(
            "--records, --latency-rate, --latency-secs, --retrieve-rate and --retrieve-secs must be at least 1"
        );
    }
    let mut settings = args.global.settings()?;
    if args.untuned {
        for (k, v) in [("linger.ms", "2"), ("socket.nagle.disable", "false"), ("fetch.wait.max.ms", "20")] {
            settings.kafka_properties.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }
    let brokers = resolve_brokers(&settings)?;
    let report = run_bench(
        &settings,
        &brokers,
        &BenchOptions {
            records: args.records,
            latency_rate: args.latency_rate,
            latency_secs: args.latency_secs,
            retrieve_rate: args.retrieve_rate,
            retrieve_secs: args.retrieve_secs,
            cluster_forms: args.cluster_forms,
            broker_pid: args.broker_pid,
            warmup_records: args.warmup_records.unwrap_or(match settings.broker_kind {
                Some(secureforms::kafka::BrokerKind::Tansu) => 0,
                _ => 30_000,
            }),
        },
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

/// The service's allocator (src/main.rs), so the bench measures the runtime as `serve` runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    use clap::Parser;
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
