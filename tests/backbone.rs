//! The event backbone end to end, against a real Kafka-protocol broker process: FormSent in,
//! FormIssued/FormRejected out; bad records dead-lettered while good ones flow; a consumer killed
//! mid-stream loses nothing and applies nothing twice; topics as code.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use secureforms::events::{Codec, Event, EventKind};
use secureforms::kafka::runtime::system_clock;
use secureforms::topics::Topic;

const WAIT: Duration = Duration::from_secs(60);

/// Starts the service in-process; the returned sender stops it.
fn start_service(
    settings: secureforms::config::Settings,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        secureforms::service::serve(settings, system_clock(), async {
            let _ = rx.await;
        })
        .await
        .expect("service runs and stops cleanly");
    });
    (tx, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_sent_becomes_form_issued_or_form_rejected_with_a_reason() {
    let prefix = unique_prefix("flow");
    let dir = tempfile::tempdir().unwrap();
    let (stop, handle) = start_service(settings(&prefix, dir.path()));
    let producer = producer(&prefix).await;

    let cases = [
        ("f-ok", "acme", "agent", "card-payment", None),
        ("f-site", "nosuchsite", "agent", "card-payment", Some("unknown_site")),
        ("f-perm", "acme", "trainee", "card-payment", Some("permission_denied")),
        ("f-prof", "acme", "ghost-profile", "card-payment", Some("unknown_profile")),
        ("f-tpl", "acme", "agent", "no-such-template", Some("unknown_template")),
    ];
    // The topics are created by the service at start; produce once they exist.
    for (form, site, profile, template, _) in &cases {
        let ev = form_sent(site, &format!("conv-{form}"), form, "agent-7", profile, template);
        produce_when_ready(&producer, &ev).await;
    }
    let mut reader = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(
        reader.read_until(WAIT, |r| r.len() >= cases.len()).await,
        "all outcomes arrive; got {}",
        reader.records.len()
    );
    let outcomes = by_correlation(&reader.events());
    for (form, _, _, _, expected) in &cases {
        let evs = &outcomes[*form];
        assert_eq!(evs.len(), 1, "one outcome for {form}");
        match (&evs[0], expected) {
            (Event::FormIssued(i), None) => {
                assert!(i.link.starts_with("http://127.0.0.1:8080/f/acme/f-ok?k="), "{}", i.link);
                let key = i.link.split("k=").nth(1).unwrap();
                let (random, partition) = key.split_once('.').expect("the key names its partition");
                assert_eq!(random.len(), 22, "128-bit key, base64url");
                // The partition of the conversation, as the Java client places it (routing hint).
                assert_eq!(partition, secureforms::topics::partition_for(b"conv-f-ok", 6).to_string());
                assert!(!i.open_key_hash.contains(key));
                assert_eq!(i.header.conversation_id, "conv-f-ok");
            }
            (Event::FormRejected(r), Some(reason)) => {
                assert_eq!(&r.reason, reason, "{form}: {}", r.detail);
                assert!(!r.detail.is_empty());
            }
            (other, _) => panic!("{form}: unexpected outcome {other:?}"),
        }
    }
    // Records are keyed by conversation id.
    for m in &reader.records {
        let ev = Codec::get().decode(m.payload().unwrap()).unwrap();
        assert_eq!(m.key().unwrap(), ev.header().conversation_id.as_bytes());
    }
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// Produces, retrying while the service is still creating the topics.
async fn produce_when_ready(producer: &secureforms::kafka::EventProducer, ev: &Event) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match producer.send(ev).await {
            Ok(_) => return,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "cannot produce: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_with_a_reason_and_the_next_good_one_is_processed() {
    let prefix = unique_prefix("dlq");
    let dir = tempfile::tempdir().unwrap();
    let (stop, handle) = start_service(settings(&prefix, dir.path()));
    let producer = producer(&prefix).await;
    let first = form_sent("acme", "conv-a", "f-before", "agent-1", "agent", "card-payment");
    produce_when_ready(&producer, &first).await;

    // Same conversation key, so all four land on one partition in this order.
    let garbage = b"{\"not\": \"avro\"}".to_vec();
    let mut unknown_schema = vec![0xC3, 0x01, 9, 9, 9, 9, 9, 9, 9, 9];
    unknown_schema.extend_from_slice(b"body");
    producer.send_raw(Topic::ChatEvents, b"conv-a", &garbage).await.unwrap();
    producer.send_raw(Topic::ChatEvents, b"conv-a", &unknown_schema).await.unwrap();
    let after = form_sent("acme", "conv-a", "f-after", "agent-1", "agent", "card-payment");
    producer.send(&after).await.unwrap();

    let mut dlq = TopicReader::new(&prefix, Topic::DeadLetters).await;
    assert!(dlq.read_until(WAIT, |r| r.len() >= 2).await, "two dead letters");
    let letters: Vec<_> = dlq
        .events()
        .into_iter()
        .map(|e| match e {
            Event::DeadLetter(d) => d,
            other => panic!("not a dead letter: {other:?}"),
        })
        .collect();
    let by_payload: BTreeMap<Vec<u8>, _> = letters.iter().map(|d| (d.payload.clone(), d)).collect();
    let g = by_payload.get(&garbage).expect("garbage kept byte for byte");
    assert_eq!(g.error_kind, "decode");
    assert!(g.reason.contains("C3 01"), "{}", g.reason);
    assert_eq!(g.source_topic, format!("{prefix}chat-events"));
    assert_eq!(g.source_key.as_deref(), Some(&b"conv-a"[..]));
    let u = by_payload.get(&unknown_schema).expect("unknown-schema record kept");
    assert_eq!(u.error_kind, "unknown_schema");
    assert!(u.reason.contains("0909090909090909"), "{}", u.reason);
    assert!(u.source_offset > g.source_offset);
    assert_eq!(u.source_partition, g.source_partition);

    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| r.len() >= 2).await);
    let forms: BTreeSet<_> = links.events().iter().map(|e| e.header().correlation_id.clone()).collect();
    assert_eq!(forms, BTreeSet::from(["f-before".to_string(), "f-after".to_string()]), "the loop went on");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_to_copy_into_a_dead_letter_is_named_there_and_the_loop_goes_on() {
    // A record just under the broker's limit (1 MiB by default): a letter carrying it whole would
    // be over the producer's limit (1,000,000 bytes), could never be delivered, and would hold the
    // consumer on this record for ever.
    let prefix = unique_prefix("dlq-big");
    let dir = tempfile::tempdir().unwrap();
    let (stop, handle) = start_service(settings(&prefix, dir.path()));
    let mut big_settings = kafka(&prefix);
    big_settings.properties.insert("message.max.bytes".into(), "1048000".into());
    let big_producer = secureforms::kafka::EventProducer::new(&big_settings).unwrap();
    let producer = producer(&prefix).await;
    let first = form_sent("acme", "conv-big", "f-before", "agent-1", "agent", "card-payment");
    produce_when_ready(&producer, &first).await;

    let big = vec![b'x'; 1_040_000];
    big_producer.send_raw(Topic::ChatEvents, b"conv-big", &big).await.expect("the broker takes it");
    let after = form_sent("acme", "conv-big", "f-after", "agent-1", "agent", "card-payment");
    producer.send(&after).await.unwrap();

    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| r.len() >= 2).await, "the record after the big one was processed");
    let forms: BTreeSet<_> = links.events().iter().map(|e| e.header().correlation_id.clone()).collect();
    assert_eq!(forms, BTreeSet::from(["f-before".to_string(), "f-after".to_string()]));

    let mut dlq = TopicReader::new(&prefix, Topic::DeadLetters).await;
    assert!(dlq.read_until(WAIT, |r| !r.is_empty()).await, "a dead letter");
    let Event::DeadLetter(letter) = dlq.events().remove(0) else { panic!("not a dead letter") };
    assert!(letter.payload.is_empty(), "the record's bytes are not copied");
    assert_eq!(letter.source_topic, format!("{prefix}chat-events"));
    assert!(
        letter.reason.contains("1040008 bytes")
            && letter
                .reason
                .contains(&format!("{prefix}chat-events/{}@{}", letter.source_partition, letter.source_offset)),
        "the letter says how large the record is and where it stays: {}",
        letter.reason
    );
    assert!(letter.reason.contains("C3 01"), "and why it was refused: {}", letter.reason);
    // A re-drive has nothing to send back for it, and says so.
    let out = redrive(&prefix, &[]);
    assert!(
        out.contains("too large to copy into its letter")
            && out.contains("re-drove 0 dead letter(s), 1 left")
            && out.matches("too large to copy").count() == 1,
        "{out}"
    );
    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_bus_event_with_an_id_too_large_to_answer_is_dead_lettered_and_the_loop_goes_on() {
    // A well-formed FormSent whose form id is 600 kB: its FormIssued or FormRejected repeats the id
    // (header and body), so it could never be delivered.
    let prefix = unique_prefix("big-id");
    let dir = tempfile::tempdir().unwrap();
    let (stop, handle) = start_service(settings(&prefix, dir.path()));
    let producer = producer(&prefix).await;
    let first = form_sent("acme", "conv-id", "f-before", "agent-1", "agent", "card-payment");
    produce_when_ready(&producer, &first).await;
    let mut large = form_sent("acme", "conv-id", "f-large", "agent-1", "agent", "card-payment");
    if let Event::FormSent(f) = &mut large {
        f.form_id = "f".repeat(600_000);
    }
    producer.send(&large).await.unwrap();
    let after = form_sent("acme", "conv-id", "f-after", "agent-1", "agent", "card-payment");
    producer.send(&after).await.unwrap();

    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| r.len() >= 2).await, "the FormSent after the large one was answered");
    let forms: BTreeSet<_> = links.events().iter().map(|e| e.header().correlation_id.clone()).collect();
    assert_eq!(forms, BTreeSet::from(["f-before".to_string(), "f-after".to_string()]));
    let mut dlq = TopicReader::new(&prefix, Topic::DeadLetters).await;
    assert!(dlq.read_until(WAIT, |r| !r.is_empty()).await, "a dead letter");
    let Event::DeadLetter(letter) = dlq.events().remove(0) else { panic!("not a dead letter") };
    assert_eq!(letter.error_kind, "too_large");
    assert!(letter.reason.contains("FormSent") && letter.reason.contains("65536"), "{}", letter.reason);
    assert!(letter.payload.is_empty() && letter.reason.contains("is not copied"), "over 512 KiB: named, not copied");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_bus_record_off_its_murmur2_partition_is_moved_there_answered_once_and_named_with_the_fix() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let _ = logs();
    let prefix = unique_prefix("misplaced");
    let dir = tempfile::tempdir().unwrap();
    let (stop, handle) = start_service(settings(&prefix, dir.path()));
    let producer = producer(&prefix).await;
    let first = form_sent("acme", "conv-placed", "f-placed", "agent-1", "agent", "card-payment");
    produce_when_ready(&producer, &first).await;
    // A chat bus on another partitioner: the record lands next to where murmur2 puts it.
    let partitions = Topic::ChatEvents.spec().partitions;
    let home = secureforms::topics::partition_for(b"conv-elsewhere", partitions);
    let elsewhere = (home + 1) % partitions;
    let event = form_sent("acme", "conv-elsewhere", "f-elsewhere", "agent-1", "agent", "card-payment");
    let payload = Codec::get().encode(&event).unwrap();
    let raw: FutureProducer = kafka(&prefix).client_config().create().unwrap();
    let topic = format!("{prefix}chat-events");
    let record = FutureRecord::to(&topic).key("conv-elsewhere").payload(&payload).partition(elsewhere);
    raw.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();

    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| r.len() >= 2).await, "it is answered");
    let mut chat = TopicReader::new(&prefix, Topic::ChatEvents).await;
    assert!(chat.read_until(WAIT, |r| r.len() >= 3).await, "the first, the misplaced one and its copy");
    let copies: Vec<_> = chat.records.iter().filter(|m| m.payload() == Some(payload.as_slice())).collect();
    let places: BTreeSet<i32> = copies.iter().map(|m| m.partition()).collect();
    assert_eq!(
        places,
        BTreeSet::from([elsewhere, home]),
        "the record, and its copy byte for byte on its conversation's partition"
    );
    assert!(copies.iter().all(|m| m.key() == Some(&b"conv-elsewhere"[..])));
    // A valid FormSent too large for any answer, on the wrong partition too, then a good one behind
    // it: the large one is dead-lettered where it is (a copy would be over the producer's limit and
    // hold the consumer for ever), the good one is moved and answered.
    let mut large = form_sent("acme", "conv-elsewhere", "f-large", "agent-1", "agent", "card-payment");
    if let Event::FormSent(f) = &mut large {
        f.form_id = "f".repeat(1_030_000);
    }
    let large = Codec::get().encode(&large).unwrap();
    let raw_large: FutureProducer =
        kafka(&prefix).client_config().set("message.max.bytes", "1048000").create().unwrap();
    let record = FutureRecord::to(&topic).key("conv-elsewhere").payload(&large).partition(elsewhere);
    raw_large.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    let behind = Codec::get()
        .encode(&form_sent("acme", "conv-elsewhere", "f-behind", "agent-1", "agent", "card-payment"))
        .unwrap();
    let record = FutureRecord::to(&topic).key("conv-elsewhere").payload(&behind).partition(elsewhere);
    raw.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    let behind_answered = |r: &[rdkafka::message::OwnedMessage]| {
        r.iter().any(|m| {
            m.payload()
                .and_then(|p| Codec::get().decode(p).ok())
                .is_some_and(|e| e.header().correlation_id == "f-behind")
        })
    };
    assert!(links.read_until(WAIT, behind_answered).await, "the FormSent behind the large one is answered");

    let deadline = std::time::Instant::now() + WAIT;
    let warning = loop {
        let text = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
        if let Some(line) = text.lines().find(|l| l.contains("murmur2 of their conversation id") && l.contains(&topic))
        {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no warning about the misplaced record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(warning.contains(&format!("partition={elsewhere}")), "{warning}");
    assert!(warning.contains(&format!("expected_partition={home}")) && warning.contains("moved=true"), "{warning}");
    assert!(warning.contains("partitioner=murmur2_random"), "it says what to change: {warning}");
    assert_eq!(
        String::from_utf8_lossy(&logs().lock().unwrap()).matches("murmur2 of their conversation id").count(),
        1,
        "the record placed by murmur2 is not reported"
    );
    let answered = |r: &[rdkafka::message::OwnedMessage]| {
        r.iter()
            .filter(|m| {
                m.payload()
                    .and_then(|p| Codec::get().decode(p).ok())
                    .is_some_and(|e| e.header().correlation_id == "f-elsewhere")
            })
            .count()
    };
    assert_eq!(answered(&links.records), 1, "answered once");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_form_sent_from_the_chat_bus_is_answered_once() {
    let prefix = unique_prefix("dup");
    let dir = tempfile::tempdir().unwrap();
    let (stop, handle) = start_service(settings(&prefix, dir.path()));
    let producer = producer(&prefix).await;
    let ev = form_sent("acme", "conv-d", "f-dup", "agent-1", "agent", "card-payment");
    produce_when_ready(&producer, &ev).await;
    producer.send(&ev).await.unwrap();
    let marker = form_sent("acme", "conv-d", "f-marker", "agent-1", "agent", "card-payment");
    producer.send(&marker).await.unwrap();
    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| r.len() >= 2).await);
    // The marker comes after the duplicate on the same partition, so if a second answer were coming
    // it would already be here.
    let outcomes = by_correlation(&links.events());
    assert_eq!(outcomes["f-dup"].len(), 1);
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// Kills the service process (SIGKILL) while it is working through a stream of FormSent, restarts
/// it, and checks every form got exactly one answer: never two different links for one form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let prefix = unique_prefix("crash");
    let dir = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
    let run = std::sync::atomic::AtomicUsize::new(0);
    let spawn = || {
        let n = run.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = std::fs::File::create(dir.path().join(format!("serve-{n}.log"))).unwrap();
        std::process::Command::new(bin())
            .args(["serve", "--brokers", &brokers(), "--topic-prefix", &prefix, "--data-dir"])
            .arg(dir.path())
            .arg("--config")
            .arg(&config)
            .arg("--master-key-file")
            .arg(master_key_file(dir.path()))
            .env("SECUREFORMS_GROUP_PREFIX", prefix.trim_end_matches('.'))
            .env("SECUREFORMS_HTTP_LISTEN", "127.0.0.1:0")
            // No fixed port: a leftover process on the default 9464 would stop this one at start.
            .env("SECUREFORMS_METRICS_LISTEN", "")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let producer = producer(&prefix).await;
    const N: usize = 300;
    let forms: Vec<Event> = (0..N)
        .map(|i| form_sent("acme", &format!("conv-{}", i % 17), &format!("f-{i}"), "agent-1", "agent", "card-payment"))
        .collect();
    produce_when_ready(&producer, &forms[0]).await;
    let sends = forms[1..].iter().map(|e| producer.send(e));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }

    // Kill it once some, but not all, answers are out.
    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    if !links.read_until(WAIT, |r| r.len() >= 20).await {
        let _ = child.kill();
        let log = std::fs::read_to_string(dir.path().join("serve-0.log")).unwrap_or_default();
        panic!("the service made no progress before the kill ({} answers); its log:\n{log}", links.records.len());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = links.records.len();

    let mut child = spawn();
    let complete = links
        .read_until(WAIT, |r| {
            let distinct: BTreeSet<_> = r
                .iter()
                .filter_map(|m| Codec::get().decode(m.payload()?).ok())
                .map(|e| e.header().correlation_id.clone())
                .collect();
            distinct.len() >= N
        })
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    if !complete {
        let answered: BTreeSet<String> = links
            .records
            .iter()
            .filter_map(|m| Codec::get().decode(m.payload()?).ok())
            .map(|e| e.header().correlation_id.clone())
            .collect();
        let missing: Vec<String> = (0..N).map(|i| format!("f-{i}")).filter(|f| !answered.contains(f)).collect();
        let mut dead = TopicReader::new(&prefix, Topic::DeadLetters).await;
        dead.read_until(Duration::from_secs(5), |_| false).await;
        let logs: String = (0..2)
            .map(|n| {
                let log = std::fs::read_to_string(dir.path().join(format!("serve-{n}.log"))).unwrap_or_default();
                format!("--- serve-{n}.log\n{log}")
            })
            .collect();
        panic!(
            "every form answered after the restart (had {at_kill} at the kill, {} now); missing {missing:?}; {} dead letters; logs:\n{logs}",
            links.records.len(),
            dead.records.len()
        );
    }

    let mut payloads: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for m in &links.records {
        let ev = Codec::get().decode(m.payload().unwrap()).unwrap();
        assert_eq!(ev.kind(), EventKind::FormIssued);
        payloads.entry(ev.header().correlation_id.clone()).or_default().insert(m.payload().unwrap().to_vec());
    }
    assert_eq!(payloads.len(), N, "no form lost");
    for (form, p) in &payloads {
        assert_eq!(p.len(), 1, "{form} was answered with {} different events", p.len());
    }
}

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_creates_what_is_missing_is_idempotent_and_reports_drift() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use secureforms::topics::TopicAction;
    let prefix = unique_prefix("topics");
    let k = kafka(&prefix);
    // Someone created chat-events by hand with the wrong partition count.
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = k.client_config().create().unwrap();
    let wrong_name = format!("{prefix}chat-events");
    let wrong = NewTopic::new(&wrong_name, 2, TopicReplication::Fixed(1)).set("cleanup.policy", "delete");
    admin.create_topics(&[wrong], &AdminOptions::new()).await.unwrap();
    // Apache Kafka answers CreateTopics before every metadata view has the topic: wait until ours does.
    let deadline = std::time::Instant::now() + WAIT;
    let reader = secureforms::kafka::admin::Admin::new(&k).unwrap();
    while !reader.topic_partitions().await.unwrap().contains_key(&wrong_name) {
        assert!(std::time::Instant::now() < deadline, "{wrong_name} never appeared in the metadata");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let first = secureforms::service::apply_topics(&k, 1).await.unwrap();
    let created = first.iter().filter(|a| matches!(a, TopicAction::Create { .. })).count();
    assert_eq!(created, Topic::ALL.len() - 1);
    let second = secureforms::service::apply_topics(&k, 1).await.unwrap();
    assert_eq!(second.iter().filter(|a| matches!(a, TopicAction::Create { .. })).count(), 0, "idempotent");
    let drift: Vec<_> = second
        .iter()
        .filter_map(|a| if let TopicAction::Drift { name, differences } = a { Some((name, differences)) } else { None })
        .collect();
    assert_eq!(drift.len(), 1, "{second:?}");
    assert!(drift[0].1.iter().any(|d| d.contains("partitions: declared 6, broker has 2")), "{drift:?}");
    let up_to_date = second.iter().filter(|a| matches!(a, TopicAction::UpToDate { .. })).count();
    assert_eq!(up_to_date, Topic::ALL.len() - 1, "created topics carry their declared configs: {second:?}");

    // chat-events with 2 partitions and the other conversation topics with 6 would put one
    // conversation on different partition numbers: the CLI says so and fails, and a node refuses.
    let o = std::process::Command::new(bin())
        .args(["topics", "apply", "--brokers", &brokers(), "--topic-prefix", &prefix])
        .args(["--broker-kind", broker_kind().name()])
        .env_remove("SECUREFORMS_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("different partition counts") && err.contains(&format!("{prefix}chat-events 2")), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let refused = secureforms::service::Service::start(
        settings(&prefix, dir.path()),
        brokers(),
        secureforms::kafka::runtime::system_clock(),
    )
    .await
    .err()
    .expect("a node refuses to start on topics that are not co-partitioned");
    assert!(refused.to_string().contains("different partition counts"), "{refused}");
}
