//! Topics as code: each file in `topics/` declares one topic. The specs are compiled into the binary;
//! `secureforms topics apply` creates what is missing and reports drift, `topics list` shows them.
//! The comparison is pure ([`plan`]); talking to the broker is in `kafka::admin`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Which broker implementation the cluster runs. Topic settings differ where the brokers differ
/// (ADR 13): tansu 0.6.0 reads `retention.ms=-1` as "delete now" and does not compact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// Apache Kafka (production), or any broker that describes a log cleaner.
    Kafka,
    /// tansu 0.6.0, the embedded default.
    Tansu,
}

impl BrokerKind {
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::Tansu => "tansu",
        }
    }
}

impl std::str::FromStr for BrokerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<BrokerKind, String> {
        match s {
            "kafka" => Ok(BrokerKind::Kafka),
            "tansu" => Ok(BrokerKind::Tansu),
            other => Err(format!("broker kind {other:?} is not one of kafka, tansu")),
        }
    }
}

/// `retention_ms = -1` in a topic file: keep forever.
pub const FOREVER: i64 = -1;

/// What "forever" becomes on tansu 0.6.0, which reads `retention.ms=-1` as "delete now": 100 years.
pub const TANSU_FOREVER_MS: i64 = 3_155_760_000_000;

/// Topic configs only Apache Kafka's log cleaner acts on; tansu 0.6.0 neither compacts nor rolls
/// segments by these, so they are not sent to it (nothing to drift on there).
const CLEANER_CONFIGS: &[&str] = &[
    "segment.ms",
    "min.cleanable.dirty.ratio",
    "max.compaction.lag.ms",
    "min.compaction.lag.ms",
    "delete.retention.ms",
];

/// The topics the service knows. The full name is `<prefix><suffix>` (prefix from configuration,
/// `secureforms.` by default) so several deployments or test runs can share one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    ChatEvents,
    FormLinks,
    Submissions,
    AgentEvents,
    Templates,
    Keys,
    Nodes,
    DeadLetters,
}

impl Topic {
    pub const ALL: &'static [Topic] = &[
        Topic::ChatEvents,
        Topic::FormLinks,
        Topic::Submissions,
        Topic::AgentEvents,
        Topic::Templates,
        Topic::Keys,
        Topic::Nodes,
        Topic::DeadLetters,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Topic::ChatEvents => "chat-events",
            Topic::FormLinks => "form-links",
            Topic::Submissions => "submissions",
            Topic::AgentEvents => "agent-events",
            Topic::Templates => "templates",
            Topic::Keys => "keys",
            Topic::Nodes => "nodes",
            Topic::DeadLetters => "dead-letters",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Topic::ChatEvents => include_str!("../topics/chat-events.toml"),
            Topic::FormLinks => include_str!("../topics/form-links.toml"),
            Topic::Submissions => include_str!("../topics/submissions.toml"),
            Topic::AgentEvents => include_str!("../topics/agent-events.toml"),
            Topic::Templates => include_str!("../topics/templates.toml"),
            Topic::Keys => include_str!("../topics/keys.toml"),
            Topic::Nodes => include_str!("../topics/nodes.toml"),
            Topic::DeadLetters => include_str!("../topics/dead-letters.toml"),
        }
    }

    /// The declared spec. The files are compiled in and checked by the unit tests.
    pub fn spec(self) -> TopicSpec {
        let spec: TopicSpec = toml::from_str(self.source()).expect("topic spec parses (checked by unit tests)");
        debug_assert_eq!(spec.name, self.suffix());
        spec
    }

    pub fn from_suffix(s: &str) -> Option<Topic> {
        Topic::ALL.iter().copied().find(|t| t.suffix() == s)
    }
}

/// Topic names resolved with a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    pub fn new(prefix: impl Into<String>) -> TopicNames {
        TopicNames { prefix: prefix.into() }
    }

    pub fn name(&self, topic: Topic) -> String {
        format!("{}{}", self.prefix, topic.suffix())
    }

    /// The topic a full name refers to, if it is one of ours.
    pub fn parse(&self, full: &str) -> Option<Topic> {
        full.strip_prefix(&self.prefix).and_then(Topic::from_suffix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub cleanup_policy: String,
    /// Milliseconds, or -1 ([`FOREVER`]) for a topic that is never trimmed by time.
    pub retention_ms: i64,
    pub key: String,
    #[serde(default)]
    pub producers: Vec<String>,
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Further topic configs, passed to the broker as they are.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl TopicSpec {
    /// The topic configs this spec asks of a broker of `kind`: Kafka gets the declaration as it is
    /// (`retention.ms=-1` is forever); tansu gets 100 years for forever and no cleaner settings.
    pub fn configs(&self, kind: BrokerKind) -> BTreeMap<String, String> {
        let mut c = self.config.clone();
        let retention = match kind {
            BrokerKind::Tansu if self.retention_ms == FOREVER => TANSU_FOREVER_MS,
            _ => self.retention_ms,
        };
        if kind == BrokerKind::Tansu {
            c.retain(|k, _| !CLEANER_CONFIGS.contains(&k.as_str()));
        }
        c.insert("cleanup.policy".into(), self.cleanup_policy.clone());
        c.insert("retention.ms".into(), retention.to_string());
        c
    }

    /// Retention as people read it.
    pub fn retention_text(&self) -> String {
        match self.retention_ms {
            FOREVER => "forever".into(),
            ms if ms % 86_400_000 == 0 => format!("{} days", ms / 86_400_000),
            ms => format!("{ms} ms"),
        }
    }
}

/// What the broker says a topic looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedTopic {
    pub partitions: i32,
    /// `None` when the broker could not describe the configs.
    pub configs: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicAction {
    Create { name: String, spec: TopicSpec },
    UpToDate { name: String },
    Drift { name: String, differences: Vec<String> },
}

/// Compares the declared topics with what the broker has. Drift is reported, never "fixed" by
/// deleting data: partition counts and configs are changed by ops on purpose.
pub fn plan(names: &TopicNames, observed: &BTreeMap<String, ObservedTopic>, kind: BrokerKind) -> Vec<TopicAction> {
    Topic::ALL
        .iter()
        .map(|&t| {
            let name = names.name(t);
            let spec = t.spec();
            match observed.get(&name) {
                None => TopicAction::Create { name, spec },
                Some(o) => {
                    let mut differences = Vec::new();
                    if o.partitions != spec.partitions {
                        differences
                            .push(format!("partitions: declared {}, broker has {}", spec.partitions, o.partitions));
                    }
                    match &o.configs {
                        Some(configs) => {
                            for (k, v) in spec.configs(kind) {
                                match configs.get(&k) {
                                    Some(actual) if *actual == v => {}
                                    Some(actual) => differences.push(format!("{k}: declared {v}, broker has {actual}")),
                                    None => differences.push(format!("{k}: declared {v}, broker does not report it")),
                                }
                            }
                        }
                        None => differences.push("configs: broker did not describe them".into()),
                    }
                    if differences.is_empty() {
                        TopicAction::UpToDate { name }
                    } else {
                        TopicAction::Drift { name, differences }
                    }
                }
            }
        })
        .collect()
}

/// The partition the Java client's default partitioner gives a keyed record: murmur2 of the key
/// (seed 0x9747b28c), made positive, modulo the partition count. Our producers use librdkafka's
/// `murmur2_random`, which is the same for keyed records, so this is where a conversation's events
/// are, whoever produced them; `partitions` must be at least 1.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let positive = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    (positive % partitions.max(1) as u32) as i32
}

/// The partition count of the conversation-keyed topics as declared in topics/ (the broker's are
/// checked against each other at start: [`co_partitioning`]).
pub fn conversation_partitions() -> i32 {
    Topic::ChatEvents.spec().partitions
}

/// Whether the conversation-keyed topics the broker has share one partition count. They must: a
/// conversation's events are placed by murmur2 of its id modulo the partition count, and the node
/// that owns partition p of one topic must find that conversation's other events in partition p of
/// the others. Returns what is wrong, if anything.
pub fn co_partitioning(names: &TopicNames, observed: &BTreeMap<String, ObservedTopic>) -> Option<String> {
    let counts: Vec<(String, i32)> = Topic::ALL
        .iter()
        // Dead letters carry the conversation as their key but are no conversation state.
        .filter(|&&t| t.spec().key == "conversation_id" && t != Topic::DeadLetters)
        .filter_map(|&t| observed.get(&names.name(t)).map(|o| (names.name(t), o.partitions)))
        .collect();
    let first = counts.first()?.1;
    if counts.iter().all(|(_, p)| *p == first) {
        return None;
    }
    let listed = counts.iter().map(|(n, p)| format!("{n} {p}")).collect::<Vec<_>>().join(", ");
    Some(format!(
        "the conversation-keyed topics have different partition counts ({listed}): one conversation's events would land on different partition numbers; give them all the same count (add partitions on the broker, and the same number in topics/)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_conversation_topics_are_co_partitioned_and_a_broker_that_is_not_is_named() {
        let names = TopicNames::new("t.");
        let mut observed = observed_as_declared(&names, BrokerKind::Kafka);
        assert_eq!(co_partitioning(&names, &observed), None, "topics/ declares one count");
        observed.get_mut("t.submissions").unwrap().partitions = 12;
        let wrong = co_partitioning(&names, &observed).expect("reported");
        assert!(wrong.contains("t.submissions 12") && wrong.contains("t.chat-events 6"), "{wrong}");
        // The keys and templates topics are not keyed by conversation.
        let mut observed = observed_as_declared(&names, BrokerKind::Kafka);
        observed.get_mut("t.keys").unwrap().partitions = 1;
        assert_eq!(co_partitioning(&names, &observed), None);
    }

    #[test]
    fn partition_for_matches_the_java_clients_partitioner() {
        // Vectors printed by Kafka's own BuiltInPartitioner (tests/interop/Partitions.java).
        let vectors = include_str!("../tests/vectors/kafka-partitions.txt");
        let mut checked = 0;
        for line in vectors.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let mut parts = line.rsplitn(3, ' ');
            let (expected, count, key) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            let (expected, count): (i32, i32) = (expected.parse().unwrap(), count.parse().unwrap());
            assert_eq!(partition_for(key.as_bytes(), count), expected, "key {key:?} over {count} partitions");
            checked += 1;
        }
        assert!(checked > 100, "the vectors file has its {checked} lines");
    }

    fn observed_as_declared(names: &TopicNames, kind: BrokerKind) -> BTreeMap<String, ObservedTopic> {
        Topic::ALL
            .iter()
            .map(|&t| {
                (
                    names.name(t),
                    ObservedTopic { partitions: t.spec().partitions, configs: Some(t.spec().configs(kind)) },
                )
            })
            .collect()
    }

    #[test]
    fn every_spec_parses_and_names_its_file() {
        for &t in Topic::ALL {
            let spec = t.spec();
            assert_eq!(spec.name, t.suffix());
            assert!(spec.partitions >= 1, "{} has no partitions", spec.name);
            assert!(["delete", "compact"].contains(&spec.cleanup_policy.as_str()));
        }
    }

    #[test]
    fn missing_topics_are_created_present_ones_are_left_alone() {
        let names = TopicNames::new("t.");
        let mut observed = observed_as_declared(&names, BrokerKind::Kafka);
        observed.remove("t.keys");
        let actions = plan(&names, &observed, BrokerKind::Kafka);
        let creates: Vec<_> = actions
            .iter()
            .filter_map(|a| if let TopicAction::Create { name, .. } = a { Some(name.as_str()) } else { None })
            .collect();
        assert_eq!(creates, vec!["t.keys"]);
        assert_eq!(actions.iter().filter(|a| matches!(a, TopicAction::UpToDate { .. })).count(), Topic::ALL.len() - 1);
    }

    #[test]
    fn drift_in_partitions_and_configs_is_reported() {
        let names = TopicNames::new("");
        let mut observed = observed_as_declared(&names, BrokerKind::Tansu);
        let chat = observed.get_mut("chat-events").unwrap();
        chat.partitions = 3;
        chat.configs.as_mut().unwrap().insert("retention.ms".into(), "1000".into());
        let drift = plan(&names, &observed, BrokerKind::Tansu)
            .into_iter()
            .find_map(
                |a| if let TopicAction::Drift { name, differences } = a { Some((name, differences)) } else { None },
            )
            .expect("drift reported");
        assert_eq!(drift.0, "chat-events");
        assert_eq!(drift.1.len(), 2, "{:?}", drift.1);
        assert!(drift.1[0].contains("partitions: declared 6, broker has 3"));
    }

    #[test]
    fn kafka_gets_native_settings_and_tansu_only_its_workarounds() {
        let keys = Topic::Keys.spec();
        assert_eq!(keys.retention_ms, FOREVER, "the keys topic is declared as kept forever");
        let kafka = keys.configs(BrokerKind::Kafka);
        assert_eq!(kafka["retention.ms"], "-1");
        assert_eq!(kafka["cleanup.policy"], "compact");
        assert!(kafka.contains_key("min.cleanable.dirty.ratio") && kafka.contains_key("segment.ms"), "{kafka:?}");
        let tansu = keys.configs(BrokerKind::Tansu);
        assert_eq!(tansu["retention.ms"], TANSU_FOREVER_MS.to_string());
        assert!(!tansu.contains_key("min.cleanable.dirty.ratio") && !tansu.contains_key("segment.ms"), "{tansu:?}");
        // A finite retention is the same on both.
        let dlq = Topic::DeadLetters.spec();
        assert_eq!(dlq.configs(BrokerKind::Kafka)["retention.ms"], dlq.configs(BrokerKind::Tansu)["retention.ms"]);
    }

    #[test]
    fn a_topic_made_for_one_broker_kind_drifts_on_the_other() {
        let names = TopicNames::new("");
        let as_on_tansu = observed_as_declared(&names, BrokerKind::Tansu);
        let drifted: Vec<_> = plan(&names, &as_on_tansu, BrokerKind::Kafka)
            .into_iter()
            .filter_map(|a| if let TopicAction::Drift { name, .. } = a { Some(name) } else { None })
            .collect();
        // Every forever-topic has 100 years on tansu where Kafka should have -1.
        let forever: Vec<_> =
            Topic::ALL.iter().filter(|t| t.spec().retention_ms == FOREVER).map(|t| t.suffix().to_string()).collect();
        assert_eq!(drifted, forever);
    }

    #[test]
    fn names_round_trip_through_the_prefix() {
        let names = TopicNames::new("acme.");
        for &t in Topic::ALL {
            assert_eq!(names.parse(&names.name(t)), Some(t));
        }
        assert_eq!(names.parse("other.keys"), None);
    }
}
