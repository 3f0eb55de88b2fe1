//! The agent side through HTTP and the real broker: the access matrix (sender, other agent,
//! transfer, reassignment, close, missing permission, forged and expired tokens, ended session,
//! reused key, submit key, another site's key), the manager's history with and without its
//! permission, fresh keys, and exactly one FormRetrieved audit event per attempt.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use rdkafka::message::Message;
use secureforms::events::{
    AgentSessionEnded, Codec, ConversationClosed, ConversationTransferred, Event, EventHeader, EventKind,
};
use secureforms::http::auth::AgentClaims;
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;
use secureforms::topics::Topic;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "test-shared-secret-for-agent-tokens";

fn token(agent: &str, site: &str, perms: &[&str], roles: &[&str], sid: &str, exp_in_secs: i64, secret: &str) -> String {
    let claims = AgentClaims {
        sub: agent.into(),
        site: site.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        permissions: perms.iter().map(|p| p.to_string()).collect(),
        sid: sid.into(),
        exp: now_ms() / 1000 + exp_in_secs,
        nbf: None,
    };
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn agent(name: &str, sid: &str) -> String {
    token(name, "acme", &["use_secure_form"], &["agent"], sid, 600, SECRET)
}

struct Env {
    service: Service,
    base: String,
    prefix: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        let mut r = self
            .client
            .post(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = bearer {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, bearer: &str) -> (u16, Value) {
        let resp = self.client.get(format!("{}{}", self.base, path)).bearer_auth(bearer).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null))
    }

    async fn retrieve(&self, sub: &str, bearer: Option<&str>, key: &str) -> (u16, Value) {
        self.post(&format!("/api/v1/submissions/{sub}/retrieve"), bearer, json!({ "key": key })).await
    }

    async fn chat(&self, e: Event) {
        producer(&self.prefix).await.send(&e).await.unwrap();
    }

    /// Polls until the visibility projection shows `check` for the conversation.
    async fn until_conversation(
        &self,
        site: &str,
        conv: &str,
        check: impl Fn(&secureforms::domain::access::Conversation) -> bool,
    ) {
        let key = secureforms::handlers::visibility::conversation_key(site, conv);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let tree = self.service.visibility.tree(secureforms::handlers::visibility::trees::CONVERSATIONS).unwrap();
            if let Some(v) = tree.get(&key).unwrap()
                && check(&serde_json::from_slice(&v).unwrap())
            {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "conversation {conv} never reached the expected state");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

async fn env_with(adjust: impl FnOnce(&mut secureforms::config::Settings)) -> Env {
    let prefix = unique_prefix("agent");
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt.secret");
    write_private(&secret_file, SECRET.as_bytes());
    let mut s = settings(&prefix, dir.path());
    s.http_listen = Some("127.0.0.1:0".into());
    s.agent_auth.jwt_secret_file = Some(secret_file);
    let beta = s.sites["acme"].clone();
    s.sites.insert("beta".into(), beta);
    adjust(&mut s);
    let service = Service::start(s, brokers(), system_clock()).await.unwrap();
    service.wait_ready(WAIT).await.expect("ready");
    let base = format!("http://{}", service.http_addr.unwrap());
    Env { service, base, prefix, client: reqwest::Client::new(), _dir: dir }
}

/// Plays chat bus and visitor: returns (submission id, retrieve key, the page's submit key).
async fn submitted_form(e: &Env, site: &str, conv: &str, form: &str, sender: &str) -> (String, String, String) {
    submitted_form_in(e, site, conv, form, sender, None).await
}

/// As [`submitted_form`], the chat bus naming the agent session the form is sent from.
async fn submitted_form_in(
    e: &Env,
    site: &str,
    conv: &str,
    form: &str,
    sender: &str,
    session: Option<&str>,
) -> (String, String, String) {
    let mut sent = form_sent(site, conv, form, sender, "agent", "card-payment");
    if let Event::FormSent(f) = &mut sent {
        f.agent_session_id = session.map(str::to_string);
    }
    e.chat(sent).await;
    let mut links = TopicReader::new(&e.prefix, Topic::FormLinks).await;
    assert!(links.read_until(WAIT, |r| r.iter().any(|m| matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::FormIssued(i))) if i.form_id == form))).await);
    let link = links
        .events()
        .into_iter()
        .find_map(|ev| if let Event::FormIssued(i) = ev { (i.form_id == form).then_some(i.link) } else { None })
        .unwrap();
    let path = link.trim_start_matches("http://127.0.0.1:8080").to_string();
    let key = secureforms::handlers::issuer::form_key(site, form);
    let deadline = std::time::Instant::now() + WAIT;
    while !e.service.gateway.tree(secureforms::handlers::gateway::FORMS_TREE).unwrap().contains_key(&key).unwrap() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The visitor's click on the link's page opens the form (a POST with the link's key).
    let (form_path, open_key) = path.split_once("?k=").unwrap();
    let page = e
        .client
        .post(format!("{}{form_path}/open", e.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("k={open_key}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let submit_key = submit_key_in(&page);
    let body = card_form_body(submit_key.as_str(), "4111111111111111");
    let r = e
        .client
        .post(format!("{}{}", e.base, path.split('?').next().unwrap()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut agent_events = TopicReader::new(&e.prefix, Topic::AgentEvents).await;
    assert!(agent_events.read_until(WAIT, |r| r.iter().any(|m| matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::FormReady(f))) if f.form_id == form))).await);
    let ready = agent_events
        .events()
        .into_iter()
        .find_map(|ev| if let Event::FormReady(f) = ev { (f.form_id == form).then_some(f) } else { None })
        .unwrap();
    // Wait until both projections know the submission.
    let id = uuid::Uuid::parse_str(&ready.submission_id).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let vis = e
            .service
            .visibility
            .tree(secureforms::handlers::visibility::trees::SUBMISSIONS)
            .unwrap()
            .contains_key(id.as_bytes())
            .unwrap();
        if vis && e.service.detokenizer.record(&id).unwrap().is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ready.submission_id, ready.retrieve_key, submit_key)
}

fn header(kind: EventKind, site: &str, conv: &str) -> EventHeader {
    EventHeader::new(kind, uuid::Uuid::new_v4(), now_ms(), site, conv, conv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_matrix_with_one_audit_event_per_attempt() {
    let mut e = env().await;
    let (sub, key, submit_key) = submitted_form(&e, "acme", "conv-1", "form-1", "alice").await;
    let (beta_sub, beta_key, _) = submitted_form(&e, "beta", "conv-b", "form-b", "alice").await;
    let mut expected: Vec<(&str, &str)> = Vec::new();
    fn check(
        expected: &mut Vec<(&'static str, &'static str)>,
        got: (u16, Value),
        status: u16,
        code: &'static str,
        outcome: &'static str,
    ) {
        assert_eq!(got.0, status, "{code}: {}", got.1);
        if outcome == "denied" {
            assert_eq!(got.1["error"], code, "{}", got.1);
        }
        expected.push((outcome, code));
    }

    check(&mut expected, e.retrieve(&sub, Some(&agent("bob", "s-bob")), &key).await, 403, "not_sender", "denied");
    check(
        &mut expected,
        e.retrieve(&sub, Some(&token("alice", "acme", &[], &["agent"], "s-a", 600, SECRET)), &key).await,
        403,
        "permission_denied",
        "denied",
    );
    check(
        &mut expected,
        e.retrieve(&sub, Some(&token("alice", "acme", &["use_secure_form"], &["agent"], "s-a", 600, "forged")), &key)
            .await,
        401,
        "token_invalid",
        "denied",
    );
    check(
        &mut expected,
        e.retrieve(&sub, Some(&token("alice", "acme", &["use_secure_form"], &["agent"], "s-a", -10, SECRET)), &key)
            .await,
        401,
        "token_expired",
        "denied",
    );
    check(&mut expected, e.retrieve(&sub, None, &key).await, 401, "token_missing", "denied");
    check(
        &mut expected,
        e.retrieve(&sub, Some(&agent("alice", "s-a")), &submit_key).await,
        403,
        "wrong_purpose",
        "denied",
    );
    check(&mut expected, e.retrieve(&sub, Some(&agent("alice", "s-a")), &beta_key).await, 403, "invalid_key", "denied");
    // A key and submission of another site, with an acme token.
    let (s, body) = e.retrieve(&beta_sub, Some(&agent("alice", "s-a")), &beta_key).await;
    assert_eq!((s, body["error"].as_str()), (403, Some("wrong_site")));

    // The sender, live conversation: the answers, with the CVV still in memory.
    let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["answers"]["pan"], "4111111111111111");
    assert_eq!(body["answers"]["cardholder"], "Ada");
    assert_eq!(body["off_record"]["state"], "present");
    assert_eq!(body["off_record"]["answers"]["cvv"], "737");
    expected.push(("granted", ""));
    check(&mut expected, e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await, 403, "key_spent", "denied");

    // A fresh key is not for the token alone: the caller must hold a key issued for the submission.
    let fresh_path = format!("/api/v1/submissions/{sub}/retrieve-key");
    let (status, body) = e.post(&fresh_path, Some(&agent("alice", "s-a")), json!({})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_body")), "{body}");
    let (status, body) =
        e.post(&fresh_path, Some(&agent("alice", "s-a")), json!({ "previous_key": "AAAAAAAAAAAAAAAAAAAAAA" })).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("invalid_key")), "a guessed key: {body}");
    let (status, body) = e.post(&fresh_path, Some(&agent("alice", "s-a")), json!({ "previous_key": beta_key })).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("invalid_key")), "another submission's key: {body}");
    // A fresh key for the sender, who holds the (spent) key from FormReady, works once.
    let (status, fresh) = e.post(&fresh_path, Some(&agent("alice", "s-a")), json!({ "previous_key": key })).await;
    assert_eq!(status, 201, "{fresh}");
    let fresh_key = fresh["retrieve_key"].as_str().unwrap().to_string();
    // The fresh key is bound to the session that asked for it: the same agent in another session
    // is refused (once the projection has the key), and the key is not spent by that.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-other")), &fresh_key).await;
        if body["error"] == "invalid_key" {
            expected.push(("denied", "invalid_key"));
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!((status, body["error"].as_str()), (403, Some("wrong_session")), "{body}");
        expected.push(("denied", "wrong_session"));
        break;
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &fresh_key).await;
        if status == 200 {
            expected.push(("granted", ""));
            // The CVV was read once, by the first granted retrieval, and forgotten then.
            assert_eq!(body["off_record"]["state"], "expired", "{body}");
            assert_eq!(body["answers"]["pan"], "4111111111111111", "stored answers stay retrievable");
            break;
        }
        assert_eq!(body["error"], "invalid_key", "until the projection has the fresh key");
        expected.push(("denied", "invalid_key"));
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = e.post(&fresh_path, Some(&agent("bob", "s-bob")), json!({ "previous_key": key })).await;
    assert_eq!(status, 403, "only the sender gets fresh keys, even with a key");

    // Transfer and reassignment: the new holders are denied.
    e.chat(Event::ConversationTransferred(ConversationTransferred {
        header: header(EventKind::ConversationTransferred, "acme", "conv-1"),
        from_agent_id: "alice".into(),
        to_agent_id: "carol".into(),
        kind: "transfer".into(),
    }))
    .await;
    e.until_conversation("acme", "conv-1", |c| c.current_agent.as_deref() == Some("carol")).await;
    check(&mut expected, e.retrieve(&sub, Some(&agent("carol", "s-carol")), &key).await, 403, "not_sender", "denied");
    e.chat(Event::ConversationTransferred(ConversationTransferred {
        header: header(EventKind::ConversationTransferred, "acme", "conv-1"),
        from_agent_id: "carol".into(),
        to_agent_id: "dave".into(),
        kind: "reassign".into(),
    }))
    .await;
    e.until_conversation("acme", "conv-1", |c| c.current_agent.as_deref() == Some("dave")).await;
    check(&mut expected, e.retrieve(&sub, Some(&agent("dave", "s-dave")), &key).await, 403, "not_sender", "denied");

    // Manager history: responses only with the permission, never off-the-record ones.
    let (status, h) = e
        .get("/api/v1/conversations/conv-1/history", &token("meg", "acme", &[], &["agent_manager"], "s-m", 600, SECRET))
        .await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["secure_forms"][0]["responses_visible"], false);
    assert!(h["secure_forms"][0]["answers"].is_null());
    assert_eq!(h["secure_forms"][0]["note"], "a secure form was submitted; responses are hidden");
    let (status, h) = e
        .get(
            "/api/v1/conversations/conv-1/history",
            &token("meg", "acme", &["view_secure_form_responses_in_history"], &["agent_manager"], "s-m", 600, SECRET),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(h["secure_forms"][0]["answers"]["pan"], "4111111111111111");
    assert!(h["secure_forms"][0]["answers"].get("cvv").is_none(), "off the record never in history");
    expected.push(("granted", "history_view"));
    let (status, _) = e.get("/api/v1/conversations/conv-1/history", &agent("alice", "s-a")).await;
    assert_eq!(status, 403, "history is for managers");

    // An ended session revokes its tokens at once.
    e.chat(Event::AgentSessionEnded(AgentSessionEnded {
        header: header(EventKind::AgentSessionEnded, "acme", "conv-1"),
        agent_id: "alice".into(),
        session_id: "s-a".into(),
        reason: "idle_logout".into(),
    }))
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await;
        if body["error"] == "session_ended" {
            assert_eq!(status, 401);
            expected.push(("denied", "session_ended"));
            break;
        }
        expected.push(("denied", "key_spent"));
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The sender after close.
    e.chat(Event::ConversationClosed(ConversationClosed {
        header: header(EventKind::ConversationClosed, "acme", "conv-1"),
        closed_by: "agent".into(),
        reason: "resolved".into(),
    }))
    .await;
    e.until_conversation("acme", "conv-1", |c| !c.live).await;
    check(
        &mut expected,
        e.retrieve(&sub, Some(&agent("alice", "s-a2")), &key).await,
        403,
        "conversation_closed",
        "denied",
    );

    // Exactly one audit event per attempt, in order, none carrying answers.
    let mut audit = TopicReader::new(&e.prefix, Topic::AgentEvents).await;
    let n = expected.len();
    let of_sub = |rs: &[rdkafka::message::OwnedMessage]| -> Vec<secureforms::events::FormRetrieved> {
        rs.iter()
            .filter_map(|m| match Codec::get().decode(m.payload()?) {
                Ok(Event::FormRetrieved(r)) if r.submission_id == sub => Some(r),
                _ => None,
            })
            .collect()
    };
    assert!(audit.read_until(WAIT, |rs| of_sub(rs).len() >= n).await, "{n} audit events");
    let got: Vec<(String, String)> = of_sub(&audit.records).into_iter().map(|r| (r.outcome, r.reason)).collect();
    let want: Vec<(String, String)> = expected.iter().map(|(o, r)| (o.to_string(), r.to_string())).collect();
    assert_eq!(got, want);
    for m in &audit.records {
        let raw = m.payload().unwrap();
        assert!(!raw.windows(16).any(|w| w == b"4111111111111111"), "no answer in any audit event");
    }
    e.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_key_stays_spent_across_a_restart_and_the_audit_reaches_kafka() {
    let e = env().await;
    let (sub, key, _) = submitted_form(&e, "acme", "conv-r", "form-r", "alice").await;
    let (status, _) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await;
    assert_eq!(status, 200);
    // Stop at once: the FormRetrieved may not have reached Kafka, but the spent key is on disk.
    let Env { mut service, prefix, client, _dir: dir, .. } = e;
    service.stop().await;
    drop(service);
    let settings = {
        let mut s = settings(&prefix, dir.path());
        s.http_listen = Some("127.0.0.1:0".into());
        s.agent_auth.jwt_secret_file = Some(dir.path().join("jwt.secret"));
        s
    };
    let service = Service::start(settings, brokers(), system_clock()).await.unwrap();
    // Until the restarted node has caught up it answers 503 (never a grant from stale state).
    service.wait_ready(WAIT).await.expect("ready after the restart");
    let e = Env { base: format!("http://{}", service.http_addr.unwrap()), service, prefix, client, _dir: dir };
    let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("key_spent")), "{body}");
    let mut audit = TopicReader::new(&e.prefix, Topic::AgentEvents).await;
    let granted = |rs: &[rdkafka::message::OwnedMessage]| {
        rs.iter().filter(|m| matches!(Codec::get().decode(m.payload().unwrap()), Ok(Event::FormRetrieved(r)) if r.submission_id == sub && r.outcome == "granted")).count()
    };
    assert!(audit.read_until(WAIT, |rs| granted(rs) >= 1).await, "the granted retrieval's audit event was relayed");
    let deadline = std::time::Instant::now() + WAIT;
    while e.service.audit.pending() > 0 {
        assert!(std::time::Instant::now() < deadline, "the audit log drains");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut service = e.service;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_hammering_the_api_is_rate_limited_without_stopping_the_others() {
    // A burst of 60 that refills one token a minute: the outcome cannot depend on how fast this
    // machine answers the 90 requests.
    let e = env_with(|s| s.rate_limits.api_per_agent = secureforms::config::Rate { per_minute: 1, burst: 60 }).await;
    let (sub, key, _) = submitted_form(&e, "acme", "conv-rl", "form-rl", "alice").await;
    // Mallory, authenticated, tries keys as fast as she can: every refusal would be an audit write.
    let bad = "AAAAAAAAAAAAAAAAAAAAAA";
    let mallory = agent("mallory", "s-m");
    let statuses: Vec<u16> = futures::future::join_all((0..90).map(|_| e.retrieve(&sub, Some(&mallory), bad)))
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 403 || *s == 429), "{statuses:?}");
    let r = e
        .client
        .post(format!("{}/api/v1/submissions/{sub}/retrieve", e.base))
        .bearer_auth(&mallory)
        .json(&json!({ "key": bad }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "rate_limited");
    // The sender, another agent on the same client address, is not held up.
    let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await;
    assert_eq!(status, 200, "{body}");
    let mut service = e.service;
    service.stop().await;
}

/// The two proofs of issue 14, replayed against this build: whoever can write to the topics
/// re-publishes a real FormSubmitted with only the agent changed, and forges a DataKeyDestroyed for
/// the key in use. Neither carries the service's MAC, so both are dead-lettered
/// (`unauthenticated`): the sender alone still retrieves, and new submissions still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_events_are_dead_lettered_and_the_sender_alone_still_retrieves() {
    let e = env().await;
    let (sub, key, _) = submitted_form(&e, "acme", "conv-forged", "form-forged", "alice").await;
    let mut subs = TopicReader::new(&e.prefix, Topic::Submissions).await;
    assert!(
        subs.read_until(WAIT, |r| r.iter().any(|m| matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::FormSubmitted(s))) if s.submission_id == sub)))
            .await
    );
    let real = subs
        .events()
        .into_iter()
        .find_map(|ev| if let Event::FormSubmitted(s) = ev { (s.submission_id == sub).then_some(s) } else { None })
        .unwrap();
    let key_id = real.key_id.clone();
    let mut forged = real.clone();
    forged.agent_id = "mallory".into();
    let bus = producer(&e.prefix).await;
    bus.send(&Event::FormSubmitted(forged)).await.unwrap();
    bus.send(&Event::DataKeyDestroyed(secureforms::events::DataKeyDestroyed {
        header: EventHeader::new(EventKind::DataKeyDestroyed, uuid::Uuid::new_v4(), now_ms(), "acme", "", &key_id),
        key_id: key_id.clone(),
        reason: "retention".into(),
    }))
    .await
    .unwrap();
    // A MAC made with another master key is no better than none.
    let stranger =
        secureforms::crypto::MasterKey::from_base64(&secureforms::crypto::MasterKey::generate_base64()).unwrap();
    let mut other = real.clone();
    other.agent_id = "mallory".into();
    other.header.event_id = uuid::Uuid::new_v4().to_string();
    producer(&e.prefix)
        .await
        .with_signer(std::sync::Arc::new(secureforms::crypto::mac::EventSigner::new(
            &secureforms::crypto::IntegrityKey::from_master(&stranger),
        )))
        .send(&Event::FormSubmitted(other))
        .await
        .unwrap();

    // Every handler that reads them refuses them: submissions are read by the tokenizer, gateway,
    // retrieval and visibility projections; keys by the keys handler.
    let mut dlq = TopicReader::new(&e.prefix, Topic::DeadLetters).await;
    let unauthenticated = |r: &[rdkafka::message::OwnedMessage]| {
        r.iter()
            .filter(|m| matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::DeadLetter(d))) if d.error_kind == "unauthenticated"))
            .count()
    };
    assert!(
        dlq.read_until(WAIT, |r| unauthenticated(r) >= 9).await,
        "4 handlers x 2 forged submissions + the keys handler"
    );
    assert!(e.service.ring.get(&key_id).is_ok(), "the data key is not destroyed");

    // The sender alone retrieves; the agent named in the forgery is refused.
    let (status, body) = e.retrieve(&sub, Some(&agent("mallory", "s-m")), &key).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("not_sender")), "{body}");
    let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["answers"]["pan"], "4111111111111111");
    // New submissions for the site still work (the key in use was not destroyed).
    let (next, next_key, _) = submitted_form(&e, "acme", "conv-after", "form-after", "alice").await;
    let (status, body) = e.retrieve(&next, Some(&agent("alice", "s-a")), &next_key).await;
    assert_eq!(status, 200, "{body}");
}

/// Every FormRetrieved carries its node's chain link; `secureforms audit verify` passes on the
/// topic as the service wrote it and fails, naming the record, once an edited copy is on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_verifies_end_to_end_and_an_edit_is_reported() {
    let e = env().await;
    let (sub, key, _) = submitted_form(&e, "acme", "conv-audit", "form-audit", "alice").await;
    assert_eq!(e.retrieve(&sub, Some(&agent("bob", "s-b")), &key).await.0, 403);
    assert_eq!(e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await.0, 200);
    assert_eq!(e.retrieve(&sub, Some(&agent("alice", "s-a")), &key).await.0, 403);
    let mut events = TopicReader::new(&e.prefix, Topic::AgentEvents).await;
    let retrieved = |r: &[rdkafka::message::OwnedMessage]| -> Vec<secureforms::events::FormRetrieved> {
        r.iter()
            .filter_map(|m| match m.payload().map(|p| Codec::get().decode(p)) {
                Some(Ok(Event::FormRetrieved(f))) => Some(f),
                _ => None,
            })
            .collect()
    };
    assert!(events.read_until(WAIT, |r| retrieved(r).len() >= 3).await);
    let chain: Vec<_> = retrieved(&events.records);
    let seqs: Vec<i64> = chain.iter().map(|r| r.chain.as_ref().expect("every record is linked").seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "one chain, in the order recorded");

    let verify = || {
        std::process::Command::new(bin())
            .args(["audit", "verify", "--brokers", &brokers(), "--topic-prefix", &e.prefix, "--master-key-file"])
            .arg(master_key_file(e._dir.path()))
            .env_remove("SECUREFORMS_CONFIG")
            .output()
            .unwrap()
    };
    let o = verify();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success() && out.contains("3 records, seq 1 to 3") && out.contains("intact"), "{out}");

    // Someone with write access rewrites a refusal as a grant.
    let mut edited = chain[0].clone();
    edited.outcome = "granted".into();
    edited.reason = String::new();
    producer(&e.prefix).await.send(&Event::FormRetrieved(edited)).await.unwrap();
    let o = verify();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("seq 1") && out.contains("altered"), "{out}");
}

/// A FormReady key belongs to the agent session the form was sent from (FormSent v3): a token of
/// another open session of the same agent, holding the key read off the topic, gets neither the
/// answers nor a fresh key. Once that session has ended, the agent's new session gets a fresh key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_ready_key_belongs_to_the_session_the_form_was_sent_from() {
    let e = env().await;
    let (sub, key, _) = submitted_form_in(&e, "acme", "conv-sess", "form-sess", "alice", Some("s-desk")).await;
    let fresh_path = format!("/api/v1/submissions/{sub}/retrieve-key");
    let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-other")), &key).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("wrong_session")), "{body}");
    let (status, body) = e.post(&fresh_path, Some(&agent("alice", "s-other")), json!({ "previous_key": key })).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("wrong_session")), "{body}");
    // The refusals spent nothing: the desk session retrieves with the same key.
    let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-desk")), &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["answers"]["pan"], "4111111111111111");

    // The desk session ends (logout); from then on the agent's new session may move on.
    e.chat(Event::AgentSessionEnded(AgentSessionEnded {
        header: header(EventKind::AgentSessionEnded, "acme", "conv-sess"),
        agent_id: "alice".into(),
        session_id: "s-desk".into(),
        reason: "logout".into(),
    }))
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-desk")), &key).await;
        if (status, body["error"].as_str()) == (401, Some("session_ended")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the session end never arrived: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = e.post(&fresh_path, Some(&agent("alice", "s-new")), json!({ "previous_key": key })).await;
    assert_eq!(status, 201, "{body}");
    let fresh = body["retrieve_key"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = e.retrieve(&sub, Some(&agent("alice", "s-new")), &fresh).await;
        if status == 200 {
            assert_eq!(body["answers"]["pan"], "4111111111111111");
            break;
        }
        assert_eq!(body["error"], "invalid_key", "until the projection has the fresh key: {body}");
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
