//! The node directory: which node owns which conversation partition, and where other nodes reach it
//! (ADR 22). Every node reads the nodes topic whole ([`Scope::EveryNode`]); the topic has one
//! partition, so the announcement written last decides who owns a partition. Announcements carry
//! the service's MAC (NodeAnnounced is service-only): a forged one is a dead letter, never a route.

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::kafka::runtime::Scope;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;

/// `node id` -> [`NodeEntry`] (JSON): each node's latest announcement.
pub const NODES_TREE: &str = "directory.nodes";

/// A node as its latest announcement describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub node_id: String,
    pub url: String,
    pub partitions: Vec<i32>,
    pub partition_count: i32,
    pub leaving: bool,
    /// Offset of the announcement on the nodes topic: the later one wins a partition.
    pub offset: i64,
    pub announced_at: i64,
}

#[derive(Default)]
pub struct DirectoryProjection;

impl Handler for DirectoryProjection {
    fn name(&self) -> &'static str {
        "directory"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::Nodes]
    }

    fn scope(&self) -> Scope {
        Scope::EveryNode
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        meta: &RecordMeta,
        _now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        let Event::NodeAnnounced(n) = event else {
            return Err(ApplyError::Unprocessable(format!(
                "{} does not belong on the nodes topic",
                event.kind().name()
            )));
        };
        if n.node_id.is_empty() {
            return Err(ApplyError::Unprocessable("NodeAnnounced without a node_id".into()));
        }
        if url::Url::parse(&n.url).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true) {
            return Err(ApplyError::Unprocessable(format!(
                "NodeAnnounced of {} has url {:?}, which is not an http(s) URL",
                n.node_id, n.url
            )));
        }
        let entry = NodeEntry {
            node_id: n.node_id.clone(),
            url: n.url.trim_end_matches('/').to_string(),
            partitions: n.partitions.clone(),
            partition_count: n.partition_count,
            leaving: n.leaving,
            offset: meta.offset,
            announced_at: n.header.occurred_at,
        };
        tx.insert_json(NODES_TREE, n.node_id.as_bytes().to_vec(), &entry);
        Ok(vec![])
    }
}

/// The directory's read side.
#[derive(Clone)]
pub struct DirectoryView {
    store: Store,
}

impl DirectoryView {
    pub fn new(store: Store) -> DirectoryView {
        DirectoryView { store }
    }

    /// Every node's latest announcement.
    pub fn nodes(&self) -> Result<Vec<NodeEntry>, StoreError> {
        let mut out = Vec::new();
        for row in self.store.tree(NODES_TREE)?.iter() {
            let (_, v) = row?;
            if let Ok(e) = serde_json::from_slice::<NodeEntry>(&v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// The node that announced `partition` last, unless it has left since.
    pub fn owner_of(&self, partition: i32) -> Result<Option<NodeEntry>, StoreError> {
        Ok(owner_among(&self.nodes()?, partition))
    }
}

/// Of the announcements, the latest to claim `partition`, if its node still holds it.
pub fn owner_among(nodes: &[NodeEntry], partition: i32) -> Option<NodeEntry> {
    nodes.iter().filter(|n| !n.leaving && n.partitions.contains(&partition)).max_by_key(|n| n.offset).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, NodeAnnounced};
    use crate::handlers::given::{Given, header};

    fn announced(node: &str, partitions: &[i32], leaving: bool) -> Event {
        Event::NodeAnnounced(NodeAnnounced {
            header: header(EventKind::NodeAnnounced, "", node, node),
            node_id: node.into(),
            url: format!("http://{node}.internal:8080/"),
            partitions: partitions.to_vec(),
            partition_count: 6,
            leaving,
        })
    }

    #[test]
    fn the_latest_claim_to_a_partition_wins_and_a_leaving_node_owns_nothing() {
        let mut g = Given::new(DirectoryProjection);
        assert_eq!(g.handler.scope(), Scope::EveryNode);
        let view = DirectoryView::new(g.store.clone());
        assert_eq!(view.owner_of(0).unwrap(), None, "nobody announced");
        g.when(&announced("a", &[0, 1, 2, 3, 4, 5], false)).unwrap();
        assert_eq!(view.owner_of(4).unwrap().unwrap().node_id, "a");
        assert_eq!(view.owner_of(4).unwrap().unwrap().url, "http://a.internal:8080", "no trailing slash");
        // b joins and takes 3..5 before a has announced its smaller share: b's later claim wins.
        g.when(&announced("b", &[3, 4, 5], false)).unwrap();
        assert_eq!(view.owner_of(4).unwrap().unwrap().node_id, "b");
        assert_eq!(view.owner_of(1).unwrap().unwrap().node_id, "a");
        g.when(&announced("a", &[0, 1, 2], false)).unwrap();
        assert_eq!(view.owner_of(4).unwrap().unwrap().node_id, "b");
        // b stops cleanly: until a claims them, 3..5 have no owner (requests get 503, never a guess).
        g.when(&announced("b", &[], true)).unwrap();
        assert_eq!(view.owner_of(4).unwrap(), None);
        assert_eq!(view.nodes().unwrap().len(), 2);
    }

    #[test]
    fn an_announcement_without_a_usable_url_is_a_dead_letter() {
        let mut g = Given::new(DirectoryProjection);
        let Event::NodeAnnounced(mut n) = announced("a", &[0], false) else { unreachable!() };
        n.url = "file:///etc/passwd".into();
        assert!(matches!(g.when(&Event::NodeAnnounced(n)), Err(ApplyError::Unprocessable(_))));
        assert_eq!(DirectoryView::new(g.store.clone()).owner_of(0).unwrap(), None);
    }
}
