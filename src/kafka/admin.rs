//! Topic administration: what the broker has, and `topics apply`.

use std::collections::BTreeMap;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{ADMIN_TIMEOUT, BrokerKind, KafkaError, KafkaSettings};
use crate::topics::{ObservedTopic, TopicAction, TopicNames, plan};

pub struct Admin {
    client: AdminClient<DefaultClientContext>,
    settings: KafkaSettings,
}

impl Admin {
    pub fn new(settings: &KafkaSettings) -> Result<Admin, KafkaError> {
        let client = settings.client_config().create().map_err(|e| settings.client_error(e))?;
        Ok(Admin { client, settings: settings.clone() })
    }

    /// The broker implementation: as configured, or asked of the broker. Apache Kafka describes its
    /// log cleaner among the broker configs (`log.cleaner.enable`); a broker that does not is treated
    /// like tansu (no compaction, no `retention.ms=-1`), which errs on the side of keeping data.
    pub async fn broker_kind(&self) -> Result<BrokerKind, KafkaError> {
        if let Some(kind) = self.settings.kind {
            return Ok(kind);
        }
        let client = self.client.inner();
        let md = tokio::task::block_in_place(|| client.fetch_metadata(None, ADMIN_TIMEOUT))
            .map_err(|e| self.settings.client_error(e))?;
        let Some(broker) = md.brokers().first().map(|b| b.id()) else {
            return Err(KafkaError::Topic {
                topic: "(cluster)".into(),
                message: "the metadata lists no broker".into(),
            });
        };
        let spec = [ResourceSpecifier::Broker(broker)];
        let described =
            self.client.describe_configs(&spec, &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT))).await;
        // A refusal for want of a grant is not "tansu". The whole request refused is an error.
        // A refused resource cannot be told from tansu's answer: librdkafka's per-resource error is
        // not passed on by rdkafka, and both come back with no entries. That case is warned about,
        // with what to do.
        const GRANT_OR_SET: &str = "grant this user DescribeConfigs on the cluster (docker/kafka-acls.sh does), or set broker_kind (--broker-kind, SECUREFORMS_BROKER_KIND)";
        let refused = |code: &rdkafka::types::RDKafkaErrorCode| {
            use rdkafka::types::RDKafkaErrorCode as C;
            matches!(code, C::ClusterAuthorizationFailed | C::TopicAuthorizationFailed)
        };
        let kafka = match described {
            Ok(results) => {
                let described: Vec<_> = results.into_iter().filter_map(Result::ok).collect();
                if described.iter().all(|r| r.entries.is_empty()) {
                    tracing::warn!(
                        broker,
                        "the broker described no configuration, so it is taken for tansu; if it is Apache Kafka, this user may not describe the cluster: {GRANT_OR_SET}"
                    );
                }
                described.iter().any(|r| r.entries.iter().any(|e| e.name == "log.cleaner.enable"))
            }
            Err(rdkafka::error::KafkaError::AdminOp(code)) if refused(&code) => {
                return Err(KafkaError::Topic {
                    topic: "(cluster)".into(),
                    message: format!(
                        "describing the broker's configuration, which tells Apache Kafka from tansu, was refused ({code}): {GRANT_OR_SET}"
                    ),
                });
            }
            Err(error) => {
                tracing::debug!(%error, "broker configs not described; taking the broker for tansu");
                false
            }
        };
        let kind = if kafka { BrokerKind::Kafka } else { BrokerKind::Tansu };
        tracing::debug!(kind = kind.name(), "broker kind detected");
        Ok(kind)
    }

    /// Every topic the broker has, with partition counts.
    pub async fn topic_partitions(&self) -> Result<BTreeMap<String, i32>, KafkaError> {
        let client = self.client.inner();
        let md = tokio::task::block_in_place(|| client.fetch_metadata(None, ADMIN_TIMEOUT))
            .map_err(|e| self.settings.client_error(e))?;
        Ok(md.topics().iter().map(|t| (t.name().to_string(), t.partitions().len() as i32)).collect())
    }

    /// Our topics as the broker has them, configs included where the broker describes them.
    pub async fn observe(&self, names: &TopicNames) -> Result<BTreeMap<String, ObservedTopic>, KafkaError> {
        let partitions = self.topic_partitions().await?;
        let mut out = BTreeMap::new();
        for (name, count) in partitions {
            if names.parse(&name).is_none() {
                continue;
            }
            let spec = [ResourceSpecifier::Topic(&name)];
            let configs = match self
                .client
                .describe_configs(&spec, &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)))
                .await
            {
                Ok(results) => results.into_iter().next().and_then(|r| r.ok()).map(|res| {
                    res.entries.into_iter().filter_map(|e| e.value.map(|v| (e.name, v))).collect::<BTreeMap<_, _>>()
                }),
                Err(error) => {
                    tracing::warn!(%error, topic = %name, "broker did not describe topic configs; drift in configs is not checked");
                    None
                }
            };
            out.insert(name, ObservedTopic { partitions: count, configs });
        }
        Ok(out)
    }

    /// Creates missing topics and reports drift. Idempotent; a topic another node created meanwhile
    /// counts as present.
    /// What is wrong with the co-partitioning of the conversation-keyed topics, if anything (see
    /// [`crate::topics::co_partitioning`]).
    pub async fn co_partitioning(&self) -> Result<Option<String>, KafkaError> {
        let names = &self.settings.names;
        Ok(crate::topics::co_partitioning(names, &self.observe(names).await?))
    }

    pub async fn apply(&self, replication_factor: i32) -> Result<Vec<TopicAction>, KafkaError> {
        let names = &self.settings.names;
        let kind = self.broker_kind().await?;
        let actions = plan(names, &self.observe(names).await?, kind);
        let creates: Vec<_> = actions
            .iter()
            .filter_map(|a| {
                if let TopicAction::Create { name, spec } = a {
                    Some((name.clone(), spec.configs(kind), spec.partitions))
                } else {
                    None
                }
            })
            .collect();
        if !creates.is_empty() {
            let new_topics: Vec<NewTopic<'_>> = creates
                .iter()
                .map(|(name, configs, partitions)| {
                    configs.iter().fold(
                        NewTopic::new(name, *partitions, TopicReplication::Fixed(replication_factor)),
                        |t, (k, v)| t.set(k, v),
                    )
                })
                .collect();
            let results = self
                .client
                .create_topics(&new_topics, &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)))
                .await
                .map_err(|e| self.settings.client_error(e))?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => {
                        return Err(KafkaError::Topic { topic, message: format!("create failed: {code}") });
                    }
                }
            }
        }
        Ok(actions)
    }
}
