//! The sessions projection: which agent sessions the chat bus ended (logout, idle logout). Every node
//! needs all of them, whatever partitions it owns: a token of an ended session is refused on every
//! node. So this handler reads the chat bus's topic whole on every node (a consumer group of its own
//! per node, [`Scope::EveryNode`]).

use crate::events::Event;
use crate::handlers::issuer::form_key;
use crate::kafka::runtime::Scope;
use crate::kafka::{ApplyError, Handler, RecordMeta};
use crate::store::{Store, StoreError, Tx};
use crate::topics::Topic;

/// `site \0 session` -> empty: sessions the chat bus ended.
pub const ENDED_TREE: &str = "sessions.ended";

#[derive(Default)]
pub struct SessionsProjection;

impl Handler for SessionsProjection {
    fn name(&self) -> &'static str {
        "sessions"
    }

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::ChatEvents]
    }

    fn scope(&self) -> Scope {
        Scope::EveryNode
    }

    fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        event: &Event,
        _meta: &RecordMeta,
        _now_ms: i64,
    ) -> Result<Vec<Event>, ApplyError> {
        if let Event::AgentSessionEnded(e) = event {
            tx.insert(ENDED_TREE, form_key(&e.header.site_id, &e.session_id), Vec::new());
        }
        Ok(vec![])
    }
}

/// The projection's read side. An unreadable store is an error: never "still open".
#[derive(Clone)]
pub struct SessionsView {
    store: Store,
}

impl SessionsView {
    pub fn new(store: Store) -> SessionsView {
        SessionsView { store }
    }

    /// Whether the chat bus ended an agent session.
    pub fn ended(&self, site: &str, session: &str) -> Result<bool, StoreError> {
        Ok(self.store.tree(ENDED_TREE)?.contains_key(form_key(site, session))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AgentSessionEnded, EventKind};
    use crate::handlers::given::{Given, header};

    #[test]
    fn an_ended_session_is_ended_for_its_site_only_and_every_node_reads_the_whole_topic() {
        let mut g = Given::new(SessionsProjection);
        assert_eq!(g.handler.scope(), Scope::EveryNode);
        let view = SessionsView::new(g.store.clone());
        assert!(!view.ended("acme", "s-1").unwrap());
        g.when(&Event::AgentSessionEnded(AgentSessionEnded {
            header: header(EventKind::AgentSessionEnded, "acme", "c1", "c1"),
            agent_id: "alice".into(),
            session_id: "s-1".into(),
            reason: "logout".into(),
        }))
        .unwrap();
        assert!(view.ended("acme", "s-1").unwrap());
        assert!(!view.ended("beta", "s-1").unwrap());
    }
}
