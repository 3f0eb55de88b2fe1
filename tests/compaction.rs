//! Apache Kafka only: crypto-shredding reaches the keys topic's segment files. After a key rotation
//! and a retention purge, the log cleaner drops every wrapped data key a DataKeyDestroyed
//! supersedes, checked in the raw bytes of the partition's files, while a live key stays. tansu
//! 0.6.0 does not compact (ADR 11, ADR 13): there the wrapped copy stays, wrapped by the master key.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use secureforms::domain::retention::parse_as_of;
use secureforms::events::Event;
use secureforms::kafka::BrokerKind;
use secureforms::kafka::runtime::Clock;
use secureforms::service::Service;
use secureforms::topics::Topic;

const WAIT: Duration = Duration::from_secs(60);

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_cleaner_removes_destroyed_wrapped_keys_from_the_keys_topic_files() {
    if !needs_kafka("log compaction of the keys topic") {
        return;
    }
    let prefix = unique_prefix("shred");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let first = parse_as_of("2025-01-10T12:00:00Z").unwrap();
    let now = Arc::new(AtomicI64::new(first));
    let c = now.clone();
    let clock: Clock = Arc::new(move || c.load(Ordering::SeqCst));
    let mut service = Service::start(settings.clone(), brokers(), clock).await.expect("service starts");
    service.wait_ready(WAIT).await.expect("ready");

    // January 2025: a key, a rotation to a second generation, a submission under each. March 2025:
    // a key whose period has not expired by the purge date (the live one).
    submit_card(&service, "c1", "shred-1", &luhn_pan(11)).await;
    secureforms::handlers::keys::rotate(&service.ring, &service.producer, "acme", first).await.expect("rotated");
    submit_card(&service, "c2", "shred-2", &luhn_pan(12)).await;
    now.store(parse_as_of("2025-03-10T12:00:00Z").unwrap(), Ordering::SeqCst);
    submit_card(&service, "c3", "shred-3", &luhn_pan(13)).await;

    let mut keys = TopicReader::new(&prefix, Topic::Keys).await;
    assert!(keys.read_until(WAIT, |rs| rs.len() >= 3).await, "three DataKeyCreated on the keys topic");
    let wrapped: BTreeMap<String, Vec<u8>> = keys
        .events()
        .into_iter()
        .filter_map(|e| if let Event::DataKeyCreated(k) = e { Some((k.key_id, k.wrapped_key)) } else { None })
        .collect();
    assert_eq!(wrapped.keys().cloned().collect::<Vec<_>>(), ["acme.2025-01.g1", "acme.2025-01.g2", "acme.2025-03.g1"]);

    // Segments roll within 100 ms for this test's keys topic (production: daily), so the cleaner
    // gets to the records quickly. AlterConfigs replaces the whole set: send the declared one too.
    let topic = format!("{prefix}keys");
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let mut configs = Topic::Keys.spec().configs(BrokerKind::Kafka);
    configs.insert("segment.ms".into(), "100".into());
    let alter = configs.iter().fold(AlterConfig::new(ResourceSpecifier::Topic(&topic)), |a, (k, v)| a.set(k, v));
    for r in admin.alter_configs(&[alter], &AdminOptions::new()).await.unwrap() {
        r.expect("keys topic configs altered");
    }

    // Positive control: the scan finds the wrapped keys while they are on the topic.
    let partition_dir = broker_dir().join(format!("{topic}-0"));
    let files = |dir: &std::path::Path| -> Vec<u8> {
        all_files(dir).iter().flat_map(|f| std::fs::read(f).unwrap_or_default()).collect()
    };
    let before = files(&partition_dir);
    for (id, w) in &wrapped {
        assert!(contains(&before, w), "wrapped key {id} not found in {} before the purge", partition_dir.display());
    }

    // 15 March 2026: January 2025 is past 13 months whole; March 2025 is not.
    let as_of = parse_as_of("2026-03-15").unwrap();
    now.store(as_of, Ordering::SeqCst);
    let report = secureforms::ops::purge::purge(&service, as_of, false).await.expect("purge");
    assert_eq!(report.sites[0].keys_destroyed, vec!["acme.2025-01.g1".to_string(), "acme.2025-01.g2".to_string()]);

    // The cleaner only cleans rolled segments: keep appending (a tombstone for a key nobody uses,
    // which consumers skip) so the DataKeyDestroyed records leave the active segment.
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let partition_dir = broker_dir().join(format!("{topic}-0"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rolls = 0;
    loop {
        let bytes: Vec<u8> =
            all_files(&partition_dir).iter().flat_map(|f| std::fs::read(f).unwrap_or_default()).collect();
        let destroyed_gone =
            !contains(&bytes, &wrapped["acme.2025-01.g1"]) && !contains(&bytes, &wrapped["acme.2025-01.g2"]);
        if destroyed_gone {
            assert!(contains(&bytes, &wrapped["acme.2025-03.g1"]), "the live key must stay on the topic");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destroyed wrapped keys still in {} after {rolls} segment rolls; see the broker log for the cleaner",
            partition_dir.display()
        );
        let roll = format!("roll-{rolls}");
        producer
            .send(FutureRecord::<str, [u8]>::to(&topic).key(roll.as_str()), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("tombstone produced");
        rolls += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    service.stop().await;
}
