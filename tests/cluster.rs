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
