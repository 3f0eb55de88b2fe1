//! Configuration: service settings and the sites catalogue (sites, their PCI account policy, agent
//! profiles and form templates), from one optional TOML file, `SECUREFORMS_*` environment variables
//! and command-line flags, in that order of precedence (flags win). `config/secureforms.example.toml`
//! documents every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::domain::site::{DEFAULT_RETENTION_MONTHS, PciPolicy, Profile, SiteConfig};
use crate::domain::template::TemplateError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist; pass an existing file with --config or unset SECUREFORMS_CONFIG")]
    MissingFile { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("site {site:?}: {message}")]
    Site { site: String, message: String },
    #[error("site {site:?}, template {template:?}: {source}")]
    Template {
        site: String,
        template: String,
        #[source]
        source: TemplateError,
    },
}

/// Service settings. Every key can be set in the file, as `SECUREFORMS_<KEY>` (upper case), or by
/// the flag of the same name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Kafka bootstrap servers (`host:port,...`). Empty: use the embedded broker.
    pub brokers: Option<String>,
    /// Where the vault, projections and the embedded broker keep their data.
    pub data_dir: PathBuf,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Prefix of every consumer group id.
    pub group_prefix: String,
    /// This node's name (appears in FormSubmitted.off_record_node).
    pub node_id: String,
    /// Base URL of the visitor gateway, used to build form links.
    pub public_url: String,
    /// Replication factor for topics created by `topics apply` (3 in production).
    pub replication_factor: i32,
    /// The broker implementation behind `brokers`: `kafka` or `tansu`. Unset: asked of the broker
    /// (Apache Kafka describes its log cleaner). Decides topic settings (ADR 13).
    pub broker_kind: Option<crate::kafka::BrokerKind>,
    /// The broker `serve` starts when no `brokers` are configured: `tansu` (default; installed by
    /// scripts/install-broker.sh) or `kafka` (Apache Kafka from the jars scripts/install-kafka.sh
    /// caches; needs Java 17+). Both keep their data in `data_dir`.
    pub embedded_broker: crate::kafka::BrokerKind,
    /// Path of the tansu binary for the embedded default (found on PATH or in ~/.cargo/bin if unset).
    pub broker_bin: Option<PathBuf>,
    /// Directory of Apache Kafka's jars for `embedded_broker = "kafka"` (default: the cache
    /// scripts/install-kafka.sh fills, `~/.cache/secureforms/kafka-<version>`).
    pub kafka_home: Option<PathBuf>,
    /// Port of the embedded broker; 0 picks a free one.
    pub embedded_broker_port: u16,
    /// `text` or `json`.
    pub log_format: String,
    /// File holding the master key (base64). `SECUREFORMS_MASTER_KEY` takes precedence.
    pub master_key_file: Option<PathBuf>,
    /// Master keys this deployment used before the current one, while `secureforms keys rewrap`
    /// moves the data keys they wrap to the current one (ADR 19). Remove each, and destroy its file,
    /// once `secureforms keys list` shows no live key under it.
    #[serde(default)]
    pub previous_master_key_files: Vec<PathBuf>,
    /// File holding the integrity key (base64, from `secureforms keys export-integrity`): the root
    /// of the event MACs and the audit chain. Unset, it is derived from the master key; it must be
    /// set before the master key is rotated, so events already written stay verifiable (ADR 19).
    pub integrity_key_file: Option<PathBuf>,
    /// librdkafka properties for every Kafka client the service and the CLI create, applied over the
    /// service's own: TLS and SASL (`security.protocol`, `sasl.mechanisms`, `ssl.ca.location`, ...)
    /// and tuning (`linger.ms`, `fetch.wait.max.ms`). In a file: a `[kafka_properties]` table.
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, String>,
    /// Most records a consumer applies in one atomic batch (one sled flush per batch).
    pub max_batch: usize,
    /// Address of the visitor gateway (HTTP/HTTPS); empty: no gateway on this node.
    pub http_listen: Option<String>,
    /// Base URL other nodes of the deployment reach this node's gateway at, for requests they
    /// forward to it (the conversation's owner). Unset: the gateway's bound address with its scheme,
    /// which other machines can reach only when it is not a loopback or wildcard address.
    pub advertise_url: Option<String>,
    /// PEM file of the CA (or the certificates) that signed the other nodes' gateway certificates,
    /// trusted for forwarded requests besides the system's roots (internal CAs, self-signed nodes).
    pub cluster_ca_file: Option<PathBuf>,
    /// Address of the operations listener (plain HTTP): `/metrics` (Prometheus), `/healthz`,
    /// `/readyz`. Empty: none. Keep it off the public network.
    pub metrics_listen: Option<String>,
    /// Seconds a client may take to send a request's headers once it has started (slow clients,
    /// slowloris).
    pub http_header_read_timeout_secs: u64,
    /// Seconds a connection may send nothing before it is closed (clients that never send a
    /// request, idle keep-alive connections). Keep it above 33 s: a submit may wait that long for
    /// the broker.
    pub http_idle_timeout_secs: u64,
    /// PEM certificate chain and private key for HTTPS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate generated at start for localhost (local use only).
    pub tls_self_signed: bool,
    /// How often this node's purge worker removes expired submissions and destroys expired data keys
    /// (seconds); 0 turns the worker off on this node. Running it on several nodes is safe (the
    /// receipts are idempotent).
    pub purge_interval_secs: u64,
    /// Accept events of the kinds only this service produces without their MAC (see
    /// `crypto::mac`). Only while migrating topics written by a version before MACs; off again once
    /// those records are past. Anyone who can write to the topics can then forge them.
    pub accept_unsigned_events: bool,
    /// How agent tokens (JWT from the chat platform) are verified.
    #[serde(default)]
    pub agent_auth: AgentAuthConfig,
    /// Request rate limits of the gateway (token buckets: a sustained rate per minute and a burst).
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// Sites, keyed by site id.
    #[serde(default)]
    pub sites: BTreeMap<String, SiteConfig>,
}

/// librdkafka properties from the environment, over the file's `[kafka_properties]` (containers):
/// `name=value` pairs separated by commas or new lines.
pub const KAFKA_PROPERTIES_VAR: &str = "SECUREFORMS_KAFKA_PROPERTIES";

/// Parses [`KAFKA_PROPERTIES_VAR`]'s `name=value,name=value`.
pub fn parse_kafka_properties(list: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    list.split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(ConfigError::Invalid(format!(
                "{KAFKA_PROPERTIES_VAR}: {pair:?} is not name=value; write e.g. security.protocol=SASL_SSL,sasl.mechanisms=SCRAM-SHA-512"
            ))),
        })
        .collect()
}

/// The keys of [`Settings`] that may come from `SECUREFORMS_<KEY>` variables.
const SETTING_KEYS: &[&str] = &[
    "brokers",
    "data_dir",
    "topic_prefix",
    "group_prefix",
    "node_id",
    "public_url",
    "replication_factor",
    "broker_bin",
    "broker_kind",
    "embedded_broker",
    "kafka_home",
    "embedded_broker_port",
    "log_format",
    "master_key_file",
    "integrity_key_file",
    "max_batch",
    "http_listen",
    "tls_cert",
    "tls_key",
    "tls_self_signed",
    "http_header_read_timeout_secs",
    "http_idle_timeout_secs",
    "purge_interval_secs",
    "metrics_listen",
    "advertise_url",
    "cluster_ca_file",
];

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            brokers: None,
            data_dir: PathBuf::from("secureforms-data"),
            topic_prefix: "secureforms.".into(),
            group_prefix: "secureforms".into(),
            node_id: "node-1".into(),
            public_url: "http://127.0.0.1:8080".into(),
            replication_factor: 1,
            broker_kind: None,
            embedded_broker: crate::kafka::BrokerKind::Tansu,
            broker_bin: None,
            kafka_home: None,
            embedded_broker_port: 0,
            log_format: "text".into(),
            master_key_file: None,
            previous_master_key_files: Vec::new(),
            integrity_key_file: None,
            max_batch: 500,
            kafka_properties: BTreeMap::new(),
            http_listen: Some("127.0.0.1:8080".into()),
            metrics_listen: Some("127.0.0.1:9464".into()),
            advertise_url: None,
            cluster_ca_file: None,
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            http_header_read_timeout_secs: 10,
            http_idle_timeout_secs: 45,
            purge_interval_secs: 3600,
            accept_unsigned_events: false,
            agent_auth: AgentAuthConfig::default(),
            rate_limits: RateLimits::default(),
            sites: BTreeMap::new(),
        }
    }
}

/// One token bucket: `per_minute` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

/// The gateway's rate limits. Visitor requests are limited per client address, and per form only
/// once a request carries a valid key (so nobody without the key can lock the visitor out); agent
/// API requests per client address before authentication (every refusal is an audit write) and per
/// authenticated agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub visitor_per_client: Rate,
    pub visitor_per_form: Rate,
    /// A workspace behind one address serves many agents: sized for 1,000 requests/s from one client.
    pub api_per_client: Rate,
    /// One agent retrieves a few forms a minute.
    pub api_per_agent: Rate,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            visitor_per_client: Rate { per_minute: 120, burst: 60 },
            visitor_per_form: Rate { per_minute: 30, burst: 20 },
            api_per_client: Rate { per_minute: 120_000, burst: 2_000 },
            api_per_agent: Rate { per_minute: 600, burst: 60 },
        }
    }
}

impl RateLimits {
    fn validate(&self) -> Result<(), ConfigError> {
        let all = [
            ("visitor_per_client", self.visitor_per_client),
            ("visitor_per_form", self.visitor_per_form),
            ("api_per_client", self.api_per_client),
            ("api_per_agent", self.api_per_agent),
        ];
        for (name, rate) in all {
            if rate.per_minute == 0 || rate.burst == 0 {
                return Err(ConfigError::Invalid(format!(
                    "rate_limits.{name}: per_minute and burst must both be at least 1 (got {} and {})",
                    rate.per_minute, rate.burst
                )));
            }
        }
        Ok(())
    }
}

/// Agent token verification. One of: `SECUREFORMS_JWT_SECRET` / `jwt_secret_file` (HS256 shared
/// secret) or `jwks_file` (RS256, ES256 or EdDSA public keys, selected by the token's `kid`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentAuthConfig {
    pub jwt_secret_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
}

impl Settings {
    /// Loads settings: defaults, then the file (if any), then `SECUREFORMS_*` variables, then
    /// `overrides` (the flags that were given). Validates the sites catalogue.
    pub fn load(file: Option<&Path>, overrides: &impl Serialize) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile { path: path.to_path_buf() });
            }
            fig = fig.merge(Toml::file(path));
        }
        // SECUREFORMS_CONFIG names the file itself and is not a setting.
        // Only the variables that name a setting: others (SECUREFORMS_CONFIG, SECUREFORMS_MASTER_KEY,
        // ...) belong to other parts of the program.
        let env = Env::prefixed("SECUREFORMS_").filter(|k| SETTING_KEYS.iter().any(|s| k == *s));
        fig = fig.merge(env).merge(Serialized::defaults(overrides));
        let mut settings: Settings = fig.extract().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Ok(list) = std::env::var(KAFKA_PROPERTIES_VAR) {
            settings.kafka_properties.extend(parse_kafka_properties(&list)?);
        }
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.topic_prefix.chars().any(|c| !(c.is_ascii_alphanumeric() || "._-".contains(c))) {
            return Err(ConfigError::Invalid(format!(
                "topic_prefix {:?} may only hold letters, digits, '.', '_' and '-'",
                self.topic_prefix
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together: set both (PEM files) or neither".into(),
            ));
        }
        if let Some(listen) = self.http_listen.as_deref().filter(|l| !l.is_empty()) {
            let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
                ConfigError::Invalid(format!("http_listen {listen:?} is not an address like 127.0.0.1:8080"))
            })?;
            let tls = self.tls_cert.is_some() || self.tls_self_signed;
            if !tls && !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "http_listen {listen} is not a loopback address, so the gateway needs HTTPS: set tls_cert and tls_key (or listen on 127.0.0.1 behind a TLS proxy)"
                )));
            }
            // A gateway others can reach is production: agent tokens must be meant for this service,
            // not any token the chat platform signs for its other services.
            if !addr.ip().is_loopback() && self.agent_auth.audience.as_deref().unwrap_or("").is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "http_listen {listen} is reachable beyond this machine, so agent_auth.audience is required: set it to the `aud` your chat platform puts in tokens for secureforms"
                )));
            }
        }
        if !self.previous_master_key_files.is_empty() && self.integrity_key_file.is_none() {
            return Err(ConfigError::Invalid(
                "previous_master_key_files is set but integrity_key_file is not: before rotating the master key, run `secureforms keys export-integrity` with the old master key, save it to a private file and set integrity_key_file, or the MACs of the events already written no longer verify".into(),
            ));
        }
        self.rate_limits.validate()?;
        if !(1..=3600).contains(&self.http_idle_timeout_secs) {
            return Err(ConfigError::Invalid(format!(
                "http_idle_timeout_secs must be between 1 and 3600, not {}",
                self.http_idle_timeout_secs
            )));
        }
        if !(1..=300).contains(&self.http_header_read_timeout_secs) {
            return Err(ConfigError::Invalid(format!(
                "http_header_read_timeout_secs must be between 1 and 300, not {}",
                self.http_header_read_timeout_secs
            )));
        }
        if self.max_batch == 0 || self.max_batch > 100_000 {
            return Err(ConfigError::Invalid(format!(
                "max_batch must be between 1 and 100000, not {}",
                self.max_batch
            )));
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return Err(ConfigError::Invalid(format!("log_format must be text or json, not {:?}", self.log_format)));
        }
        url::Url::parse(&self.public_url)
            .map_err(|e| ConfigError::Invalid(format!("public_url {:?} is not a URL ({e})", self.public_url)))?;
        if let Some(a) = &self.advertise_url {
            let ok = url::Url::parse(a).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "advertise_url {a:?} is not an http(s) URL with a host; give the URL other nodes reach this node's gateway at, e.g. https://node-2.internal:8443"
                )));
            }
        }
        for (site, cfg) in &self.sites {
            let bad = |message: String| ConfigError::Site { site: site.clone(), message };
            if site.is_empty() || site.chars().any(|c| !(c.is_ascii_alphanumeric() || "_-".contains(c))) {
                return Err(bad("site ids may only hold letters, digits, '_' and '-'".into()));
            }
            if cfg.reopen_limit < 1 {
                return Err(bad("reopen_limit must be at least 1 (1 = open once)".into()));
            }
            for (name, v) in [
                ("open_key_ttl_secs", cfg.open_key_ttl_secs),
                ("submit_key_ttl_secs", cfg.submit_key_ttl_secs),
                ("retrieve_key_ttl_secs", cfg.retrieve_key_ttl_secs),
                ("off_record_ttl_secs", cfg.off_record_ttl_secs),
            ] {
                if v == 0 || v > 86_400 {
                    return Err(bad(format!("{name} must be between 1 and 86400 seconds, not {v}")));
                }
            }
            if cfg.retention_months == 0 || cfg.retention_months > 120 {
                return Err(bad(format!("retention_months must be between 1 and 120, not {}", cfg.retention_months)));
            }
            let mut seen = std::collections::BTreeSet::new();
            for t in &cfg.templates {
                if !seen.insert(t.id.as_str()) {
                    return Err(bad(format!("template id {:?} is defined twice", t.id)));
                }
                t.validate().map_err(|source| ConfigError::Template {
                    site: site.clone(),
                    template: t.id.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
        let s = Settings::load(Some(&p), &serde_json::json!({})).expect("example config is valid");
        let site = s.sites.get("acme").expect("example defines acme");
        assert!(site.enabled);
        assert!(site.profile("agent").unwrap().use_secure_form);
        assert!(!site.profile("agent_manager").unwrap().view_secure_form_responses_in_history);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "node_id = \"from-file\"\ntopic_prefix = \"f.\"\n");
        let s = Settings::load(Some(&p), &serde_json::json!({"node_id": "from-flag"})).unwrap();
        assert_eq!(s.node_id, "from-flag");
        assert_eq!(s.topic_prefix, "f.");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "nod_id = \"x\"\n");
        let e = Settings::load(Some(&p), &serde_json::json!({})).unwrap_err().to_string();
        assert!(e.contains("nod_id"), "{e}");

        let p = write(&dir, "[sites.acme]\nenabled = true\nreopen_limit = 0\n");
        let e = Settings::load(Some(&p), &serde_json::json!({})).unwrap_err().to_string();
        assert!(e.contains("acme") && e.contains("reopen_limit"), "{e}");

        let p = write(&dir, "[rate_limits]\napi_per_agent = { per_minute = 0, burst = 5 }\n");
        let e = Settings::load(Some(&p), &serde_json::json!({})).unwrap_err().to_string();
        assert!(e.contains("rate_limits.api_per_agent") && e.contains("at least 1"), "{e}");
    }

    #[test]
    fn a_gateway_beyond_loopback_requires_an_audience_for_agent_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "http_listen = \"0.0.0.0:8443\"\ntls_self_signed = true\n");
        let e = Settings::load(Some(&p), &serde_json::json!({})).unwrap_err().to_string();
        assert!(e.contains("agent_auth.audience is required"), "{e}");
        let p = write(
            &dir,
            "http_listen = \"0.0.0.0:8443\"\ntls_self_signed = true\n[agent_auth]\naudience = \"secureforms\"\n",
        );
        assert!(Settings::load(Some(&p), &serde_json::json!({})).is_ok());
    }

    #[test]
    fn rate_limits_default_per_kind_and_can_be_raised_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "[rate_limits]\napi_per_agent = { per_minute = 6000, burst = 600 }\n");
        let s = Settings::load(Some(&p), &serde_json::json!({})).unwrap();
        assert_eq!(s.rate_limits.api_per_agent, Rate { per_minute: 6000, burst: 600 });
        assert_eq!(s.rate_limits.visitor_per_form, RateLimits::default().visitor_per_form, "others keep defaults");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own error type
    fn environment_variables_set_settings_and_flags_beat_them() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SECUREFORMS_GROUP_PREFIX", "from-env");
            jail.set_env("SECUREFORMS_NODE_ID", "env-node");
            jail.set_env("SECUREFORMS_MASTER_KEY", "not a setting, ignored here");
            let s = Settings::load(None, &serde_json::json!({"node_id": "flag-node"})).map_err(|e| e.to_string())?;
            assert_eq!(s.group_prefix, "from-env");
            assert_eq!(s.node_id, "flag-node");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_says_so() {
        let e = Settings::load(Some(Path::new("/nonexistent/sf.toml")), &serde_json::json!({})).unwrap_err();
        assert!(matches!(e, ConfigError::MissingFile { .. }));
    }

    #[test]
    fn kafka_properties_from_the_environment_are_name_value_pairs() {
        let p = parse_kafka_properties(
            "security.protocol=SASL_SSL, sasl.mechanisms=SCRAM-SHA-512\nssl.ca.location=/c/ca.pem,",
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p["sasl.mechanisms"], "SCRAM-SHA-512");
        assert_eq!(p["ssl.ca.location"], "/c/ca.pem");
        let e = parse_kafka_properties("security.protocol").unwrap_err().to_string();
        assert!(e.contains("is not name=value"), "{e}");
    }
}
