//! Dead letters re-driven after a fix are applied once: a node running with the wrong master key
//! dead-letters a data key it cannot unwrap; once the key is fixed, `secureforms dlq redrive` sends
//! the record back, the node applies it, and a second re-drive sends nothing.

mod common;

use std::time::Duration;

use common::*;
use secureforms::crypto::{KeyMaterial, MasterKey, data_key_id, period_of};
use secureforms::events::{DataKeyCreated, Event, EventHeader, EventKind};
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;
use secureforms::topics::Topic;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_re_driven_after_a_config_fix_is_applied_exactly_once() {
    let prefix = unique_prefix("redrive");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path()); // writes a (wrong) master key into the data dir
    let right = MasterKey::generate_base64();
    let right_key = MasterKey::from_base64(&right).unwrap();
    secureforms::service::apply_topics(&kafka(&prefix), 1).await.unwrap();
    let id = data_key_id("acme", &period_of(now_ms()), 1);
    let created = Event::DataKeyCreated(DataKeyCreated {
        header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), now_ms(), "acme", "", &id),
        wrapped_key: right_key.wrap(&id, &KeyMaterial::random()).unwrap(),
        key_id: id.clone(),
        period: period_of(now_ms()),
        generation: 1,
        master_key_id: right_key.id().into(),
    });
    // Written by a node that has the right master key (so it carries that key's MAC).
    let signer = std::sync::Arc::new(secureforms::crypto::mac::EventSigner::new(
        &secureforms::crypto::IntegrityKey::from_master(&right_key),
    ));
    producer(&prefix).await.with_signer(signer).send(&created).await.unwrap();

    let mut service = Service::start(settings.clone(), brokers(), system_clock()).await.unwrap();
    let mut dlq = TopicReader::new(&prefix, Topic::DeadLetters).await;
    assert!(dlq.read_until(WAIT, |r| !r.is_empty()).await, "the unwrappable key is dead-lettered");
    let Event::DeadLetter(letter) = dlq.events().remove(0) else { panic!("not a dead letter") };
    // This node cannot check the other key's MAC before anything else.
    assert_eq!(letter.error_kind, "unauthenticated");
    assert!(letter.source_mac.is_some(), "the dead letter keeps the MAC the record came with");
    assert!(letter.reason.contains("SECUREFORMS_MASTER_KEY"), "{}", letter.reason);
    assert!(service.ring.get(&id).is_err());
    service.stop().await;
    drop(service);

    // The fix: the right master key. The record itself was already consumed, so nothing changes yet.
    std::fs::write(master_key_file(dir.path()), right.as_bytes()).unwrap();
    let mut service = Service::start(settings.clone(), brokers(), system_clock()).await.unwrap();
    assert!(redrive(&prefix, &["--dry-run"]).contains("would re-drive 1"), "dry run sends nothing");
    let out = redrive(&prefix, &[]);
    assert!(out.contains("re-drove 1 dead letter"), "{out}");
    let deadline = std::time::Instant::now() + WAIT;
    while service.ring.get(&id).is_err() {
        assert!(std::time::Instant::now() < deadline, "the re-driven key is applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = redrive(&prefix, &[]);
    assert!(out.contains("re-drove 0 dead letter"), "each letter is re-driven once: {out}");
    let keys =
        tokio::task::block_in_place(|| secureforms::kafka::reader::read_to_end(&kafka(&prefix), Topic::Keys)).unwrap();
    assert_eq!(keys.len(), 2, "the original and its one re-drive");
    let letters =
        tokio::task::block_in_place(|| secureforms::kafka::reader::read_to_end(&kafka(&prefix), Topic::DeadLetters))
            .unwrap();
    assert_eq!(letters.len(), 1, "applied without a new failure");
    assert_eq!(service.ring.list().iter().filter(|k| k.id == id).count(), 1);
    service.stop().await;
}
