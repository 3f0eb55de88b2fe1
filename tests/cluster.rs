//! Several nodes of one deployment on one broker: the same topics and group prefix, their own node
//! ids and data directories, one master key. State every node needs whole (data keys, ended agent
//! sessions) reaches every node, whichever node owns the partitions it arrived on (issue 13).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Message, OwnedMessage};
use secureforms::events::{AgentSessionEnded, Codec, Event, EventHeader, EventKind};
use secureforms::handlers::sessions::SessionsView;
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;

const WAIT: Duration = Duration::from_secs(60);

async fn node(prefix: &str, dir: &std::path::Path, id: &str, master: &std::path::Path) -> Service {
    node_with_clock(prefix, dir, id, master, system_clock()).await
}

async fn node_with_clock(
    prefix: &str,
    dir: &std::path::Path,
    id: &str,
    master: &std::path::Path,
    clock: secureforms::kafka::runtime::Clock,
) -> Service {
    let mut s = settings(prefix, dir);
    s.node_id = id.into();
    s.master_key_file = Some(master.to_path_buf());
    let service = Service::start(s, brokers(), clock).await.expect("node starts");
    service.wait_ready(WAIT).await.expect("ready");
    service
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {} s", WAIT.as_secs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_and_ended_sessions_reach_every_node() {
    let prefix = unique_prefix("cluster");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let master = master_key_file(da.path());
    let mut a = node(&prefix, da.path(), "node-a", &master).await;
    let mut b = node(&prefix, db.path(), "node-b", &master).await;

    // Node a makes the month's data key (its first submission); node b's key ring gets it too, so a
    // submission or a retrieval on node b can use it.
    submit_card(&a, "conv-k", "form-k", &luhn_pan(11)).await;
    let key_id = a.ring.list().into_iter().find(|k| k.state == "active").expect("a data key").id;
    until("node b knows the data key node a made", || b.ring.get(&key_id).is_ok()).await;
    // And the other way round, for a key node b makes.
    let fresh = secureforms::handlers::keys::rotate(&b.ring, &b.producer, "acme", now_ms()).await.unwrap();
    until("node a knows the data key node b made", || a.ring.get(&fresh.id).is_ok()).await;

    // A session the chat bus ends is ended on both nodes, whichever owns its partition.
    let ended = Event::AgentSessionEnded(AgentSessionEnded {
        header: EventHeader::new(
            EventKind::AgentSessionEnded,
            uuid::Uuid::new_v4(),
            now_ms(),
            "acme",
            "conv-s",
            "conv-s",
        ),
        agent_id: "alice".into(),
        session_id: "s-gone".into(),
        reason: "logout".into(),
    });
    producer(&prefix).await.send(&ended).await.unwrap();
    for (name, n) in [("a", &a), ("b", &b)] {
        let view = SessionsView::new(n.sessions.clone());
        until(&format!("node {name} sees the session ended"), || view.ended("acme", "s-gone").unwrap()).await;
    }
    a.stop().await;
    b.stop().await;
}

/// The retention purge on each node purges what that node holds, and its receipts reach the node
/// that owns each conversation: one receipt per conversation, keyed by it (before, one receipt per
/// site landed on one partition, and the owners of the others kept the rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_purges_what_it_holds_and_the_receipts_reach_every_owner() {
    use secureforms::domain::retention::{add_months, parse_as_of};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    let t0 = parse_as_of("2025-01-15").unwrap();
    let now = Arc::new(AtomicI64::new(t0));
    let c = now.clone();
    let clock: secureforms::kafka::runtime::Clock = Arc::new(move || c.load(Ordering::SeqCst));
    let prefix = unique_prefix("cluster-purge");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let master = master_key_file(da.path());
    let mut a = node_with_clock(&prefix, da.path(), "node-a", &master, clock.clone()).await;
    let mut b = node_with_clock(&prefix, db.path(), "node-b", &master, clock).await;

    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(submit_card(&a, &format!("conv-p{i}"), &format!("form-p{i}"), &luhn_pan(300 + i)).await);
    }
    let (va, vb) =
        (secureforms::vault::VaultView::new(a.vault.clone()), secureforms::vault::VaultView::new(b.vault.clone()));
    let held = |id: &uuid::Uuid| va.holds(id).unwrap() || vb.holds(id).unwrap();
    until("every submission is in one node's vault", || ids.iter().all(held)).await;
    let on_a = ids.iter().filter(|id| va.holds(id).unwrap()).count();
    eprintln!("node a holds {on_a} of {} submissions, node b the rest", ids.len());

    now.store(add_months(t0, 14), Ordering::SeqCst);
    let as_of = add_months(t0, 14);
    secureforms::ops::purge::purge(&a, as_of, false).await.expect("node a purges what it holds");
    secureforms::ops::purge::purge(&b, as_of, false).await.expect("node b purges what it holds");
    assert!(ids.iter().all(|id| !held(id)), "no vault holds a purged submission");
    let (wa, wb) = (
        secureforms::handlers::visibility::VisibilityView::new(a.visibility.clone()),
        secureforms::handlers::visibility::VisibilityView::new(b.visibility.clone()),
    );
    until("neither visibility projection knows a purged submission", || {
        ids.iter().all(|id| wa.owner(id).unwrap().is_none() && wb.owner(id).unwrap().is_none())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

const SECRET: &str = "cluster-test-secret-for-agent-tokens";

fn token(agent: &str, perms: &[&str], roles: &[&str], sid: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let claims = secureforms::http::auth::AgentClaims {
        sub: agent.into(),
        site: "acme".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        permissions: perms.iter().map(|p| p.to_string()).collect(),
        sid: sid.into(),
        exp: now_ms() / 1000 + 600,
        nbf: None,
    };
    encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A node with its gateway on a free loopback port, as `serve` runs one.
async fn web_node(prefix: &str, dir: &std::path::Path, id: &str, master: &std::path::Path) -> Service {
    web_node_with(prefix, dir, id, master, |_| {}).await
}

/// [`web_node`] with more settings (`configure` runs last).
async fn web_node_with(
    prefix: &str,
    dir: &std::path::Path,
    id: &str,
    master: &std::path::Path,
    configure: impl FnOnce(&mut secureforms::config::Settings),
) -> Service {
    let secret = dir.join("jwt.secret");
    write_private(&secret, SECRET.as_bytes());
    let mut s = settings(prefix, dir);
    s.node_id = id.into();
    s.master_key_file = Some(master.to_path_buf());
    s.http_listen = Some("127.0.0.1:0".into());
    s.agent_auth.jwt_secret_file = Some(secret);
    configure(&mut s);
    let service = Service::start(s, brokers(), system_clock()).await.expect("node starts");
    service.wait_ready(WAIT).await.expect("ready");
    service
}

/// Waits until the nodes own every conversation partition between them, each exactly once, and
/// every node's directory names the owner each partition really has.
async fn settled(nodes: &[&Service]) {
    use secureforms::handlers::directory::DirectoryView;
    let partitions = nodes[0].partitions;
    until("the nodes own every partition once and every directory agrees", || {
        let owners: Vec<Vec<usize>> = (0..partitions)
            .map(|p| nodes.iter().enumerate().filter(|(_, n)| n.ownership.owns(p)).map(|(i, _)| i).collect())
            .collect();
        owners.iter().all(|o| o.len() == 1)
            && nodes.iter().all(|n| {
                let view = DirectoryView::new(n.directory.clone());
                (0..partitions).all(|p| {
                    view.owner_of(p).unwrap().map(|e| e.node_id)
                        == Some(nodes[owners[p as usize][0]].settings.node_id.clone())
                })
            })
    })
    .await;
}

fn owner_of(nodes: &[&Service], conversation: &str) -> usize {
    let p = nodes[0].partition_of(conversation);
    nodes.iter().position(|n| n.ownership.owns(p)).expect("an owner")
}

/// The FormIssued records for `form` among `records`, in order.
fn issued_for(records: &[OwnedMessage], form: &str) -> Vec<secureforms::events::FormIssued> {
    records
        .iter()
        .filter_map(|m| match m.payload().map(|p| Codec::get().decode(p)) {
            Some(Ok(Event::FormIssued(i))) if i.form_id == form => Some(i),
            _ => None,
        })
        .collect()
}

/// The first FormReady for `form` among `records`.
fn ready_for(records: &[OwnedMessage], form: &str) -> Option<secureforms::events::FormReady> {
    records.iter().find_map(|m| match m.payload().map(|p| Codec::get().decode(p)) {
        Some(Ok(Event::FormReady(f))) if f.form_id == form => Some(f),
        _ => None,
    })
}

async fn text(r: reqwest::Response) -> (u16, String) {
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Three nodes, requests spread with no sticky routing: every request type sent to a node that does
/// not own the conversation is answered as the owner answers it, as soon as what it refers to exists
/// (a link as soon as FormIssued is on the topic, a FormReady key as soon as it is, a fresh key as
/// soon as it is returned). Off-the-record answers are held by the owner, so a retrieval through any
/// node finds them. A request that claims to be forwarded without the deployment's key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_answer_every_request_sent_to_a_node_that_does_not_own_it() {
    use secureforms::events::{FormIssued, FormReady};
    use secureforms::topics::Topic;
    use serde_json::{Value, json};

    let log = logs();
    let prefix = unique_prefix("cluster3");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let master = master_key_file(dirs[0].path());
    let mut a = web_node(&prefix, dirs[0].path(), "node-a", &master).await;
    let mut b = web_node(&prefix, dirs[1].path(), "node-b", &master).await;
    let mut c = web_node(&prefix, dirs[2].path(), "node-c", &master).await;
    let nodes = [&a, &b, &c];
    settled(&nodes).await;
    let base = |i: usize| format!("http://{}", nodes[i].http_addr.unwrap());
    let client = reqwest::Client::new();
    let chat = producer(&prefix).await;
    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    let mut ready = TopicReader::new(&prefix, Topic::AgentEvents).await;
    let sender = token("alice", &["use_secure_form"], &["agent"], "s-alice");
    let manager = token(
        "mona",
        &["use_secure_form", secureforms::domain::access::VIEW_RESPONSES_IN_HISTORY],
        &[secureforms::domain::access::MANAGER_ROLE],
        "s-mona",
    );

    let mut pans = Vec::new();
    for owner in 0..3 {
        let (entry, third) = ((owner + 1) % 3, (owner + 2) % 3);
        let conv = (0..).map(|i| format!("conv-{owner}-{i}")).find(|c| owner_of(&nodes, c) == owner).unwrap();
        let form = format!("form-{owner}");
        eprintln!(
            "conversation {conv}: owned by {}, asked through {}",
            nodes[owner].settings.node_id, nodes[entry].settings.node_id
        );
        chat.send(&form_sent("acme", &conv, &form, "alice", "agent", "card-payment")).await.unwrap();
        assert!(links.read_until(WAIT, |r| !issued_for(r, &form).is_empty()).await, "FormIssued for {form}");
        let FormIssued { link, .. } = issued_for(&links.records, &form).remove(0);
        let path = link.trim_start_matches("http://127.0.0.1:8080").to_string();
        let (form_path, open_key) = path.split_once("?k=").unwrap();
        assert!(open_key.ends_with(&format!(".{}", nodes[0].partition_of(&conv))), "the key names its partition");

        // The link, as soon as the chat bus has it, through a node that does not own it.
        let (status, page) = text(client.get(format!("{}{path}", base(entry))).send().await.unwrap()).await;
        assert_eq!(status, 200, "the link works at once through a non-owner: {page}");
        let opened = client
            .post(format!("{}{form_path}/open", base(entry)))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("k={open_key}"))
            .send()
            .await
            .unwrap();
        let (status, page) = text(opened).await;
        assert_eq!(status, 200, "open through a non-owner: {page}");
        let submit_key = submit_key_in(&page);
        let pan = luhn_pan(900 + owner as u64);
        pans.push(pan.clone());
        let body = card_form_body(submit_key.as_str(), pan.as_str());
        let submitted = client
            .post(format!("{}{form_path}", base(entry)))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(submitted.status().as_u16(), 200, "submit through a non-owner");

        // The FormReady key, as soon as the workspace has it, through a non-owner.
        assert!(ready.read_until(WAIT, |r| ready_for(r, &form).is_some()).await, "FormReady for {form}");
        let FormReady { submission_id, retrieve_key, .. } = ready_for(&ready.records, &form).unwrap();
        let retrieve = |node: usize, key: String| {
            let (client, url, sender) =
                (client.clone(), format!("{}/api/v1/submissions/{submission_id}/retrieve", base(node)), sender.clone());
            async move {
                let r = client.post(url).bearer_auth(sender).json(&json!({ "key": key })).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
        let (status, got) = retrieve(entry, retrieve_key.clone()).await;
        assert_eq!(status, 200, "retrieve through a non-owner: {got}");
        assert_eq!(got["answers"]["pan"], pan.as_str());
        assert_eq!(got["off_record"]["state"], "present", "the owner that took the submit holds the CVV: {got}");
        assert_eq!(got["off_record"]["answers"]["cvv"], "737");
        // The key is spent on the owner, whichever node is asked.
        let (status, again) = retrieve(third, retrieve_key.clone()).await;
        assert_eq!((status, again["error"].as_str()), (403, Some("key_spent")), "{again}");

        // A fresh key, usable through any node as soon as it is returned.
        let fresh = client
            .post(format!("{}/api/v1/submissions/{submission_id}/retrieve-key", base(third)))
            .bearer_auth(&sender)
            .json(&json!({ "previous_key": retrieve_key }))
            .send()
            .await
            .unwrap();
        let status = fresh.status().as_u16();
        let fresh: Value = fresh.json().await.unwrap();
        assert_eq!(status, 201, "fresh key through a non-owner: {fresh}");
        let (status, got) = retrieve(entry, fresh["retrieve_key"].as_str().unwrap().to_string()).await;
        assert_eq!(status, 200, "the fresh key works at once through another node: {got}");
        assert_eq!(got["off_record"]["state"], "expired", "off-the-record answers are read once");

        // The manager's history, complete, through a non-owner.
        let history = client
            .get(format!("{}/api/v1/conversations/{conv}/history", base(entry)))
            .bearer_auth(&manager)
            .send()
            .await
            .unwrap();
        assert_eq!(history.status().as_u16(), 200);
        let history: Value = history.json().await.unwrap();
        let forms = history["secure_forms"].as_array().unwrap();
        assert_eq!(forms.len(), 1, "{history}");
        assert_eq!(forms[0]["submission_id"], submission_id.as_str());

        let forwarded = nodes[entry]
            .metrics
            .forwarded
            .get_or_create(&[
                ("route", "/api/v1/submissions/{id}/retrieve".to_string()),
                ("outcome", "2xx".to_string()),
            ])
            .get();
        assert!(forwarded >= 1, "node {} counted its forwarded retrievals", nodes[entry].settings.node_id);
    }

    // A request that claims to come from another node without the deployment's key.
    let forged = client
        .get(format!("{}/api/v1/conversations/conv-0-0/history", base(0)))
        .bearer_auth(&manager)
        .header("x-secureforms-hop", format!("node-b;{};203.0.113.7;{}", now_ms(), "00".repeat(32)))
        .send()
        .await
        .unwrap();
    let (status, body) = text(forged).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("invalid_hop"), "{body}");

    c.stop().await;
    b.stop().await;
    a.stop().await;

    // The card numbers crossed nodes in forwarded requests: none is in any node's files, the
    // broker's files or the logs, in any encoding.
    let mut scanned = 0;
    for file in all_files(&broker_dir()).into_iter().chain(dirs.iter().flat_map(|d| all_files(d.path()))) {
        if file.file_name().is_some_and(|n| n == "master.key" || n == "jwt.secret") {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap_or_default();
        scanned += bytes.len();
        for pan in &pans {
            assert_eq!(hits(&bytes, &forms_of(pan)), 0, "a card number found in {}", file.display());
        }
    }
    assert!(scanned > 100_000, "scanned the nodes' and the broker's files ({scanned} bytes)");
    let log = log.lock().unwrap().clone();
    assert!(log.len() > 1000, "logs were captured");
    for pan in &pans {
        assert_eq!(hits(&log, &forms_of(pan)), 0, "a card number found in the logs");
    }
}

/// A certificate authority of the deployment's own and one server certificate it signs for
/// 127.0.0.1, written as PEM files: (CA certificate, server certificate, server key).
fn cluster_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name.push(DnType::CommonName, "secureforms test cluster CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let paths = (dir.join("cluster-ca.pem"), dir.join("node.pem"), dir.join("node.key"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, server_cert.pem()).unwrap();
    write_private(&paths.2, server_key.serialize_pem().as_bytes());
    (paths.0, paths.1, paths.2)
}

/// Nodes that serve HTTPS forward to each other over HTTPS and check the owner's certificate
/// against `cluster_ca_file`: with it, a visitor's link works through the node that does not own
/// it; without it (only the system's roots, which do not know the deployment's CA), the forwarding
/// node refuses to talk to the owner and answers 503 with Retry-After, never over plain HTTP and
/// never from its own state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_forward_over_https_and_only_to_an_owner_whose_certificate_they_trust() {
    use secureforms::events::FormIssued;
    use secureforms::topics::Topic;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let prefix = unique_prefix("cluster-tls");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let master = master_key_file(dirs[0].path());
    let (ca, cert, key) = cluster_pki(dirs[0].path());
    let tls = |trusts_the_ca: bool| {
        let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
        move |s: &mut secureforms::config::Settings| {
            s.tls_cert = Some(cert);
            s.tls_key = Some(key);
            s.cluster_ca_file = trusts_the_ca.then_some(ca);
        }
    };
    let mut a = web_node_with(&prefix, dirs[0].path(), "node-a", &master, tls(true)).await;
    let mut b = web_node_with(&prefix, dirs[1].path(), "node-b", &master, tls(false)).await;
    let nodes = [&a, &b];
    settled(&nodes).await;
    let view = secureforms::handlers::directory::DirectoryView::new(a.directory.clone());
    for p in 0..a.partitions {
        let url = view.owner_of(p).unwrap().expect("an owner").url;
        assert!(url.starts_with("https://127.0.0.1:"), "nodes serving HTTPS advertise an https URL: {url}");
    }

    let visitor = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let base = |i: usize| format!("https://{}", nodes[i].http_addr.unwrap());
    let chat = producer(&prefix).await;
    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    // The path of a link (FormIssued) for a new form in a conversation `owner` owns.
    async fn link_owned_by(
        owner: usize,
        nodes: &[&Service],
        chat: &secureforms::kafka::EventProducer,
        links: &mut TopicReader,
    ) -> String {
        let conv = (0..).map(|i| format!("conv-tls-{owner}-{i}")).find(|c| owner_of(nodes, c) == owner).unwrap();
        let form = format!("form-tls-{owner}");
        chat.send(&form_sent("acme", &conv, &form, "alice", "agent", "card-payment")).await.unwrap();
        assert!(links.read_until(WAIT, |r| !issued_for(r, &form).is_empty()).await, "FormIssued for {form}");
        let FormIssued { link, .. } = issued_for(&links.records, &form).remove(0);
        link.trim_start_matches("http://127.0.0.1:8080").to_string()
    }

    // Owned by b, asked through a, which trusts the deployment's CA: forwarded over HTTPS.
    let path = link_owned_by(1, &nodes, &chat, &mut links).await;
    let r = visitor.get(format!("{}{path}", base(0))).send().await.unwrap();
    let (status, page) = text(r).await;
    assert_eq!(status, 200, "the link works through the node that does not own it: {page}");
    let forwarded = |n: &Service, outcome: &str| {
        n.metrics
            .forwarded
            .get_or_create(&[("route", "/f/{site}/{form}".to_string()), ("outcome", outcome.to_string())])
            .get()
    };
    assert!(forwarded(&a, "2xx") >= 1, "node-a forwarded the link to node-b");

    // Owned by a, asked through b, which cannot verify a's certificate: refused, 503 with
    // Retry-After, and not answered from b's own state either.
    let path = link_owned_by(0, &nodes, &chat, &mut links).await;
    let r = visitor.get(format!("{}{path}", base(1))).send().await.unwrap();
    let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let (status, page) = text(r).await;
    assert_eq!(status, 503, "a node that cannot verify the owner does not forward: {page}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok()), "the visitor is told when to retry");
    assert!(forwarded(&b, "unreachable") >= 1, "node-b counted the owner it could not reach");
    assert_eq!(forwarded(&b, "2xx"), 0, "node-b forwarded nothing successfully");

    b.stop().await;
    a.stop().await;
}

/// A chat bus on another partitioner than the Java client's puts a conversation's FormSent on a
/// partition another node owns. That node sends it on to the conversation's partition, so the owner
/// answers it and holds who sent it: the visitor and the agent get through as with a well-placed
/// record, and the FormSent is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_sent_on_the_wrong_partition_is_served_by_its_conversations_owner() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use secureforms::events::{FormIssued, FormReady};
    use secureforms::topics::Topic;
    use serde_json::{Value, json};

    let prefix = unique_prefix("misplaced");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let master = master_key_file(dirs[0].path());
    let mut a = web_node(&prefix, dirs[0].path(), "node-a", &master).await;
    let mut b = web_node(&prefix, dirs[1].path(), "node-b", &master).await;
    let nodes = [&a, &b];
    settled(&nodes).await;
    let base = |i: usize| format!("http://{}", nodes[i].http_addr.unwrap());
    let conv = (0..).map(|i| format!("conv-misplaced-{i}")).find(|c| owner_of(&nodes, c) == 0).unwrap();
    let elsewhere = (0..a.partitions).find(|p| b.ownership.owns(*p)).expect("node b owns a partition");
    let form = "form-misplaced";
    let payload = Codec::get().encode(&form_sent("acme", &conv, form, "alice", "agent", "card-payment")).unwrap();
    let raw: FutureProducer = kafka(&prefix).client_config().create().unwrap();
    let topic = format!("{prefix}chat-events");
    let record = FutureRecord::to(&topic).key(&conv).payload(&payload).partition(elsewhere);
    raw.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();

    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| !issued_for(r, form).is_empty()).await, "FormIssued");
    let FormIssued { link, .. } = issued_for(&links.records, form).remove(0);
    let path = link.trim_start_matches("http://127.0.0.1:8080").to_string();
    let (form_path, open_key) = path.split_once("?k=").unwrap();
    let client = reqwest::Client::new();
    let opened = client
        .post(format!("{}{form_path}/open", base(1)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("k={open_key}"))
        .send()
        .await
        .unwrap();
    let (status, page) = text(opened).await;
    assert_eq!(status, 200, "the visitor opens the form: {page}");
    let pan = luhn_pan(4242);
    let submitted = client
        .post(format!("{}{form_path}", base(1)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(card_form_body(submit_key_in(&page).as_str(), pan.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status().as_u16(), 200, "and submits it");

    let mut ready = TopicReader::new(&prefix, Topic::AgentEvents).await;
    assert!(ready.read_until(WAIT, |r| ready_for(r, form).is_some()).await, "FormReady");
    let FormReady { submission_id, retrieve_key, .. } = ready_for(&ready.records, form).unwrap();
    let r = client
        .post(format!("{}/api/v1/submissions/{submission_id}/retrieve", base(1)))
        .bearer_auth(token("alice", &["use_secure_form"], &["agent"], "s-alice"))
        .json(&json!({ "key": retrieve_key }))
        .send()
        .await
        .unwrap();
    let (status, body) = (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null));
    assert_eq!(status, 200, "the sender retrieves it: {body}");
    assert!(body.to_string().contains(&pan), "with the answers");
    assert_eq!(issued_for(&links.records, form).len(), 1, "the FormSent was answered once");
    assert!(a.node.metrics.chat_bus_misplaced.get() + b.node.metrics.chat_bus_misplaced.get() >= 1);
    a.stop().await;
    b.stop().await;
}
