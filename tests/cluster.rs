//! Several nodes of one deployment on one broker: the same topics and group prefix, their own node
//! ids and data directories, one master key. State every node needs whole (data keys, ended agent
//! sessions) reaches every node, whichever node owns the partitions it arrived on (issue 13).

mod common;

use std::time::{Duration, Instant};

use common::*;
use secureforms::events::{AgentSessionEnded, Event, EventHeader, EventKind};
use secureforms::handlers::sessions::SessionsView;
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;

const WAIT: Duration = Duration::from_secs(60);

async fn node(prefix: &str, dir: &std::path::Path, id: &str, master: &std::path::Path) -> Service {
    let mut s = settings(prefix, dir);
    s.node_id = id.into();
    s.master_key_file = Some(master.to_path_buf());
    let service = Service::start(s, brokers(), system_clock()).await.expect("node starts");
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
