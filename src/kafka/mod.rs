//! Kafka adapters: client configuration, the idempotent event producer, topic administration and the
//! consumer runtime that gives handlers exactly-once effects.

pub mod admin;
pub mod producer;
pub mod reader;
pub mod runtime;

use std::time::Duration;

use rdkafka::ClientConfig;

pub use producer::EventProducer;
pub use runtime::{ApplyError, Handler, RecordMeta};

use crate::topics::TopicNames;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client's error and what to check.
    #[error("kafka client error: {0}; {1}")]
    Client(#[source] rdkafka::error::KafkaError, String),
    #[error("could not deliver to {topic}: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot encode event: {0}")]
    Codec(#[from] crate::events::CodecError),
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
    #[error("topic {0} does not exist; run `secureforms topics apply`")]
    NoSuchTopic(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub use crate::topics::BrokerKind;

/// Where the cluster is and how our topics are named.
#[derive(Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// The broker implementation, when known (configuration or the embedded default); `None` asks
    /// the broker (see `admin::Admin::broker_kind`).
    pub kind: Option<BrokerKind>,
    pub names: TopicNames,
    pub group_prefix: String,
    pub client_id: String,
    /// This node's id (per-node consumer groups).
    pub node_id: String,
    /// Most records applied in one batch.
    pub max_batch: usize,
    /// librdkafka properties for every client, applied last so they win over the service's own
    /// (TLS and SASL settings, tuning). From `kafka_properties` in the configuration.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl KafkaSettings {
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // Small requests go out at once: every hop of the flow is awaited by someone.
            .set("socket.nagle.disable", "true")
            // librdkafka logs through our `log` bridge at warn and above only.
            .set("log_level", "4");
        self.finish(c)
    }

    /// Applies the configured properties over whatever a client set for itself.
    pub fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The client properties with the values of secret ones (passwords, private keys) hidden.
    pub fn redacted_properties(&self) -> std::collections::BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "ssl.key.pem", "private"].iter().any(|s| k.contains(s));
                (k.clone(), if secret { "<redacted>".to_string() } else { v.clone() })
            })
            .collect()
    }

    pub fn group_id(&self, handler: &str) -> String {
        format!("{}-{}", self.group_prefix, handler)
    }

    /// A handler's consumer group: shared by the nodes of a deployment, or this node's own for a
    /// handler every node runs whole.
    pub fn handler_group(&self, handler: &str, scope: runtime::Scope) -> String {
        match scope {
            runtime::Scope::Partitioned => self.group_id(handler),
            runtime::Scope::EveryNode => format!("{}-{}-node-{}", self.group_prefix, handler, self.node_id),
        }
    }

    pub fn client_error(&self, e: rdkafka::error::KafkaError) -> KafkaError {
        let protocol = self.properties.get("security.protocol").filter(|p| !p.eq_ignore_ascii_case("plaintext"));
        KafkaError::Client(e, format!("check the brokers ({}) are reachable{}", self.brokers, auth_hint(protocol)))
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("kind", &self.kind)
            .field("group_prefix", &self.group_prefix)
            .field("client_id", &self.client_id)
            .field("node_id", &self.node_id)
            .field("max_batch", &self.max_batch)
            .field("properties", &self.redacted_properties())
            .finish_non_exhaustive()
    }
}

/// What to check besides reachability when the clients use TLS or SASL: librdkafka reports a refused
/// login or an untrusted certificate as a transport failure.
fn auth_hint(protocol: Option<&String>) -> String {
    match protocol {
        Some(p) => format!(
            " and that the {p} settings are right: sasl.username and its password (SECUREFORMS_KAFKA_PASSWORD), sasl.mechanisms, and ssl.ca.location for the brokers' certificate"
        ),
        None => String::new(),
    }
}

/// How long admin and metadata calls may take.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
