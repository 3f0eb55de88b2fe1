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
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
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
    let at = page.find("name=\"k\" value=\"").unwrap() + 16;
    let k = &page[at..at + 22];
    let body = serde_urlencoded::to_string([
        ("k", k),
        ("cardholder", "Ada"),
        ("pan", "4111111111111111"),
        ("expiry", "12/39"),
        ("cvv", "737"),
    ])
    .unwrap();
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
