//! Readiness and lag. At start the node reads each of its handlers' partitions' high watermarks; it
//! is ready once every handler has applied up to them (state rebuilt, nothing old left to apply).
//! After that the same loop keeps the consumer lag gauges current.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::sync::watch;

use crate::kafka::runtime::stored_offset;
use crate::kafka::{ADMIN_TIMEOUT, KafkaError};
use crate::node::Node;
use crate::topics::Topic;

/// (topic name, partition) -> (low, high) watermarks.
pub type Watermarks = BTreeMap<(String, i32), (i64, i64)>;

/// Reads the watermarks of every partition of `topics` with the node's watermark client (blocking
/// calls; run off the async threads).
pub fn watermarks(node: &Node, topics: &[Topic]) -> Result<Watermarks, KafkaError> {
    let consumer = node.watermark_client()?;
    let settings = &node.kafka;
    let mut out = BTreeMap::new();
    for topic in topics {
        let name = settings.names.name(*topic);
        let md = consumer.fetch_metadata(Some(&name), ADMIN_TIMEOUT).map_err(|e| settings.client_error(e))?;
        let partitions = md.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len()).unwrap_or(0);
        for p in 0..partitions as i32 {
            let w = consumer.fetch_watermarks(&name, p, ADMIN_TIMEOUT).map_err(|e| settings.client_error(e))?;
            out.insert((name.clone(), p), w);
        }
    }
    Ok(out)
}

/// Per handler, topic and partition it is responsible for on this node (every partition for state
/// every node reads whole, the owned ones for conversation-keyed state): the next offset it will
/// apply (its position).
pub fn positions(node: &Node, marks: &Watermarks) -> Result<BTreeMap<(&'static str, String, i32), i64>, KafkaError> {
    let mut out = BTreeMap::new();
    let (owned, alone) = (node.ownership.owned(), node.ownership.is_alone());
    for h in &node.handlers {
        let group = &h.group;
        let mine = |p: i32| h.scope == crate::kafka::runtime::Scope::EveryNode || alone || owned.contains(&p);
        for t in &h.topics {
            let name = node.kafka.names.name(*t);
            for ((topic, p), (low, _)) in
                marks.range((name.clone(), i32::MIN)..=(name.clone(), i32::MAX)).filter(|((_, p), _)| mine(*p))
            {
                let pos = stored_offset(&h.store, group, topic, *p)?.unwrap_or(*low).max(*low);
                out.insert((h.name, topic.clone(), *p), pos);
            }
        }
    }
    Ok(out)
}

/// Whether every position has reached the high watermark it is compared with.
pub fn caught_up(positions: &BTreeMap<(&'static str, String, i32), i64>, marks: &Watermarks) -> bool {
    positions.iter().all(|((_, topic, p), pos)| marks.get(&(topic.clone(), *p)).is_none_or(|(_, high)| pos >= high))
}

/// The handlers not yet holding what they should: an every-node handler without its partitions, or
/// the owners consumer without its share (see `Ownership::is_assigned`: an empty share counts only
/// while other nodes own every partition; a replay or operations replica needs them all).
fn holding(node: &Node) -> Vec<&'static str> {
    node.handlers
        .iter()
        .filter(|h| match h.scope {
            crate::kafka::runtime::Scope::EveryNode => node.metrics.assigned(h.name) == 0,
            crate::kafka::runtime::Scope::Partitioned => !node.ownership.is_assigned(),
        })
        .map(|h| h.name)
        .collect()
}

fn node_topics(node: &Node) -> Vec<Topic> {
    let mut topics: Vec<Topic> = node.handlers.iter().flat_map(|h| h.topics.iter().copied()).collect();
    topics.sort_by_key(|t| t.suffix());
    topics.dedup();
    topics
}

/// Why the readiness task stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("reading the watermarks stopped unexpectedly: {0}")]
    Join(#[from] tokio::task::JoinError),
}

async fn read_marks(node: &Arc<Node>) -> Result<Watermarks, ReadinessError> {
    let (node, topics) = (node.clone(), node_topics(node));
    Ok(tokio::task::spawn_blocking(move || watermarks(&node, &topics)).await??)
}

/// Marks the node ready once caught up with the watermarks read at start, then keeps lag gauges
/// current until `stop`.
pub async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) -> Result<(), ReadinessError> {
    let start_marks = loop {
        match read_marks(&node).await {
            Ok(m) => break m,
            Err(error) => {
                tracing::warn!(%error, "cannot read topic watermarks yet; /readyz stays 503 until the brokers answer");
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let started = std::time::Instant::now();
    let mut warned = false;
    loop {
        let pos = positions(&node, &start_marks)?;
        for ((handler, topic, p), at) in &pos {
            let high = start_marks.get(&(topic.clone(), *p)).map(|(_, h)| *h).unwrap_or(*at);
            node.metrics.set_lag(handler, topic, *p, (high - at).max(0));
        }
        let holding = holding(&node).is_empty();
        if holding && caught_up(&pos, &start_marks) {
            node.metrics.set_ready();
            tracing::info!(ms = started.elapsed().as_millis() as u64, "projections caught up; ready");
            break;
        }
        if !warned && started.elapsed() > Duration::from_secs(60) {
            warned = true;
            let behind = pos
                .iter()
                .filter(|((_, t, p), o)| start_marks.get(&(t.clone(), *p)).is_some_and(|(_, h)| *o < h))
                .count();
            tracing::warn!(
                partitions_behind = behind,
                "still catching up after 60 s; /readyz stays 503 (check consumer_lag in /metrics and the broker)"
            );
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    // Ready is not for ever: it holds while every handler holds partitions (a consumer left without
    // them serves nothing new) and the brokers answer. Lag gauges every 5 s, holdings every second.
    let mut tick: u64 = 0;
    let mut brokers_answer = true;
    loop {
        if tick.is_multiple_of(5) {
            match read_marks(&node).await {
                Ok(marks) => {
                    brokers_answer = true;
                    for ((handler, topic, p), pos) in positions(&node, &marks)? {
                        let high = marks.get(&(topic.clone(), p)).map(|(_, h)| *h).unwrap_or(pos);
                        node.metrics.set_lag(handler, &topic, p, (high - pos).max(0));
                    }
                }
                Err(error) => {
                    if brokers_answer {
                        tracing::warn!(%error, "cannot read topic watermarks; not ready until the brokers answer");
                    }
                    brokers_answer = false;
                }
            }
        }
        let idle = holding(&node);
        let ready = brokers_answer && idle.is_empty();
        if ready != node.metrics.is_ready() {
            if ready {
                tracing::info!("ready again");
            } else {
                tracing::warn!(brokers_answer, idle_handlers = ?idle, "not ready: a handler holds no partitions or the brokers do not answer");
            }
            node.metrics.set_readiness(ready);
        }
        tick += 1;
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_means_every_position_at_its_start_watermark() {
        let marks: Watermarks = [(("t".to_string(), 0), (0, 5)), (("t".to_string(), 1), (0, 0))].into();
        let mut pos: BTreeMap<(&'static str, String, i32), i64> =
            [(("h", "t".to_string(), 0), 4), (("h", "t".to_string(), 1), 0)].into();
        assert!(!caught_up(&pos, &marks));
        pos.insert(("h", "t".to_string(), 0), 5);
        assert!(caught_up(&pos, &marks));
    }
}
