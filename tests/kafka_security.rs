//! Apache Kafka as production runs it: one listener, SASL_SSL only (SCRAM-SHA-512 over TLS with a
//! certificate from a CA of this test's own), every request authorized against the ACLs
//! docker/kafka-acls.sh grants. The service reaches it through `[kafka_properties]` with the SASL
//! password from `SECUREFORMS_KAFKA_PASSWORD` (or the properties), runs the flow end to end with the
//! chat bus on a user of its own, and the CLI does the same; a client with a wrong password or
//! without TLS gets nothing, the chat bus and the workspace get nothing beyond their grants, and the
//! password appears in no log. Runs once, in the Apache Kafka phase of the test run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;

const WAIT: Duration = Duration::from_secs(120);

struct SecureKafka {
    child: std::process::Child,
    addr: String,
    ca: PathBuf,
    log: PathBuf,
}

const ADMIN_PASSWORD: &str = "admin-secret-for-the-test";
const CHATBUS_PASSWORD: &str = "chatbus-secret-for-the-test";
const WORKSPACE_PASSWORD: &str = "workspace-secret-for-the-test";

impl SecureKafka {
    /// The end of the broker's logs, for a failure message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(self.log.with_file_name("kafka-console.log")).unwrap_or_default();
        log[log.len().saturating_sub(4000)..].to_string()
    }

    /// Grants the deployment's ACLs with docker/kafka-acls.sh, as compose's kafka-acls service does.
    fn grant_acls(&self, prefix: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/kafka-acls.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("KAFKA_LIBS", secureforms::broker::kafka_home(None))
            .env("KAFKA_BOOTSTRAP", &self.addr)
            .env("KAFKA_CA", &self.ca)
            .env("KAFKA_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("TOPIC_PREFIX", prefix)
            .env("GROUP_PREFIX", prefix.trim_end_matches('.'))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kafka-acls.sh failed: {}{}\nbroker log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    fn client(&self, user: &str, password: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.addr);
        for (k, v) in secured(&self.ca, user, Some(password)) {
            c.set(k, v);
        }
        c
    }

    /// Produces one record as `user`: the broker's answer.
    async fn produce_as(&self, user: &str, password: &str, topic: &str) -> Result<(), String> {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer =
            self.client(user, password).set("message.timeout.ms", "30000").create().map_err(|e| e.to_string())?;
        producer
            .send(FutureRecord::to(topic).key("probe").payload("not an event"), Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    /// Reads `topic` from its start as `user` in `group` until a record or an error arrives.
    fn read_as(&self, user: &str, password: &str, topic: &str, group: &str) -> Result<(), String> {
        let consumer: BaseConsumer = self
            .client(user, password)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| e.to_string())?;
        consumer.subscribe(&[topic]).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                None => {}
            }
        }
        Err(format!("neither a record nor an error from {topic} in {WAIT:?}"))
    }
}

impl Drop for SecureKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker as docker/compose.yaml runs it (docker/kafka-sasl-ssl.sh: its own CA, SCRAM users
/// formatted in), from the jars scripts/install-kafka.sh fetched.
fn start_secure_kafka(dir: &Path, service_password: &str) -> SecureKafka {
    let home = secureforms::broker::kafka_home(None);
    assert!(home.is_dir(), "Apache Kafka's jars are missing: run scripts/install-kafka.sh");
    let (port, cport) = (free_port(), free_port());
    let log = dir.join("kafka.log");
    std::fs::write(
        dir.join("log4j2.properties"),
        format!(
            "status = warn\nappender.file.type = File\nappender.file.name = file\nappender.file.fileName = {}\n\
             appender.file.layout.type = PatternLayout\nappender.file.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = INFO\nrootLogger.appenderRef.file.ref = file\n",
            log.display()
        ),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/kafka-sasl-ssl.sh");
    let console = std::fs::File::create(dir.join("kafka-console.log")).unwrap();
    let child = Command::new("bash")
        .arg(&script)
        .env("KAFKA_LIBS", &home)
        .env("KAFKA_DATA", dir.join("data"))
        .env("KAFKA_CERTS", dir.join("certs"))
        .env("KAFKA_CONF", dir.join("conf"))
        .env("KAFKA_HOST", "localhost")
        .env("KAFKA_BIND", "127.0.0.1")
        .env("KAFKA_PORT", port.to_string())
        .env("KAFKA_CONTROLLER_PORT", cport.to_string())
        .env("KAFKA_LOG4J", dir.join("log4j2.properties"))
        .env("KAFKA_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("KAFKA_SECUREFORMS_PASSWORD", service_password)
        .env("KAFKA_CHATBUS_PASSWORD", CHATBUS_PASSWORD)
        .env("KAFKA_WORKSPACE_PASSWORD", WORKSPACE_PASSWORD)
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .unwrap();
    SecureKafka { child, addr: format!("localhost:{port}"), ca: dir.join("certs/ca.pem"), log }
}

/// Client properties for the secured listener.
fn secured(ca: &Path, user: &str, password: Option<&str>) -> Vec<(String, String)> {
    let mut p = vec![
        ("security.protocol".to_string(), "SASL_SSL".to_string()),
        ("sasl.mechanisms".into(), "SCRAM-SHA-512".into()),
        ("sasl.username".into(), user.into()),
        ("ssl.ca.location".into(), ca.display().to_string()),
    ];
    if let Some(pw) = password {
        p.push(("sasl.password".into(), pw.into()));
    }
    p
}

/// Whether a client with these properties gets the cluster's metadata.
fn metadata_answers(addr: &str, props: &[(String, String)], timeout: Duration) -> Result<(), String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr).set("group.id", "probe");
    for (k, v) in props {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c.create().map_err(|e| e.to_string())?;
    consumer.fetch_metadata(None, timeout).map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_and_the_cli_work_over_sasl_ssl_and_nobody_gets_in_without_the_password() {
    if !needs_kafka("it starts an Apache Kafka of its own, once per test run") {
        return;
    }
    let logs = logs();
    let dir = tempfile::tempdir().unwrap();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let kafka = start_secure_kafka(dir.path(), &password);
    let ok = secured(&kafka.ca, "secureforms", Some(&password));
    let deadline = Instant::now() + WAIT;
    while let Err(e) = metadata_answers(&kafka.addr, &ok, Duration::from_secs(5)) {
        if Instant::now() > deadline {
            panic!("the secured broker never answered ({e}); its log ends:\n{}", kafka.log_tail());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let prefix = unique_prefix("secure");
    kafka.grant_acls(&prefix);

    // Nobody else gets in: a wrong password, no TLS, no SASL.
    let wrong = secured(&kafka.ca, "secureforms", Some("not-the-password"));
    assert!(metadata_answers(&kafka.addr, &wrong, Duration::from_secs(10)).is_err(), "wrong password");
    let plain = vec![("security.protocol".to_string(), "PLAINTEXT".to_string())];
    assert!(metadata_answers(&kafka.addr, &plain, Duration::from_secs(5)).is_err(), "plaintext");

    // The service, in process, with only its grants: the flow end to end.
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let mut s = settings(&prefix, &node_dir);
    s.brokers = Some(kafka.addr.clone());
    s.broker_kind = Some(secureforms::kafka::BrokerKind::Kafka);
    s.kafka_properties = ok.iter().cloned().collect();
    let mut service =
        Service::start(s.clone(), kafka.addr.clone(), system_clock()).await.expect("starts over SASL_SSL");
    service.wait_ready(WAIT).await.expect("ready");
    // The chat bus, on its own user, sends the form.
    let mut chat = secureforms::kafka::KafkaSettings { brokers: kafka.addr.clone(), ..kafka_on(&kafka.addr, &prefix) };
    chat.properties = secured(&kafka.ca, "chatbus", Some(CHATBUS_PASSWORD)).into_iter().collect();
    secureforms::kafka::EventProducer::new(&chat)
        .unwrap()
        .send(&form_sent("acme", "conv-tls", "form-tls", "agent-1", "agent", "card-payment"))
        .await
        .unwrap();
    let key = secureforms::handlers::issuer::form_key("acme", "form-tls");
    let deadline = Instant::now() + WAIT;
    while !service.gateway.tree(secureforms::handlers::gateway::FORMS_TREE).unwrap().contains_key(&key).unwrap() {
        assert!(Instant::now() < deadline, "the form was issued over SASL_SSL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = submit_card(&service, "conv-tls", "form-tls", &luhn_pan(42)).await;
    let deadline = Instant::now() + WAIT;
    while service.detokenizer.record(&id).unwrap().is_none() {
        assert!(Instant::now() < deadline, "the submission reached the vault over SASL_SSL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.stop().await;

    // Each other principal gets its own job done and nothing more.
    let topic = |t: &str| format!("{prefix}{t}");
    let denied = |r: Result<(), String>, what: &str| match r {
        Err(e) if e.to_lowercase().contains("authoriz") => {}
        other => panic!("{what}: expected an authorization failure, got {other:?}"),
    };
    tokio::task::block_in_place(|| {
        kafka
            .read_as("chatbus", CHATBUS_PASSWORD, &topic("form-links"), "chatbus")
            .expect("the chat bus reads its links");
        kafka
            .read_as("workspace", WORKSPACE_PASSWORD, &topic("agent-events"), "workspace")
            .expect("the workspace reads FormReady");
        let (chatbus, workspace) = (("chatbus", CHATBUS_PASSWORD), ("workspace", WORKSPACE_PASSWORD));
        for ((user, pw), t, group, what) in [
            (chatbus, "agent-events", "chatbus", "the chat bus reading agent events (retrieve keys)"),
            (chatbus, "form-links", "someone-elses-group", "the chat bus in a group not its own"),
            (workspace, "submissions", "workspace", "the workspace reading sealed submissions"),
            (workspace, "keys", "workspace", "the workspace reading wrapped data keys"),
        ] {
            denied(kafka.read_as(user, pw, &topic(t), group), what);
        }
    });
    for t in ["submissions", "agent-events", "keys", "form-links"] {
        denied(kafka.produce_as("chatbus", CHATBUS_PASSWORD, &topic(t)).await, &format!("the chat bus writing {t}"));
    }
    for t in ["chat-events", "agent-events"] {
        denied(
            kafka.produce_as("workspace", WORKSPACE_PASSWORD, &topic(t)).await,
            &format!("the workspace writing {t}"),
        );
    }

    // The CLI, as a user: its properties in a config file and the password in the environment.
    let cli_as = |user: &str, pw: &str, args: &[&str]| {
        let config = dir.path().join(format!("cli-{user}.toml"));
        let mut toml = String::from("[kafka_properties]\n");
        for (k, v) in secured(&kafka.ca, user, None) {
            toml.push_str(&format!("{k:?} = {v:?}\n"));
        }
        std::fs::write(&config, toml).unwrap();
        Command::new(bin())
            .args(args)
            .args(["--brokers", &kafka.addr, "--topic-prefix", &prefix, "--config"])
            .arg(&config)
            .env("SECUREFORMS_KAFKA_PASSWORD", pw)
            .env_remove("SECUREFORMS_CONFIG")
            .env_remove("SECUREFORMS_BROKER_KIND")
            .output()
            .unwrap()
    };
    let cli = |pw: &str, args: &[&str]| cli_as("secureforms", pw, &[args, &["--broker-kind", "kafka"]].concat());
    let o = cli(&password, &["tail", "form-links", "--max", "1", "--idle-exit", "30"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success() && out.contains("FormIssued"), "{out}{}", String::from_utf8_lossy(&o.stderr));
    // Telling Kafka from tansu needs the grant on the cluster: with it, the CLI learns the broker
    // kind. Without it the broker's answer looks like tansu's (rdkafka drops the per-resource
    // error), so the CLI says what to grant or set.
    let o = cli_as("secureforms", &password, &["topics", "list"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success() && out.contains("broker: kafka"), "{out}{}", String::from_utf8_lossy(&o.stderr));
    let o = cli_as("workspace", WORKSPACE_PASSWORD, &["topics", "list"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("DescribeConfigs on the cluster") && err.contains("broker_kind"), "says what to grant: {err}");

    let o = cli("not-the-password", &["topics", "list"]);
    assert!(!o.status.success(), "a wrong password gets nothing");
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("auth") || err.contains("sasl"), "says it is about authentication: {err}");

    // The password is in no log.
    let logs = logs.lock().unwrap().clone();
    assert!(logs.len() > 1000, "logs were captured");
    assert!(find(&logs, password.as_bytes()).is_none(), "the SASL password was logged");
    assert!(!String::from_utf8_lossy(&o.stderr).contains(&password));
}
