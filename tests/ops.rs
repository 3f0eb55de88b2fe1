//! Operations end to end against the real broker: the retention purge with an injected clock across
//! 14 months (only the expired submissions go, their period's key is destroyed, a replay of every
//! topic brings nothing back), replay rebuilding identical read models and vault, erasure by
//! conversation and by visitor reference, and /metrics + /readyz during a run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::Message;
use secureforms::config::Settings;
use secureforms::domain::retention::{add_months, parse_as_of};
use secureforms::events::{Codec, Event, FormSent};
use secureforms::kafka::runtime::{Clock, system_clock};
use secureforms::ops::erase::EraseTarget;
use secureforms::service::{ALL_HANDLERS, Service, store_dir};
use secureforms::store::Store;
use secureforms::topics::Topic;
use secureforms::vault::detokenize::{DetokenizeError, Refusal};
use secureforms::vault::trees;

const WAIT: Duration = Duration::from_secs(60);

fn clock_at(ms: i64) -> (Arc<AtomicI64>, Clock) {
    let now = Arc::new(AtomicI64::new(ms));
    let c = now.clone();
    (now, Arc::new(move || c.load(Ordering::SeqCst)))
}

async fn start(settings: &Settings, clock: Clock) -> Service {
    let service = Service::start(settings.clone(), brokers(), clock).await.expect("service starts");
    service.wait_ready(WAIT).await.expect("ready");
    service
}

async fn wait_vault_len(service: &Service, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let len = service.vault.tree(trees::SUBMISSIONS).unwrap().len();
        if len == n {
            return;
        }
        assert!(Instant::now() < deadline, "vault holds {len}, expected {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn in_vault(service: &Service, id: &uuid::Uuid) -> bool {
    service.vault.tree(trees::SUBMISSIONS).unwrap().contains_key(id.as_bytes()).unwrap()
}

/// Every tree of every handler's store, except bookkeeping that is not a read model.
fn dump_all(settings: &Settings) -> Dump {
    ALL_HANDLERS
        .iter()
        .map(|h| {
            let store = Store::open(&store_dir(settings, h)).unwrap();
            let trees = store
                .dump()
                .unwrap()
                .into_iter()
                .filter(|(name, _)| name != "sys.templates_published" && name != "sys.outbox")
                .collect();
            (h.to_string(), trees)
        })
        .collect()
}

type Dump = BTreeMap<String, BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>>;

/// Which trees differ, readably (the dumps themselves are too big to print).
fn differences(before: &Dump, after: &Dump) -> Vec<String> {
    let mut out = Vec::new();
    for (h, trees) in before.iter().chain(after.iter()) {
        let (b, a) = (before.get(h), after.get(h));
        for name in trees.keys() {
            let (rb, ra) = (b.and_then(|t| t.get(name)), a.and_then(|t| t.get(name)));
            if rb != ra {
                let rows = |r: Option<&Vec<(Vec<u8>, Vec<u8>)>>| r.map(|r| r.len()).unwrap_or(0);
                let first = rb.zip(ra).and_then(|(x, y)| {
                    x.iter().zip(y.iter()).find(|(p, q)| p != q).map(|(p, q)| {
                        (
                            String::from_utf8_lossy(&p.0).to_string(),
                            String::from_utf8_lossy(&q.0).to_string(),
                            String::from_utf8_lossy(&p.1).to_string(),
                            String::from_utf8_lossy(&q.1).to_string(),
                        )
                    })
                });
                let line =
                    format!("{h}/{name}: {} rows before, {} after; first difference {first:?}", rows(rb), rows(ra));
                if !out.contains(&line) {
                    out.push(line);
                }
            }
        }
    }
    out
}

fn file_bytes(dir: &Path) -> Vec<u8> {
    all_files(dir).iter().flat_map(|f| std::fs::read(f).unwrap_or_default()).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_across_fourteen_months_removes_only_the_expired_destroys_their_key_and_replay_brings_nothing_back() {
    let log = logs();
    let prefix = unique_prefix("purge");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    assert_eq!(settings.sites["acme"].retention_months, 13);
    let first = parse_as_of("2025-01-10T12:00:00Z").unwrap();
    let (now, clock) = clock_at(first);
    let mut service = start(&settings, clock.clone()).await;

    // Two submissions on the 10th of each month, January 2025 to February 2026.
    let mut made: Vec<(i64, uuid::Uuid, String, String)> = Vec::new();
    for month in 0..14 {
        let at = add_months(first, month);
        now.store(at, Ordering::SeqCst);
        for i in 0..2 {
            let (form, pan) = (format!("purge-form-m{month}-{i}"), luhn_pan(1000 + month as u64 * 10 + i));
            let id = submit_card(&service, &format!("conv-{month}-{i}"), &form, &pan).await;
            made.push((at, id, form, pan));
        }
    }
    wait_vault_len(&service, 28).await;

    // The last day: 15 March 2026. January and February 2025 submissions are past 13 months; the
    // January key's whole period is (2025-02-01 + 13 months = 2026-03-01), February's is not yet.
    let as_of = parse_as_of("2026-03-15").unwrap();
    now.store(as_of, Ordering::SeqCst);
    let report = secureforms::ops::purge::purge(&service, as_of, false).await.expect("purge");
    assert_eq!(report.sites.len(), 1, "{report:?}");
    assert_eq!(report.sites[0].submissions_purged, 4);
    assert_eq!(report.sites[0].keys_destroyed, vec!["acme.2025-01.g1".to_string()]);
    let expired: Vec<&(i64, uuid::Uuid, String, String)> =
        made.iter().filter(|(at, ..)| add_months(*at, 13) <= as_of).collect();
    assert_eq!(expired.len(), 4);
    for (_, id, ..) in &expired {
        assert!(!in_vault(&service, id), "expired {id} still in the vault");
        let refused = service.detokenizer.open_for_history("acme", *id).unwrap_err();
        assert!(matches!(refused, DetokenizeError::Refused(Refusal::Purged)), "{refused:?}");
    }
    wait_vault_len(&service, 24).await;
    let survivor = made.iter().find(|(at, ..)| add_months(*at, 13) > as_of).unwrap();
    let opened = service.detokenizer.open_for_history("acme", survivor.1).expect("a survivor still opens");
    assert_eq!(opened["pan"].expose(), survivor.3);
    let listed = service.ring.list();
    assert!(listed.iter().any(|k| k.id == "acme.2025-01.g1" && k.state == "destroyed"));
    assert!(
        listed.iter().any(|k| k.id == "acme.2025-02.g1" && k.state == "active"),
        "February's key lives until its period expires"
    );
    assert_eq!(service.metrics.total("secureforms_submissions_purged_total", &[("reason", "retention")]), 4.0);

    // The receipts and the destruction are events: one receipt per conversation, keyed by it (so
    // the node that owns the conversation applies it), together naming exactly the purged.
    let mut r = TopicReader::new(&prefix, Topic::Submissions).await;
    let purged_count = |rs: &[rdkafka::message::OwnedMessage]| -> i32 {
        rs.iter()
            .filter_map(|m| match Codec::get().decode(m.payload().unwrap()) {
                Ok(Event::SubmissionPurged(p)) => Some(p.count),
                _ => None,
            })
            .sum()
    };
    assert!(r.read_until(WAIT, |rs| purged_count(rs) >= 4).await);
    let receipts: Vec<_> = r
        .events()
        .into_iter()
        .filter_map(|e| if let Event::SubmissionPurged(p) = e { Some(p) } else { None })
        .collect();
    assert_eq!(receipts.len(), 4, "the four expired submissions are in four conversations");
    for p in &receipts {
        assert_eq!((p.count, p.reason.as_str(), p.as_of), (1, "retention", as_of));
        let (_, id, ..) = expired.iter().find(|(_, id, ..)| id.to_string() == p.submission_ids[0]).expect("expired");
        let conversation = made.iter().position(|(_, m, ..)| m == id).map(|i| format!("conv-{}-{}", i / 2, i % 2));
        assert_eq!(Some(p.header.conversation_id.clone()), conversation, "keyed by the submission's conversation");
    }
    let named: Vec<String> = receipts.iter().flat_map(|p| p.destroyed_key_ids.clone()).collect();
    assert_eq!(named, vec!["acme.2025-01.g1".to_string()], "the destroyed key is named once, on the last receipt");
    let purged_ids: BTreeSet<String> = expired.iter().map(|(_, id, ..)| id.to_string()).collect();
    assert_eq!(receipts.iter().flat_map(|p| p.submission_ids.clone()).collect::<BTreeSet<_>>(), purged_ids);
    let ciphertexts: Vec<Vec<u8>> = r
        .events()
        .into_iter()
        .filter_map(|e| if let Event::FormSubmitted(s) = e { Some(s) } else { None })
        .filter(|s| purged_ids.contains(&s.submission_id))
        .flat_map(|s| s.answers.into_iter().map(|a| a.ciphertext))
        .collect();
    assert!(!ciphertexts.is_empty());

    // Purging again as of the same day finds nothing more.
    let again = secureforms::ops::purge::purge(&service, as_of, false).await.unwrap();
    assert!(again.sites.is_empty(), "{again:?}");
    service.stop().await;
    drop(service);
    let before = dump_all(&settings);

    // Replay every topic from the beginning into wiped stores.
    let summary = secureforms::ops::replay::replay(&settings, &brokers(), clock.clone(), ALL_HANDLERS.to_vec(), false)
        .await
        .expect("replay");
    assert!(summary.skipped_as_purged >= 4, "{summary:?}");
    assert_eq!(summary.dead_lettered, 0);
    assert!(summary.read > 28 && summary.applied > 0, "{summary:?}");
    let after = dump_all(&settings);
    assert_eq!(differences(&before, &after), Vec::<String>::new(), "replay rebuilt different read models or vault");

    // Scanning: none of the purged records came back into the vault's files.
    let vault_bytes = file_bytes(&store_dir(&settings, "tokenizer"));
    for (_, _, form, pan) in &expired {
        assert!(!contains(&vault_bytes, form.as_bytes()), "purged form {form} is back in the vault files");
        assert!(!contains(&vault_bytes, pan.as_bytes()));
    }
    for ct in &ciphertexts {
        let json_list = ct[..16].iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
        assert!(
            !contains(&vault_bytes, &ct[..16]) && !contains(&vault_bytes, json_list.as_bytes()),
            "purged ciphertext is back in the vault files"
        );
    }

    // Retrieving: still purged after the rebuild.
    let service = start(&settings, clock.clone()).await;
    for (_, id, ..) in &expired {
        let refused = service.detokenizer.open_for_history("acme", *id).unwrap_err();
        assert!(matches!(refused, DetokenizeError::Refused(Refusal::Purged)), "{refused:?}");
    }
    assert_eq!(service.vault.tree(trees::SUBMISSIONS).unwrap().len(), 24);
    let mut service = service;
    service.stop().await;

    // Purging, replaying and refusing logged ids and counts only: no card number in any encoding.
    let logged = log.lock().unwrap().clone();
    assert!(contains(&logged, b"data key destroyed"), "the TRACE capture is live");
    for (_, _, _, pan) in &made {
        assert_eq!(hits(&logged, &forms_of(pan)), 0, "a card number reached the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_resumes_instead_of_starting_over_and_a_running_node_is_refused() {
    let prefix = unique_prefix("resume");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let mut service = start(&settings, system_clock()).await;
    for i in 0..6 {
        submit_card(&service, &format!("conv-{i}"), &format!("form-{i}"), &luhn_pan(i)).await;
    }
    wait_vault_len(&service, 6).await;
    // The node holds its stores: replay says to stop it.
    let err = secureforms::ops::replay::replay(&settings, &brokers(), system_clock(), vec!["visibility"], false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Stop it first"), "{err}");
    service.stop().await;
    drop(service);
    let before = dump_all(&settings);

    // A replay left a marker and got half way: running it again continues (no wipe) and finishes.
    let marker = dir.path().join("state").join("replay-in-progress.json");
    std::fs::write(&marker, r#"{"handlers":["tokenizer"]}"#).unwrap();
    let resumed = secureforms::ops::replay::replay(&settings, &brokers(), system_clock(), vec!["tokenizer"], false)
        .await
        .unwrap();
    assert!(resumed.resumed);
    assert_eq!(resumed.read, 0, "the store was complete: nothing to re-read");
    assert!(!marker.exists());
    let fresh = secureforms::ops::replay::replay(&settings, &brokers(), system_clock(), vec!["tokenizer"], false)
        .await
        .unwrap();
    assert!(!fresh.resumed);
    assert!(fresh.read >= 6, "{fresh:?}");
    assert_eq!(differences(&before, &dump_all(&settings)), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_by_conversation_and_by_visitor_reference_is_immediate_and_survives_a_rebuild() {
    let prefix = unique_prefix("erase");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let mut service = start(&settings, system_clock()).await;
    let producer = producer(&prefix).await;
    for (conv, visitor) in [("conv-a", "crm-1"), ("conv-b", "crm-1"), ("conv-c", "crm-2")] {
        let Event::FormSent(mut sent) =
            form_sent("acme", conv, &format!("f-{conv}"), "agent-1", "agent", "card-payment")
        else {
            unreachable!()
        };
        sent.visitor_ref = Some(visitor.into());
        producer.send(&Event::FormSent(FormSent { ..sent })).await.unwrap();
    }
    let a1 = submit_card(&service, "conv-a", "f-a1", &luhn_pan(1)).await;
    let a2 = submit_card(&service, "conv-a", "f-a2", &luhn_pan(2)).await;
    let b = submit_card(&service, "conv-b", "f-b", &luhn_pan(3)).await;
    let c = submit_card(&service, "conv-c", "f-c", &luhn_pan(4)).await;
    wait_vault_len(&service, 4).await;

    let report = secureforms::ops::erase::erase(
        &service,
        &EraseTarget::Conversation { site: None, conversation: "conv-a".into() },
    )
    .await
    .unwrap();
    assert_eq!(report.conversations.len(), 1);
    assert_eq!(report.conversations[0].submissions_erased, 2);
    assert!(!in_vault(&service, &a1) && !in_vault(&service, &a2), "erased at once");
    assert!(in_vault(&service, &b) && in_vault(&service, &c));

    // By visitor reference: the visibility projection knows crm-1's conversations (a and b).
    let deadline = Instant::now() + WAIT;
    while service.visibility.tree("vis.visitor_refs").unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "visitor refs not projected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = secureforms::ops::erase::erase(
        &service,
        &EraseTarget::Visitor { site: "acme".into(), visitor_ref: "crm-1".into() },
    )
    .await
    .unwrap();
    let convs: BTreeSet<&str> = report.conversations.iter().map(|c| c.conversation_id.as_str()).collect();
    assert_eq!(convs, ["conv-a", "conv-b"].into());
    assert!(!in_vault(&service, &b) && in_vault(&service, &c));
    for id in [a1, a2, b] {
        assert!(matches!(
            service.detokenizer.open_for_history("acme", id),
            Err(DetokenizeError::Refused(Refusal::Purged))
        ));
    }
    let unknown = secureforms::ops::erase::erase(
        &service,
        &EraseTarget::Visitor { site: "acme".into(), visitor_ref: "nobody".into() },
    )
    .await
    .unwrap_err();
    assert!(unknown.to_string().contains("erase by --conversation"), "{unknown}");

    // Receipts are keyed by conversation, after its submissions.
    let mut r = TopicReader::new(&prefix, Topic::Submissions).await;
    assert!(
        r.read_until(WAIT, |rs| rs
            .iter()
            .filter(|m| matches!(Codec::get().decode(m.payload().unwrap()), Ok(Event::SubmissionPurged(_))))
            .count()
            >= 3)
            .await
    );
    for m in &r.records {
        if let Ok(Event::SubmissionPurged(p)) = Codec::get().decode(m.payload().unwrap()) {
            assert_eq!(p.reason, "erasure");
            assert_eq!(m.key().unwrap(), p.header.conversation_id.as_bytes());
        }
    }
    service.stop().await;
    drop(service);

    // Wipe the vault; a node rebuilding it from the topics is ready without the erased submissions.
    std::fs::remove_dir_all(store_dir(&settings, "tokenizer")).unwrap();
    let mut service = start(&settings, system_clock()).await;
    assert_eq!(service.vault.tree(trees::SUBMISSIONS).unwrap().len(), 1);
    assert!(in_vault(&service, &c));
    service.stop().await;
}

async fn scrape(client: &reqwest::Client, addr: std::net::SocketAddr) -> String {
    let r = client.get(format!("http://{addr}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move_during_a_run_and_readyz_says_ready() {
    use secureforms::metrics::parse_total;
    let prefix = unique_prefix("metrics");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&prefix, dir.path());
    settings.http_listen = Some("127.0.0.1:0".into());
    settings.metrics_listen = Some("127.0.0.1:0".into());
    let mut service = start(&settings, system_clock()).await;
    let (ops, web) = (service.metrics_addr.unwrap(), service.http_addr.unwrap());
    let client = reqwest::Client::new();
    for addr in [ops, web] {
        let r = client.get(format!("http://{addr}/readyz")).send().await.unwrap();
        // One node owns every conversation partition.
        let owns: Vec<String> = (0..6).map(|p| p.to_string()).collect();
        assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, format!("ready\nowns {}\n", owns.join(","))));
    }
    assert_eq!(
        client.get(format!("http://{web}/metrics")).send().await.unwrap().status(),
        404,
        "metrics stay off the public gateway"
    );
    let before = scrape(&client, ops).await;

    let producer = producer(&prefix).await;
    producer.send(&form_sent("acme", "conv-m", "f-m", "agent-1", "agent", "card-payment")).await.unwrap();
    producer.send_raw(Topic::ChatEvents, b"conv-bad", b"not avro").await.unwrap();
    let id = submit_card(&service, "conv-m", "f-m", &luhn_pan(9)).await;
    wait_vault_len(&service, 1).await;
    let denied = client
        .post(format!("http://{web}/api/v1/submissions/{id}/retrieve"))
        .json(&serde_json::json!({"key": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);

    let total = |text: &str, family: &str, filter: &[(&str, &str)]| parse_total(text, family, filter);
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let after = scrape(&client, ops).await;
        let moved = total(&after, "secureforms_dead_letters_total", &[("handler", "issuer")]) >= 1.0
            && total(&after, "secureforms_events_consumed_total", &[("handler", "tokenizer")]) >= 1.0;
        if moved {
            break after;
        }
        assert!(Instant::now() < deadline, "counters did not move:\n{after}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let chat = format!("{prefix}chat-events");
    assert!(total(&after, "secureforms_events_consumed_total", &[("handler", "issuer"), ("topic", &chat)]) >= 2.0);
    assert!(
        total(&after, "secureforms_events_consumed_total", &[])
            > total(&before, "secureforms_events_consumed_total", &[])
    );
    assert!(total(&after, "secureforms_events_produced_total", &[("topic", &format!("{prefix}submissions"))]) >= 1.0);
    assert!(total(&after, "secureforms_events_produced_total", &[("topic", &format!("{prefix}keys"))]) >= 1.0);
    assert!(total(&after, "secureforms_retrievals_total", &[("outcome", "denied")]) >= 1.0);
    // The refused retrieval's audit record went through the journal.
    assert!(total(&after, "secureforms_audit_journal_write_seconds_count", &[]) >= 1.0);
    assert!(
        total(
            &after,
            "secureforms_http_request_duration_seconds_count",
            &[("route", "/api/v1/submissions/{id}/retrieve"), ("status", "401")]
        ) >= 1.0
    );
    assert!(total(&after, "secureforms_http_request_duration_seconds_count", &[("route", "/readyz")]) >= 1.0);
    assert_eq!(total(&after, "secureforms_ready", &[]), 1.0);
    // Lag is reported per handler, topic and partition once the node is ready (every 5 s).
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(&client, ops).await;
        if text.lines().any(|l| {
            l.starts_with("secureforms_consumer_lag{")
                && l.contains("partition=\"5\"")
                && l.contains("handler=\"tokenizer\"")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no consumer_lag per partition:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_worker_purges_on_its_own_once_the_clock_passes_retention() {
    let prefix = unique_prefix("worker");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&prefix, dir.path());
    settings.purge_interval_secs = 1;
    let start_at = parse_as_of("2025-03-05T09:00:00Z").unwrap();
    let (now, clock) = clock_at(start_at);
    let mut service = start(&settings, clock).await;
    let id = submit_card(&service, "conv-w", "form-w", &luhn_pan(77)).await;
    wait_vault_len(&service, 1).await;
    // A purge dated in the future would shred keys in use: refused (a dry run may look ahead).
    let refused = secureforms::ops::purge::purge(&service, add_months(start_at, 24), false).await.unwrap_err();
    assert!(refused.to_string().contains("in the future"), "{refused}");
    let preview = secureforms::ops::purge::purge(&service, add_months(start_at, 24), true).await.unwrap();
    assert_eq!((preview.submissions(), preview.keys()), (1, 1));
    assert!(in_vault(&service, &id), "a dry run removes nothing");
    // A month later nothing has expired: the worker runs (twice, to be sure one ran after the move)
    // and leaves it.
    now.store(add_months(start_at, 1), Ordering::SeqCst);
    let runs = service.metrics.purge_runs.get();
    let deadline = Instant::now() + WAIT;
    while service.metrics.purge_runs.get() < runs + 2 {
        assert!(Instant::now() < deadline, "the purge worker does not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(in_vault(&service, &id));
    // Fourteen months later the worker removes it and destroys March 2025's key by itself.
    now.store(add_months(start_at, 14), Ordering::SeqCst);
    wait_vault_len(&service, 0).await;
    let deadline = Instant::now() + WAIT;
    while !service.ring.list().iter().any(|k| k.id == "acme.2025-03.g1" && k.state == "destroyed") {
        assert!(Instant::now() < deadline, "the worker did not destroy the expired key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(service.detokenizer.open_for_history("acme", id), Err(DetokenizeError::Refused(Refusal::Purged))));
    service.stop().await;
}

/// The scanner the canary checks rely on finds what it must (positive control).
#[test]
fn the_canary_scanner_finds_each_encoding_and_respects_digit_boundaries() {
    use base64::Engine;
    let pan = luhn_pan(42);
    let forms = forms_of(&pan);
    for haystack in [
        format!("log: pan={pan}, done"),
        format!("{{\"v\":\"{}\"}}", hex::encode(&pan)),
        format!("b64 {}", base64::engine::general_purpose::STANDARD.encode(format!("xx{pan}yy"))),
    ] {
        assert!(hits(haystack.as_bytes(), &forms) > 0, "not found in {haystack}");
    }
    assert_eq!(find(format!("9{pan}").as_bytes(), pan.as_bytes()), None, "inside a longer number is not the value");
    assert_eq!(find(format!("9{pan} {pan}").as_bytes(), pan.as_bytes()), Some(18));
    // A short all-digit canary (a CVV) inside pointers, UUIDs, timestamps and hex is chance, not a
    // leak; standing alone in any encoding of a value it is found.
    let cvv = "8590";
    for chance in ["ptr 0x7fb8ec0a8590 x", "id 3f2a-8590-4c1d", "at 19:41:33.8590Z", "v1.8590", "k_8590"] {
        assert_eq!(find(chance.as_bytes(), cvv.as_bytes()), None, "{chance}");
    }
    for leak in ["cvv=8590&", "{\"cvv\":\"8590\"}", "cvv: 8590 ", "\u{8}8590\u{2}"] {
        assert!(find(leak.as_bytes(), cvv.as_bytes()).is_some(), "{leak:?}");
    }
    // The same for its byte-list form (Debug of a byte slice): inside a hex string's bytes it is
    // chance; as the bytes of a value of its own it is found.
    let list = forms_of(cvv).into_iter().find(|f| f.starts_with(b"56, 53")).expect("byte-list form");
    let printed = |s: &str| s.bytes().map(|b| b.to_string()).collect::<Vec<_>>().join(", ");
    for chance in ["\"ab8590ff\"", "x8590", "8590e"] {
        assert_eq!(find(printed(chance).as_bytes(), &list), None, "{chance}");
    }
    for leak in ["\"8590\"", "=8590&", "[8590]"] {
        assert!(find(printed(leak).as_bytes(), &list).is_some(), "{leak}");
    }
    assert!(find(format!("[{}]", printed("8590")).as_bytes(), &list).is_some(), "a whole list");
    assert_eq!(hits(b"nothing to see", &forms), 0);
}

/// Master-key rotation (ADR 19), the way an operator does it: pin the integrity key, run on a new
/// master key with the old one as previous, `keys rewrap`, then retire the old one. A node rebuilt
/// from the topics with the new master key alone reads every live submission and verifies every
/// event written before the rotation, while a data key destroyed before it stays gone even though
/// its wrapped record is still on the topic (tansu keeps it; so would a backup): nothing the system
/// keeps can be opened without the retired master key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_master_key_rotation_a_destroyed_data_key_stays_gone_and_live_data_stays_readable() {
    use secureforms::crypto::{IntegrityKey, KeyError, KeyMaterial, KeyRing, MasterKey};
    use secureforms::events::{DataKeyCreated, DataKeyDestroyed, EventHeader, EventKind};

    let prefix = unique_prefix("rotation");
    let dir = tempfile::tempdir().unwrap();
    let old_settings = settings(&prefix, dir.path());
    let old_file = master_key_file(dir.path());
    let old_master = MasterKey::from_base64(&std::fs::read_to_string(&old_file).unwrap()).unwrap();
    let pan = luhn_pan(7_301);
    let mut service = start(&old_settings, system_clock()).await;
    let id = submit_card(&service, "conv-rot", "form-rot", &pan).await;
    // An old month's key, then its destruction, as retention writes them.
    let gone_id = "acme.2024-01.g1";
    let gone_created = DataKeyCreated {
        header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), now_ms(), "acme", "", gone_id),
        key_id: gone_id.into(),
        period: "2024-01".into(),
        generation: 1,
        master_key_id: old_master.id().into(),
        wrapped_key: old_master.wrap(gone_id, &KeyMaterial::random()).unwrap(),
    };
    let bus = signed_producer(&prefix, dir.path()).await;
    bus.send(&Event::DataKeyCreated(gone_created.clone())).await.unwrap();
    bus.send(&Event::DataKeyDestroyed(DataKeyDestroyed {
        header: EventHeader::new(EventKind::DataKeyDestroyed, uuid::Uuid::new_v4(), now_ms(), "acme", "", gone_id),
        key_id: gone_id.into(),
        reason: "retention".into(),
    }))
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while !matches!(service.ring.get(gone_id), Err(KeyError::Destroyed(_))) {
        assert!(Instant::now() < deadline, "the old key was never destroyed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await;
    drop(service);

    // 1. Pin the integrity key, exported with the master key in use.
    let cli = |config: &Path, args: &[&str]| {
        let o = std::process::Command::new(bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("SECUREFORMS_CONFIG")
            .env_remove("SECUREFORMS_BROKERS")
            .env_remove("SECUREFORMS_MASTER_KEY")
            .output()
            .expect("run secureforms");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "secureforms {args:?}: {out}{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let config = |name: &str, master: &Path, previous: &[&Path], integrity: Option<&Path>| {
        let mut text = format!(
            "brokers = {:?}\ntopic_prefix = {prefix:?}\ngroup_prefix = {:?}\ndata_dir = {:?}\nmaster_key_file = {:?}\nprevious_master_key_files = {:?}\n",
            brokers(),
            prefix.trim_end_matches('.'),
            dir.path().join("cli"),
            master,
            previous,
        );
        if let Some(f) = integrity {
            text.push_str(&format!("integrity_key_file = {f:?}\n"));
        }
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let exported = cli(&config("old.toml", &old_file, &[], None), &["keys", "export-integrity"]);
    let integrity_file = dir.path().join("integrity.key");
    write_private(&integrity_file, exported.trim().as_bytes());
    assert_eq!(
        IntegrityKey::load(&integrity_file).unwrap().to_base64().as_str(),
        IntegrityKey::from_master(&old_master).to_base64().as_str()
    );

    // 2. The new master key, the old one as previous: the node reads everything as before.
    let new_file = dir.path().join("master-new.key");
    write_private(&new_file, MasterKey::generate_base64().as_bytes());
    let new_master = MasterKey::from_base64(&std::fs::read_to_string(&new_file).unwrap()).unwrap();
    let mut rotating = old_settings.clone();
    rotating.master_key_file = Some(new_file.clone());
    rotating.previous_master_key_files = vec![old_file.clone()];
    rotating.integrity_key_file = Some(integrity_file.clone());
    let mut service = start(&rotating, system_clock()).await;
    assert_eq!(service.detokenizer.open_for_history("acme", id).unwrap()["pan"].expose(), pan);

    // 3. Re-wrap: the live key moves to the new master key, on the topic and in the node's store.
    let both = config("rotating.toml", &new_file, &[&old_file], Some(&integrity_file));
    let out = cli(&both, &["keys", "rewrap"]);
    assert!(out.contains("1 data key(s) re-wrapped"), "{out}");
    let live_id = service.ring.list().into_iter().find(|k| k.state == "active").unwrap().id;
    let deadline = Instant::now() + WAIT;
    while service.ring.get(&live_id).unwrap().master_key_id != new_master.id() {
        assert!(Instant::now() < deadline, "the node never took the re-wrapped key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed: serde_json::Value = serde_json::from_str(&cli(&both, &["keys", "list", "--json"])).unwrap();
    let row = |k: &str| listed.as_array().unwrap().iter().find(|r| r["id"] == k).cloned().unwrap();
    assert_eq!(row(&live_id)["master_key_id"], new_master.id());
    assert_eq!(row(gone_id)["state"], "destroyed");
    service.stop().await;
    drop(service);
    let keys_store = Store::open(&store_dir(&rotating, "keys")).unwrap();
    let kept = keys_store.tree(secureforms::handlers::keys::CREATED_TREE).unwrap().get(live_id.as_bytes()).unwrap();
    let Ok(Event::DataKeyCreated(kept)) = Codec::get().decode(&kept.unwrap()) else { panic!("not a DataKeyCreated") };
    assert_eq!(kept.master_key_id, new_master.id(), "the node keeps only the newest wrapping");
    drop(keys_store);

    // 4. The old master key is retired. A node with the new one alone, rebuilt from the topics.
    std::fs::remove_file(&old_file).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let mut after = settings(&prefix, fresh.path());
    after.master_key_file = Some(new_file.clone());
    after.integrity_key_file = Some(integrity_file.clone());
    let mut service = start(&after, system_clock()).await;
    let deadline = Instant::now() + WAIT;
    while !in_vault(&service, &id) {
        assert!(Instant::now() < deadline, "the rebuilt node never applied the submission (MAC or key refused?)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + WAIT;
    let answers = loop {
        match service.detokenizer.open_for_history("acme", id) {
            Ok(a) => break a,
            Err(e) => assert!(Instant::now() < deadline, "the live data key never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(answers["pan"].expose(), pan);
    assert!(service.ring.get(gone_id).is_err());
    service.stop().await;
    drop(service);

    // Every wrapped record of the destroyed key still on the topic is useless without the old key.
    let mut keys = TopicReader::new(&prefix, Topic::Keys).await;
    assert!(
        keys.read_until(WAIT, |r| r.len() >= 4).await,
        "the keys topic holds both creations, the destruction and the re-wrap"
    );
    let copies: Vec<DataKeyCreated> = keys
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::DataKeyCreated(k) if k.key_id == gone_id => Some(k),
            _ => None,
        })
        .collect();
    if broker_kind() == secureforms::kafka::BrokerKind::Tansu {
        assert_eq!(copies, vec![gone_created.clone()], "tansu does not compact: the record is still there");
    }
    let survivor = KeyRing::new(new_master.clone());
    for k in copies.iter().chain(std::iter::once(&gone_created)) {
        assert!(matches!(survivor.created(k), Err(KeyError::UnknownMaster { .. })));
        assert!(new_master.unwrap_key(gone_id, &k.wrapped_key).is_err());
    }
}
