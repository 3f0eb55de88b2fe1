//! The broker goes away for longer than the producer's delivery timeout and comes back, on a broker
//! of the test run's kind started for this test alone: the service keeps running (health 200,
//! readiness 503, visitor and agent requests 503 with Retry-After, never a refusal), and once the
//! broker is back it serves again without a restart: a new form is issued, opened, submitted and
//! made ready. On tansu 0.6.0 this is the case that left it refusing every request until the
//! service restarted (a fresh producer after the failure is what gets past it).

mod common;

use std::time::{Duration, Instant};

use common::*;
use secureforms::broker::EmbeddedBroker;
use secureforms::events::{Codec, Event};
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;
use secureforms::topics::Topic;

const WAIT: Duration = Duration::from_secs(120);

async fn start_broker(settings: &secureforms::config::Settings) -> EmbeddedBroker {
    EmbeddedBroker::start_for(settings).await.expect("test broker starts")
}

async fn issued_link(brokers: &str, prefix: &str, form: &str) -> String {
    let mut links = TopicReader::on(brokers, prefix, Topic::FormLinks).await;
    let found = links
        .read_until(WAIT, |rs| {
            rs.iter().any(|m| matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::FormIssued(i))) if i.form_id == form))
        })
        .await;
    assert!(found, "{form} issued");
    let link = links
        .events()
        .into_iter()
        .find_map(|e| if let Event::FormIssued(i) = e { (i.form_id == form).then_some(i.link) } else { None })
        .unwrap();
    link.trim_start_matches("http://127.0.0.1:8080").to_string()
}

async fn open(client: &reqwest::Client, base: &str, link: &str) -> reqwest::Response {
    let (path, k) = link.split_once("?k=").unwrap();
    client
        .post(format!("{base}{path}/open"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("k={k}"))
        .send()
        .await
        .unwrap()
}

use rdkafka::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_longer_than_the_delivery_timeout_is_ridden_out_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker_settings = secureforms::config::Settings {
        data_dir: dir.path().join("broker"),
        embedded_broker: broker_kind(),
        embedded_broker_port: port,
        ..Default::default()
    };
    let broker = start_broker(&broker_settings).await;
    let addr = broker.addr().to_string();

    let prefix = unique_prefix("outage");
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let mut settings = settings(&prefix, &node_dir);
    settings.brokers = Some(addr.clone());
    settings.http_listen = Some("127.0.0.1:0".into());
    let mut service = Service::start(settings.clone(), addr.clone(), system_clock()).await.expect("starts");
    service.wait_ready(WAIT).await.expect("ready");
    let base = format!("http://{}", service.http_addr.unwrap());
    let client = reqwest::Client::new();
    let chat = secureforms::kafka::EventProducer::new(&kafka_on(&addr, &prefix)).unwrap();
    chat.send(&form_sent("acme", "conv-before", "form-before", "agent-1", "agent", "card-payment")).await.unwrap();
    let before = issued_link(&addr, &prefix, "form-before").await;

    // The broker dies.
    broker.kill().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = client.get(format!("{base}/readyz")).send().await.unwrap().status().as_u16();
        if ready == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {ready} with the broker gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(client.get(format!("{base}/healthz")).send().await.unwrap().status().as_u16(), 200, "alive");
    let r = open(&client, &base, &before).await;
    assert_eq!(r.status().as_u16(), 503, "broker trouble is not the visitor's fault");
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.text().await.unwrap().contains("try again"));

    // Longer than the producer's delivery timeout (30 s): records produced meanwhile time out.
    let outage_ends = Instant::now() + Duration::from_secs(35);
    let failed = chat.send(&form_sent("acme", "conv-lost", "form-lost", "agent-1", "agent", "card-payment")).await;
    assert!(failed.is_err(), "nothing can be delivered while the broker is away");
    tokio::time::sleep(outage_ends.saturating_duration_since(Instant::now())).await;

    // The broker comes back on the same port and data.
    let broker = start_broker(&broker_settings).await;
    let deadline = Instant::now() + WAIT;
    while !service.metrics.is_ready() {
        assert!(Instant::now() < deadline, "the service did not become ready again after the broker came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let chat = secureforms::kafka::EventProducer::new(&kafka_on(&addr, &prefix)).unwrap();
    chat.send(&form_sent("acme", "conv-after", "form-after", "agent-1", "agent", "card-payment")).await.unwrap();
    let after = issued_link(&addr, &prefix, "form-after").await;
    let r = open(&client, &base, &after).await;
    assert_eq!(r.status().as_u16(), 200, "the service serves again without a restart");
    let page = r.text().await.unwrap();
    let k = submit_key_in(&page);
    let k = k.as_str();
    let body = card_form_body(k, "4111111111111111");
    let r = client
        .post(format!("{base}{}", after.split('?').next().unwrap()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "submitted after the outage");
    let mut ready = TopicReader::on(&addr, &prefix, Topic::AgentEvents).await;
    let found = ready
        .read_until(WAIT, |rs| {
            rs.iter().any(|m| matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::FormReady(f))) if f.form_id == "form-after"))
        })
        .await;
    assert!(found, "FormReady for the form submitted after the outage");
    service.stop().await;
    broker.stop().await;
}

/// One visitor: opens the link and submits a card, retrying 503s as a browser user would
/// (the page says to try again). Returns every status seen, and whether Retry-After came with
/// every 503.
async fn visit(client: &reqwest::Client, base: &str, link: &str, pan: &str) -> (Vec<u16>, bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut seen, mut retry_after) = (Vec::new(), true);
    let page = loop {
        let r = open(client, base, link).await;
        let status = r.status().as_u16();
        seen.push(status);
        retry_after &= status != 503 || r.headers().contains_key("retry-after");
        let page = r.text().await.unwrap();
        if status != 503 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if seen.last() != Some(&200) {
        return (seen, retry_after);
    }
    let k = submit_key_in(&page);
    let body = card_form_body(k.as_str(), pan);
    loop {
        let r = client
            .post(format!("{base}{}", link.split('?').next().unwrap()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        seen.push(status);
        retry_after &= status != 503 || r.headers().contains_key("retry-after");
        if status != 503 || Instant::now() > deadline {
            return (seen, retry_after);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_and_restarted_under_load_costs_visitors_a_retry_at_most_and_loses_nothing() {
    // On tansu 0.6.0 the restarted broker's group coordinator panics as the service's consumer
    // groups rejoin (`unreachable!()` at tansu-storage-0.6.0/src/service.rs:337), after which its
    // storage task is gone and it refuses every request until it is restarted again: a broker
    // defect the service cannot work around from the client side (README, Brokers).
    if !needs_kafka("tansu 0.6.0 refuses every request after a restart with consumer groups rejoining") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker_settings = secureforms::config::Settings {
        data_dir: dir.path().join("broker"),
        embedded_broker: broker_kind(),
        embedded_broker_port: port,
        ..Default::default()
    };
    let broker = start_broker(&broker_settings).await;
    let addr = broker.addr().to_string();
    let prefix = unique_prefix("outload");
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let mut settings = settings(&prefix, &node_dir);
    settings.brokers = Some(addr.clone());
    settings.http_listen = Some("127.0.0.1:0".into());
    // Every visitor here comes from 127.0.0.1.
    settings.rate_limits.visitor_per_client = secureforms::config::Rate { per_minute: 100_000, burst: 10_000 };
    let mut service = Service::start(settings.clone(), addr.clone(), system_clock()).await.expect("starts");
    service.wait_ready(WAIT).await.expect("ready");
    let base = format!("http://{}", service.http_addr.unwrap());

    // Forms issued ahead, so the load needs only the visitor side while the broker goes away.
    const FORMS: usize = 80;
    let chat = secureforms::kafka::EventProducer::new(&kafka_on(&addr, &prefix)).unwrap();
    for i in 0..FORMS {
        chat.send(&form_sent("acme", &format!("conv-l{i}"), &format!("form-l{i}"), "agent-1", "agent", "card-payment"))
            .await
            .unwrap();
    }
    let mut links = TopicReader::on(&addr, &prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |rs| rs.len() >= FORMS).await, "every form issued");
    let links: Vec<(String, String)> = links
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::FormIssued(i) => Some((i.form_id, i.link.trim_start_matches("http://127.0.0.1:8080").to_string())),
            _ => None,
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    for (form, _) in &links {
        let key = secureforms::handlers::issuer::form_key("acme", form);
        while !service.gateway.tree(secureforms::handlers::gateway::FORMS_TREE).unwrap().contains_key(&key).unwrap() {
            assert!(Instant::now() < deadline, "the gateway learns {form}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Two visitors at a time, one new visitor every 250 ms each, until told to stop.
    let queue = std::sync::Arc::new(std::sync::Mutex::new(links.clone()));
    type Visit = (String, Vec<u16>, bool, Instant, Instant);
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Visit>::new()));
    let (stop_load, load_stopped) = tokio::sync::watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..2 {
        let (queue, done, base, stopped) = (queue.clone(), done.clone(), base.clone(), load_stopped.clone());
        workers.spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            while !*stopped.borrow() {
                let Some((form, link)) = queue.lock().unwrap().pop() else { break };
                let pan = luhn_pan(7_000_000 + w * 1000 + n);
                let started = Instant::now();
                let (seen, retry_after) = visit(&client, &base, &link, &pan).await;
                done.lock().unwrap().push((form, seen, retry_after, started, Instant::now()));
                n += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
    let completed = |d: &std::sync::Mutex<Vec<Visit>>| d.lock().unwrap().len();
    let deadline = Instant::now() + WAIT;
    while completed(&done) < 6 {
        assert!(Instant::now() < deadline, "the load makes progress before the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The broker is stopped (a clean shutdown, as in maintenance) and started again.
    let outage_starts = Instant::now();
    broker.stop().await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while client.get(format!("{base}/readyz")).send().await.unwrap().status().as_u16() != 503 {
        assert!(Instant::now() < deadline, "/readyz notices the broker is gone");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = completed(&done);
    let broker = start_broker(&broker_settings).await;
    let deadline = Instant::now() + WAIT;
    while !service.metrics.is_ready() {
        let figures = || {
            let m = service.metrics.render();
            m.lines()
                .filter(|l| {
                    l.contains("assigned_partitions")
                        || l.contains("lag")
                        || l.contains("rejoin")
                        || l.contains("producer_resets")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("broker/broker.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let panics: Vec<&str> = lines
                .iter()
                .position(|l| l.contains("panicked"))
                .map(|at| lines[at..(at + 4).min(lines.len())].to_vec())
                .unwrap_or_default();
            let tail: String =
                log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            let tail = format!("{}\n...\n{tail}", panics.join("\n"));
            panic!(
                "the service did not become ready again after the broker came back:\n{}\nthe broker's log ends:\n{tail}",
                figures()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outage_ends = Instant::now();
    let after = completed(&done);
    let deadline = Instant::now() + WAIT;
    while completed(&done) < after + 6 {
        assert!(Instant::now() < deadline, "the load makes progress after the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_load.send(true);
    while workers.join_next().await.is_some() {}

    let done = done.lock().unwrap().clone();
    let statuses: std::collections::BTreeMap<u16, usize> =
        done.iter().flat_map(|(_, s, ..)| s.iter().copied()).fold(Default::default(), |mut m, s| {
            *m.entry(s).or_default() += 1;
            m
        });
    let spanning = done.iter().filter(|(.., started, ended)| *started < outage_ends && *ended > outage_starts).count();
    let longest = done.iter().map(|(.., started, ended)| *ended - *started).max().unwrap_or_default();
    println!(
        "visitors: {} ({during} done when /readyz went 503, {after} when ready again, {spanning} in flight during the {:.1} s outage, the longest took {:.1} s); statuses: {statuses:?}",
        done.len(),
        (outage_ends - outage_starts).as_secs_f64(),
        longest.as_secs_f64()
    );
    assert!(spanning > 0, "the load ran through the outage");
    for (form, seen, retry_after, ..) in &done {
        assert!(seen.iter().all(|s| *s == 200 || *s == 503), "{form}: only success or 503 (never a refusal): {seen:?}");
        assert!(*retry_after, "{form}: every 503 says when to retry");
        assert_eq!(seen.last(), Some(&200), "{form}: the visitor got through: {seen:?}");
    }
    // Every acknowledged submission is made ready exactly once.
    let submitted: std::collections::BTreeSet<String> = done.iter().map(|(f, ..)| f.clone()).collect();
    let mut ready = TopicReader::on(&addr, &prefix, Topic::AgentEvents).await;
    let ready_forms = |rs: &[rdkafka::message::OwnedMessage]| -> Vec<String> {
        rs.iter()
            .filter_map(|m| match m.payload().map(|p| Codec::get().decode(p)) {
                Some(Ok(Event::FormReady(f))) => Some(f.form_id),
                _ => None,
            })
            .collect()
    };
    let found = ready
        .read_until(WAIT, |rs| {
            let forms: std::collections::BTreeSet<String> = ready_forms(rs).into_iter().collect();
            submitted.is_subset(&forms)
        })
        .await;
    assert!(found, "a FormReady for every acknowledged submission");
    let forms = ready_forms(&ready.records);
    for form in &submitted {
        assert_eq!(forms.iter().filter(|f| *f == form).count(), 1, "{form}: one FormReady");
    }
    service.stop().await;
    broker.stop().await;
}
