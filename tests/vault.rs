//! Tokenizer and vault end to end against the real broker: canaries never appear in the broker's
//! files, the vault's files or the logs; a crash at any point leaves every submission in the vault
//! exactly once with one FormReady; deleting the vault and replaying rebuilds it byte for byte;
//! swapped ciphertexts do not open; every misuse of a retrieve key is a typed refusal.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use secureforms::config::Settings;
use secureforms::events::{Codec, Event, EventKind};
use secureforms::kafka::runtime::{Clock, system_clock};
use secureforms::node::Submission;
use secureforms::service::Service;
use secureforms::topics::Topic;
use secureforms::vault::detokenize::{DetokenizeError, Refusal};
use secureforms::vault::offrecord::OffRecord;

const WAIT: Duration = Duration::from_secs(60);

async fn start(settings: Settings, clock: Clock) -> Service {
    Service::start(settings.clone(), brokers(), clock).await.expect("service starts")
}

/// Every FormReady on agent-events, by submission id, once `n` submissions have one.
async fn ready_events(prefix: &str, n: usize) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut r = TopicReader::new(prefix, Topic::AgentEvents).await;
    let distinct = |rs: &[rdkafka::message::OwnedMessage]| {
        rs.iter()
            .filter_map(|m| match Codec::get().decode(m.payload()?) {
                Ok(Event::FormReady(f)) => Some(f.submission_id),
                _ => None,
            })
            .collect::<BTreeSet<_>>()
            .len()
    };
    let ok = r.read_until(WAIT, |rs| distinct(rs) >= n).await;
    assert!(ok, "{n} submissions with FormReady expected, got {}", distinct(&r.records));
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for m in &r.records {
        if let Ok(Event::FormReady(f)) = Codec::get().decode(m.payload().unwrap()) {
            out.entry(f.submission_id).or_default().push(m.payload().unwrap().to_vec());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_appear_nowhere_but_come_back_to_the_agent() {
    let log = logs();
    let prefix = unique_prefix("canary");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&prefix, dir.path());
    // A template with every kind of sensitive answer, the CVV and a long off-the-record answer.
    let extra: secureforms::domain::template::Template = toml::from_str(
        r#"
        id = "canary"
        title = "Canary"
        [[questions]]
        id = "pan"
        label = "Card number"
        kind = "card_number"
        [[questions]]
        id = "ssn"
        label = "SSN"
        kind = "ssn"
        [[questions]]
        id = "cvv"
        label = "CVV"
        kind = "cvv"
        [[questions]]
        id = "memo"
        label = "Memorable phrase"
        kind = "secret_answer"
        off_record = true
        [[questions]]
        id = "pin"
        label = "PIN"
        kind = "pin"
        off_record = false
        "#,
    )
    .unwrap();
    settings.sites.get_mut("acme").unwrap().templates.push(extra.clone());
    let service = start(settings.clone(), system_clock()).await;

    let seed = uuid::Uuid::new_v4().as_u128() as u64;
    let pan = luhn_pan(seed);
    let ssn = format!("{:03}-{:02}-{:04}", seed % 900 + 100, seed % 89 + 10, seed % 9000 + 1000);
    // Canary digits start with 0: integers in logs (lengths, ids, counts) never print a leading zero,
    // and zero-padded fields (times, dates) sit next to ':', '-' or '.', which the scan does not
    // accept as a boundary, so only a leaked answer can match.
    let cvv = format!("0{:03}", seed % 1_000);
    let memo = format!("canary-offrecord-{}", uuid::Uuid::new_v4().simple());
    // A PIN is never stored, even where the template says it may be (PCI DSS 3.3.1.3).
    let pin = format!("0{:05}", (seed / 7) % 100_000);
    let id = service
        .submit(Submission {
            site_id: "acme",
            conversation_id: "conv-canary",
            form_id: "form-canary",
            agent_id: "agent-1",
            template: &extra,
            answers: answers(&[("pan", &pan), ("ssn", &ssn), ("cvv", &cvv), ("memo", &memo), ("pin", &pin)]),
        })
        .await
        .unwrap();

    let ready = ready_events(&prefix, 1).await;
    let Event::FormReady(r) = Codec::get().decode(&ready[&id.to_string()][0]).unwrap() else { unreachable!() };
    assert_eq!(r.off_record_field_ids, vec!["cvv", "memo", "pin"]);

    // The FormSubmitted on the topic holds neither off-the-record field, not even encrypted.
    let mut subs = TopicReader::new(&prefix, Topic::Submissions).await;
    assert!(subs.read_until(WAIT, |rs| count_of(rs, EventKind::FormSubmitted) >= 1).await);
    let submitted =
        subs.events().into_iter().find_map(|e| if let Event::FormSubmitted(s) = e { Some(s) } else { None }).unwrap();
    let sealed_fields: BTreeSet<_> = submitted.answers.iter().map(|a| a.field_id.as_str()).collect();
    assert_eq!(sealed_fields, BTreeSet::from(["pan", "ssn"]));

    // Wait until the retrieval projection has the key, then retrieve: the data is really there.
    let deadline = std::time::Instant::now() + WAIT;
    let got = loop {
        match service.detokenizer.detokenize("acme", id, &r.retrieve_key, now_ms()) {
            Ok(got) => break got,
            Err(DetokenizeError::Refused(Refusal::InvalidKey)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("retrieve failed: {e}"),
        }
    };
    assert_eq!(got.answers["pan"].expose(), pan);
    assert_eq!(got.answers["ssn"].expose(), ssn);
    match &got.off_record {
        OffRecord::Present(a) => {
            assert_eq!(a["cvv"].expose(), cvv);
            assert_eq!(a["memo"].expose(), memo);
            assert_eq!(a["pin"].expose(), pin);
        }
        OffRecord::Expired => panic!("off-the-record answers are still in memory"),
    }
    drop(got);

    let mut service = service;
    service.stop().await;
    drop(service);

    let canaries = [("pan", pan.as_str()), ("ssn", ssn.as_str()), ("memo", memo.as_str()), ("pin", pin.as_str())];
    let mut scanned = 0;
    for file in all_files(&broker_dir()).into_iter().chain(all_files(dir.path())) {
        if file.file_name().is_some_and(|n| n == "master.key") {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap_or_default();
        scanned += bytes.len();
        for (name, canary) in canaries {
            assert_eq!(hits(&bytes, &forms_of(canary)), 0, "{name} found in {}", file.display());
        }
    }
    assert!(scanned > 100_000, "scanned the broker's and the vault's files ({scanned} bytes)");
    let log = log.lock().unwrap().clone();
    assert!(log.len() > 1000, "logs were captured");
    assert!(find(&log, b" sled::").is_some(), "the libraries' log records (sled's, at trace) are captured too");
    for (name, canary) in canaries.into_iter().chain([("cvv", cvv.as_str())]) {
        for form in forms_of(canary) {
            if let Some(at) = find(&log, &form) {
                let context =
                    String::from_utf8_lossy(&log[at.saturating_sub(120)..(at + form.len() + 40).min(log.len())])
                        .to_string();
                panic!("{name} found in the logs as {:?}: ...{context}...", String::from_utf8_lossy(&form));
            }
        }
    }
}

/// Seals `n` submissions with the service and returns their ids.
async fn submit_many(service: &Service, settings: &Settings, n: usize) -> Vec<uuid::Uuid> {
    submit_many_from(service, settings, 0, n).await
}

/// Submissions for forms `form-{first}` .. (one form has one submission).
async fn submit_many_from(service: &Service, settings: &Settings, first: usize, n: usize) -> Vec<uuid::Uuid> {
    let t = template(settings, "card-payment");
    let mut ids = Vec::new();
    for i in first..first + n {
        let pan = luhn_pan(i as u64 + 1);
        let id = service
            .submit(Submission {
                site_id: "acme",
                conversation_id: &format!("conv-{}", i % 11),
                form_id: &format!("form-{i}"),
                agent_id: "agent-1",
                template: &t,
                answers: answers(&[("cardholder", "A Visitor"), ("pan", &pan), ("expiry", "12/30"), ("cvv", "123")]),
            })
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

fn vault_dump(store: &secureforms::store::Store) -> secureforms::store::TreeDump {
    store.dump().unwrap().into_iter().filter(|(name, _)| name.starts_with("vault.")).collect()
}

async fn wait_for_vault(service: &Service, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let count = service.vault.tree(secureforms::vault::trees::SUBMISSIONS).unwrap().len();
        if count >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "vault has {count} of {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_vault_and_replaying_rebuilds_it_byte_for_byte_without_new_form_ready() {
    let prefix = unique_prefix("replay");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let mut service = start(settings.clone(), system_clock()).await;
    let ids = submit_many(&service, &settings, 40).await;
    let ready_before = ready_events(&prefix, ids.len()).await;
    wait_for_vault(&service, ids.len()).await;
    let before = vault_dump(&service.vault);
    service.stop().await;
    drop(service);

    std::fs::remove_dir_all(dir.path().join("vault")).unwrap();
    let mut service = start(settings.clone(), system_clock()).await;
    wait_for_vault(&service, ids.len()).await;
    let after = vault_dump(&service.vault);
    service.stop().await;
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    assert_eq!(before, after, "byte-identical vault after replay");
    assert_eq!(before["vault.submissions"].len(), ids.len());

    // The rebuild emitted nothing the agent workspace had already seen.
    let k = kafka(&prefix);
    let agent_events =
        tokio::task::block_in_place(|| secureforms::kafka::reader::read_to_end(&k, Topic::AgentEvents)).unwrap();
    let ready_after = agent_events
        .iter()
        .filter(|m| {
            Codec::get().decode(m.payload().unwrap()).map(|e| e.kind() == EventKind::FormReady).unwrap_or(false)
        })
        .count();
    assert_eq!(ready_after, ready_before.values().map(Vec::len).sum::<usize>());
}

/// Plays the gateway without a service: publishes a data key and produces `n` sealed submissions.
async fn produce_sealed(prefix: &str, settings: &Settings, dir: &Path, n: usize) -> Vec<uuid::Uuid> {
    use secureforms::crypto::{KeyMaterial, KeyRing, MasterKey, data_key_id, period_of};
    let k = kafka(prefix);
    secureforms::service::apply_topics(&k, 1).await.unwrap();
    let ring = KeyRing::new(MasterKey::load(None, Some(&master_key_file(dir))).unwrap());
    let now = now_ms();
    let id = data_key_id("acme", &period_of(now), 1);
    let created = secureforms::events::DataKeyCreated {
        header: secureforms::events::EventHeader::new(
            EventKind::DataKeyCreated,
            uuid::Uuid::new_v4(),
            now,
            "acme",
            "",
            &id,
        ),
        wrapped_key: ring.master().wrap(&id, &KeyMaterial::random()).unwrap(),
        key_id: id.clone(),
        period: period_of(now),
        generation: 1,
        master_key_id: ring.master().id().into(),
    };
    ring.created(&created).unwrap();
    let producer = signed_producer(prefix, dir).await;
    producer.send(&Event::DataKeyCreated(created)).await.unwrap();
    let key = ring.get(&id).unwrap();
    let t = template(settings, "card-payment");
    let mut ids = Vec::new();
    let mut sends = Vec::new();
    for i in 0..n {
        let sid = uuid::Uuid::new_v4();
        let (conv, form) = (format!("conv-{}", i % 11), format!("form-{i}"));
        let ctx = secureforms::vault::seal::SubmissionContext {
            site_id: "acme",
            conversation_id: &conv,
            form_id: &form,
            agent_id: "agent-1",
            template: &t,
            submission_id: sid,
            event_id: uuid::Uuid::new_v4(),
            now_ms: now,
            node_id: "test",
        };
        let sealed = secureforms::vault::seal::seal_submission(
            &key,
            &ctx,
            answers(&[("cardholder", "A Visitor"), ("pan", &luhn_pan(i as u64)), ("cvv", "123")]),
        )
        .unwrap();
        sends.push(Event::FormSubmitted(sealed.event));
        ids.push(sid);
    }
    for r in futures::future::join_all(sends.iter().map(|e| producer.send(e))).await {
        r.unwrap();
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_killed_at_any_point_keeps_every_submission_once_with_one_form_ready() {
    for point in ["before-commit", "after-commit", "after-produce"] {
        let prefix = unique_prefix(&format!("kill-{point}"));
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(&prefix, dir.path());
        let ids = produce_sealed(&prefix, &settings, dir.path(), 60).await;

        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
        let run = |failpoint: Option<&str>| {
            let mut cmd = std::process::Command::new(bin());
            cmd.args(["serve", "--brokers", &brokers(), "--topic-prefix", &prefix, "--config"])
                .arg(&config)
                .arg("--data-dir")
                .arg(dir.path())
                .arg("--master-key-file")
                .arg(master_key_file(dir.path()))
                .env("SECUREFORMS_GROUP_PREFIX", prefix.trim_end_matches('.'))
                .env("SECUREFORMS_HTTP_LISTEN", "127.0.0.1:0")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            if let Some(f) = failpoint {
                // Small batches, so the third one comes mid-stream.
                cmd.env("SECUREFORMS_FAILPOINT", f).env("SECUREFORMS_MAX_BATCH", "10");
            }
            cmd.spawn().unwrap()
        };
        let mut crashing = run(Some(&format!("tokenizer:{point}:3")));
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = crashing.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                crashing.kill().unwrap();
                panic!("{point}: the failpoint was never reached");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "{point}: the failpoint aborted the process");
        let mut healthy = run(None);
        let ready = ready_events(&prefix, ids.len()).await;
        healthy.kill().unwrap();
        healthy.wait().unwrap();

        assert_eq!(ready.len(), ids.len(), "{point}: one FormReady per submission");
        for (sub, copies) in &ready {
            let distinct: BTreeSet<_> = copies.iter().collect();
            assert_eq!(distinct.len(), 1, "{point}: {sub} reached the agent as {} different FormReady", distinct.len());
        }
        let vault = secureforms::store::Store::open(&dir.path().join("vault")).unwrap();
        let stored = vault.tree(secureforms::vault::trees::SUBMISSIONS).unwrap();
        assert_eq!(stored.len(), ids.len(), "{point}: every submission in the vault exactly once");
        for id in &ids {
            assert!(stored.contains_key(id.as_bytes()).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_ciphertexts_do_not_open_and_retrieve_keys_refuse_every_misuse() {
    let prefix = unique_prefix("misuse");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let now = Arc::new(std::sync::atomic::AtomicI64::new(now_ms()));
    let clock_now = now.clone();
    let clock: Clock = Arc::new(move || clock_now.load(std::sync::atomic::Ordering::SeqCst));
    let service = start(settings.clone(), clock).await;
    let ids = submit_many(&service, &settings, 2).await;

    // A tampered copy of the first submission: its two sealed answers swapped, and the second
    // submission's PAN moved into it, under a new submission id.
    let mut subs = TopicReader::new(&prefix, Topic::Submissions).await;
    assert!(subs.read_until(WAIT, |rs| count_of(rs, EventKind::FormSubmitted) >= 2).await);
    let originals: Vec<_> = subs
        .events()
        .into_iter()
        .filter_map(|e| if let Event::FormSubmitted(s) = e { Some(s) } else { None })
        .collect();
    let mut swapped = originals[0].clone();
    swapped.header.event_id = uuid::Uuid::new_v4().to_string();
    let (a, b) = (swapped.answers[0].ciphertext.clone(), swapped.answers[1].ciphertext.clone());
    swapped.answers[0].ciphertext = b;
    swapped.answers[1].ciphertext = a;
    let mut moved = originals[0].clone();
    moved.header.event_id = uuid::Uuid::new_v4().to_string();
    moved.submission_id = uuid::Uuid::new_v4().to_string();
    let pan_of_other = originals[1].answers.iter().find(|x| x.field_id == "pan").unwrap().ciphertext.clone();
    moved.answers.iter_mut().find(|x| x.field_id == "pan").unwrap().ciphertext = pan_of_other;
    swapped.submission_id = uuid::Uuid::new_v4().to_string();
    // Signed with the master key (an insider or a bug, not a stranger: a stranger's records lack the
    // MAC and never get this far), and on forms of their own (one form has one submission).
    swapped.form_id = "form-swapped".into();
    moved.form_id = "form-moved".into();
    let producer = signed_producer(&prefix, dir.path()).await;
    producer.send(&Event::FormSubmitted(swapped.clone())).await.unwrap();
    producer.send(&Event::FormSubmitted(moved.clone())).await.unwrap();

    let ready = ready_events(&prefix, 4).await;
    let key_of = |id: &str| -> String {
        let Event::FormReady(r) = Codec::get().decode(&ready[id][0]).unwrap() else { unreachable!() };
        r.retrieve_key
    };
    let retrieve = |site: &str, id: &str, key: &str| {
        service.detokenizer.detokenize(
            site,
            uuid::Uuid::parse_str(id).unwrap(),
            key,
            now.load(std::sync::atomic::Ordering::SeqCst),
        )
    };
    let retrieve_when_projected = |site: &'static str, id: String, key: String| {
        let service = &service;
        let now = now.clone();
        async move {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                match service.detokenizer.detokenize(
                    site,
                    uuid::Uuid::parse_str(&id).unwrap(),
                    &key,
                    now.load(std::sync::atomic::Ordering::SeqCst),
                ) {
                    Err(DetokenizeError::Refused(Refusal::InvalidKey)) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    other => return other,
                }
            }
        }
    };
    for tampered in [&swapped.submission_id, &moved.submission_id] {
        let r = retrieve_when_projected("acme", tampered.clone(), key_of(tampered)).await;
        assert!(
            matches!(r, Err(DetokenizeError::Key(secureforms::crypto::KeyError::Open))),
            "tampered record must not open: {r:?}"
        );
    }

    let first = ids[0].to_string();
    let key = key_of(&first);
    assert!(matches!(retrieve("other-site", &first, &key), Err(DetokenizeError::Refused(Refusal::WrongSite))));
    assert!(matches!(
        retrieve("acme", &first, "AAAAAAAAAAAAAAAAAAAAAA"),
        Err(DetokenizeError::Refused(Refusal::InvalidKey))
    ));
    assert!(matches!(retrieve("acme", &first, "not-a-key"), Err(DetokenizeError::Refused(Refusal::InvalidKey))));
    assert!(matches!(
        retrieve("acme", &uuid::Uuid::new_v4().to_string(), &key),
        Err(DetokenizeError::Refused(Refusal::UnknownSubmission))
    ));
    let other_key = key_of(&ids[1].to_string());
    assert!(
        matches!(retrieve("acme", &first, &other_key), Err(DetokenizeError::Refused(Refusal::InvalidKey))),
        "another submission's key"
    );

    // A submit key for the same form (as the gateway would have issued) cannot retrieve.
    let submit_key = secureforms::domain::otk::OtkSecret::parse("SUBMITSUBMITSUBMITSUBM").unwrap();
    let opened = Event::FormOpened(secureforms::events::FormOpened {
        header: secureforms::events::EventHeader::new(
            EventKind::FormOpened,
            uuid::Uuid::new_v4(),
            now_ms(),
            "acme",
            "conv-0",
            "form-0",
        ),
        form_id: "form-0".into(),
        open_count: 1,
        submit_key_hash: submit_key.hash(secureforms::domain::otk::Purpose::Submit, "acme", "form-0"),
        submit_expires_at: now_ms() + 60_000,
    });
    signed_producer(&prefix, dir.path()).await.send(&opened).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match retrieve("acme", &first, submit_key.expose()) {
            Err(DetokenizeError::Refused(Refusal::WrongPurpose)) => break,
            Err(DetokenizeError::Refused(Refusal::InvalidKey)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("a submit key must be refused as wrong_purpose: {other:?}"),
        }
    }

    // Expiry is checked against the injected clock.
    now.fetch_add(61_000, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(retrieve("acme", &first, &key), Err(DetokenizeError::Refused(Refusal::KeyExpired))));
    now.fetch_sub(61_000, std::sync::atomic::Ordering::SeqCst);

    let got = retrieve("acme", &first, &key).expect("the right key retrieves");
    assert_eq!(got.answers["cardholder"].expose(), "A Visitor");
    assert!(matches!(retrieve("acme", &first, &key), Err(DetokenizeError::Refused(Refusal::KeySpent))), "one use");
    let mut service = service;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_moves_new_writes_to_a_new_key_and_old_data_stays_readable() {
    let prefix = unique_prefix("rotate");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let mut service = start(settings.clone(), system_clock()).await;
    let before = submit_many(&service, &settings, 1).await;
    let k1 = service.detokenizer.record(&before[0]).unwrap();
    let rotated =
        secureforms::handlers::keys::rotate(&service.ring, &service.producer, "acme", now_ms()).await.unwrap();
    assert_eq!(rotated.generation, 2);
    let after = submit_many_from(&service, &settings, 1, 1).await;
    wait_for_vault(&service, 2).await;
    let k1 = k1.map(|r| r.key_id).unwrap_or_else(|| service.detokenizer.record(&before[0]).unwrap().unwrap().key_id);
    let k2 = service.detokenizer.record(&after[0]).unwrap().unwrap().key_id;
    assert!(k1.ends_with(".g1") && k2.ends_with(".g2"), "{k1} then {k2}");
    let ready = ready_events(&prefix, 2).await;
    for id in [&before[0], &after[0]] {
        let Event::FormReady(r) = Codec::get().decode(&ready[&id.to_string()][0]).unwrap() else { unreachable!() };
        let deadline = std::time::Instant::now() + WAIT;
        let got = loop {
            match service.detokenizer.detokenize("acme", *id, &r.retrieve_key, now_ms()) {
                Ok(g) => break g,
                Err(DetokenizeError::Refused(Refusal::InvalidKey)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(got.answers["cardholder"].expose(), "A Visitor");
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_form_submitted_changes_nothing_and_emits_nothing() {
    let prefix = unique_prefix("dupsub");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let mut service = start(settings.clone(), system_clock()).await;
    let ids = submit_many(&service, &settings, 1).await;
    wait_for_vault(&service, 1).await;
    let before = vault_dump(&service.vault);
    // The same record again (a producer retry), then a marker submission behind it.
    let mut subs = TopicReader::new(&prefix, Topic::Submissions).await;
    assert!(subs.read_until(WAIT, |r| count_of(r, EventKind::FormSubmitted) >= 1).await);
    let original = subs
        .records
        .iter()
        .find(|m| matches!(Codec::get().decode(m.payload().unwrap()), Ok(Event::FormSubmitted(_))))
        .unwrap();
    let p = signed_producer(&prefix, dir.path()).await;
    p.send_raw(Topic::Submissions, original.key().unwrap(), original.payload().unwrap()).await.unwrap();
    let marker = submit_many_from(&service, &settings, 1, 1).await;
    let ready = ready_events(&prefix, 2).await;
    assert_eq!(ready[&ids[0].to_string()].len(), 1, "one FormReady for the duplicated submission");
    assert!(ready.contains_key(&marker[0].to_string()));
    wait_for_vault(&service, 2).await;
    let after = vault_dump(&service.vault);
    let only_original = |d: &secureforms::store::TreeDump| {
        d["vault.submissions"].iter().filter(|(k, _)| k.as_slice() == ids[0].as_bytes()).cloned().collect::<Vec<_>>()
    };
    assert_eq!(only_original(&before), only_original(&after), "the duplicate changed nothing");
    assert_eq!(after["vault.submissions"].len(), 2);
    service.stop().await;
}
