//! Running as a cluster (ADR 22). One node owns partition p of every conversation-keyed topic at a
//! time (the owners consumer group, `kafka::runtime::Ownership`); it says so on the nodes topic,
//! which every node reads whole (`handlers::directory`); any node takes any request and forwards it
//! to the owner (`http::route`, authenticated by `crypto::hop`). This module holds the node's side
//! of it: announcing what it owns, and waiting until its state has caught up with what a requester
//! can have seen (read-your-writes).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::sync::watch;

use crate::events::{Event, EventHeader, EventKind, NodeAnnounced};
use crate::kafka::runtime::stored_offset;
use crate::kafka::{ADMIN_TIMEOUT, KafkaError};
use crate::node::Node;
use crate::store::StoreError;

/// How long a request waits for this node to catch up before it gets 503 with Retry-After.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(3);

/// The handlers whose state the visitor's requests read (form key state).
pub const VISITOR_STATE: &[&str] = &["gateway"];
/// The handlers whose state an agent's retrieval reads: who sent what, the vault, the keys.
pub const RETRIEVAL_STATE: &[&str] = &["visibility", "tokenizer", "retrieval"];

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("this node has not applied partition {partition} up to what the brokers hold within {ms} ms")]
    Behind { partition: i32, ms: u128 },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the watermarks stopped unexpectedly: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Waits until `handlers` have applied, on `partition`, everything the brokers held when this was
/// called: state that includes whatever the requester can have seen (a link on form-links, a
/// FormReady on agent-events, a submission acknowledged by another node before the partition moved
/// here). At most [`CATCH_UP_WAIT`]; then `Behind`, which requests answer with 503 and
/// Retry-After, never with a refusal. A request that names no partition (no key we issued, no
/// known form) does not wait: nothing it could have seen is missing, and a stranger's garbage must
/// not cost broker round trips.
pub async fn catch_up(node: &Node, handlers: &[&str], partition: i32) -> Result<(), CatchUpError> {
    let started = std::time::Instant::now();
    // Each (handler, topic) the request's answer depends on.
    let reads: Vec<(&crate::node::HandlerInfo, String)> = node
        .handlers
        .iter()
        .filter(|h| handlers.contains(&h.name))
        .flat_map(|h| h.topics.iter().map(move |t| (h, node.kafka.names.name(*t))))
        .collect();
    if reads.is_empty() {
        return Ok(());
    }
    let mut topics: Vec<String> = reads.iter().map(|(_, t)| t.clone()).collect();
    topics.sort();
    topics.dedup();
    let client = node.watermark_client()?;
    let highs: std::collections::HashMap<String, i64> = tokio::task::spawn_blocking(move || {
        topics
            .into_iter()
            .map(|t| client.fetch_watermarks(&t, partition, ADMIN_TIMEOUT).map(|(_, high)| (t, high)))
            .collect::<Result<_, _>>()
    })
    .await?
    .map_err(|e| node.kafka.client_error(e))?;
    let deadline = started + CATCH_UP_WAIT;
    loop {
        let mut behind = false;
        for (h, topic) in &reads {
            if stored_offset(&h.store, &h.group, topic, partition)?.unwrap_or(0) < highs[topic] {
                behind = true;
                break;
            }
        }
        if !behind {
            node.metrics.caught_up("caught_up");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            node.metrics.caught_up("timed_out");
            tracing::warn!(
                partition,
                ms = started.elapsed().as_millis() as u64,
                "a request waited for this node to catch up and got 503; if this repeats, check consumer_lag in /metrics"
            );
            return Err(CatchUpError::Behind { partition, ms: started.elapsed().as_millis() });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The URL other nodes forward to: `advertise_url`, else the gateway's bound address.
pub fn advertise_url(node: &Node, bound: Option<std::net::SocketAddr>, https: bool) -> Option<String> {
    if let Some(u) = &node.settings.advertise_url {
        return Some(u.trim_end_matches('/').to_string());
    }
    let addr = bound?;
    if addr.ip().is_unspecified() {
        tracing::warn!(%addr, "the gateway listens on a wildcard address and advertise_url is not set: other nodes are told 127.0.0.1, which works only on this machine; set advertise_url");
    }
    let ip = if addr.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { addr.ip() };
    let host = std::net::SocketAddr::new(ip, addr.port());
    Some(format!("{}://{host}", if https { "https" } else { "http" }))
}

/// Writes this node's entry in the directory: its URL and the partitions it owns now.
pub async fn announce(node: &Node, url: &str, leaving: bool) -> Result<(), KafkaError> {
    let partitions = if leaving { Vec::new() } else { node.ownership.owned() };
    let id = &node.settings.node_id;
    let event = Event::NodeAnnounced(NodeAnnounced {
        header: EventHeader::new(EventKind::NodeAnnounced, uuid::Uuid::new_v4(), (node.clock)(), "", id, id),
        node_id: id.clone(),
        url: url.to_string(),
        partitions: partitions.clone(),
        partition_count: node.partitions,
        leaving,
    });
    node.producer.send(&event).await?;
    tracing::info!(node_id = %id, %url, ?partitions, leaving, "announced this node's partitions");
    Ok(())
}

/// Announces this node's partitions whenever the group assigns them, and that it leaves when it
/// stops. An unassigned moment (during a rebalance) is not announced: the old claim stands until a
/// new assignment replaces it, and a request forwarded meanwhile waits or gets 503.
pub async fn run_announcer(node: Arc<Node>, url: String, mut stop: watch::Receiver<bool>) -> Result<(), KafkaError> {
    let mut changes = node.ownership.subscribe();
    let mut announced: Option<Vec<i32>> = None;
    loop {
        if node.ownership.is_assigned() && announced.as_deref() != Some(node.ownership.owned().as_slice()) {
            let now = node.ownership.owned();
            match announce(&node, &url, false).await {
                Ok(()) => announced = Some(now),
                Err(error) => {
                    tracing::warn!(%error, "cannot announce this node's partitions yet; other nodes keep forwarding by the last announcement (check the brokers)");
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    if let Err(error) = announce(&node, &url, true).await {
        tracing::warn!(%error, "could not announce that this node leaves; its partitions are routed to it until their new owner announces them");
    }
    Ok(())
}
