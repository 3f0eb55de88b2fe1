//! The embedded default (ADR 0003, ADR 13): with no brokers configured, `secureforms serve` starts a
//! Kafka-protocol broker process on loopback with its storage inside the data directory, so data
//! survives restarts: tansu 0.6.0 (default; sqlite, installed by `scripts/install-broker.sh`) or,
//! with `embedded_broker = "kafka"`, a single-node KRaft Apache Kafka from the jars
//! `scripts/install-kafka.sh` caches. The broker dies with the service and never inherits the master
//! key. Other commands (`tail`, `chatbus`, `topics`) find it through `<data_dir>/broker.addr`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::config::Settings;
use crate::kafka::BrokerKind;

/// The Apache Kafka version `scripts/kafka/pom.xml` pins (a unit test keeps them equal).
pub const KAFKA_VERSION: &str = "4.1.2";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "no brokers configured and no tansu binary found (looked at {looked}); install it with scripts/install-broker.sh, set broker_bin, or pass --brokers host:port"
    )]
    NotInstalled { looked: String },
    #[error("cannot start the embedded broker {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the embedded broker did not accept connections on {addr} within {secs}s; see {log} for why")]
    NotReady { addr: String, secs: u64, log: String },
    #[error("the embedded broker exited at start ({status}); see {log} for why")]
    Exited { status: String, log: String },
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no brokers configured and no embedded broker is running for data directory {data_dir}; start `secureforms serve` first or pass --brokers host:port"
    )]
    NoneRunning { data_dir: String },
    #[error(
        "embedded_broker = \"kafka\" but no Apache Kafka jars in {home}; run scripts/install-kafka.sh (needs Java 17+ and mvn), set kafka_home, or use embedded_broker = \"tansu\""
    )]
    KafkaNotInstalled { home: String },
    #[error("cannot format the embedded Apache Kafka's storage (exit {status}); see {log} for why")]
    Format { status: String, log: String },
}

pub struct EmbeddedBroker {
    child: Child,
    addr: String,
    addr_file: PathBuf,
    kind: BrokerKind,
}

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the embedded Apache Kafka's jars are: `kafka_home`, else the install script's cache.
pub fn kafka_home(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    let cache = std::env::var_os("SECUREFORMS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/secureforms")))
        .unwrap_or_else(|| PathBuf::from(".cache/secureforms"));
    cache.join(format!("kafka-{KAFKA_VERSION}"))
}

/// The broker binary: the configured path, `tansu` on PATH, or `$CARGO_HOME/bin/tansu`.
pub fn find_binary(configured: Option<&Path>) -> Result<PathBuf, BrokerError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = configured {
        candidates.push(p.to_path_buf());
    } else {
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
        }
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
        if let Some(c) = cargo_home {
            candidates.push(c.join("bin/tansu"));
        }
    }
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| BrokerError::NotInstalled {
        looked: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The address of the embedded broker a running `serve` started for this data directory.
pub fn running_address(data_dir: &Path) -> Result<String, BrokerError> {
    let none = || BrokerError::NoneRunning { data_dir: data_dir.display().to_string() };
    let addr = std::fs::read_to_string(data_dir.join("broker.addr")).map_err(|_| none())?;
    let addr = addr.trim().to_string();
    let sock: std::net::SocketAddr = addr.parse().map_err(|_| none())?;
    std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).map_err(|_| none())?;
    Ok(addr)
}

/// Environment variables a broker process must not inherit (the master key above all).
const WITHHELD_ENV: &[&str] = &["SECUREFORMS_MASTER_KEY", "SECUREFORMS_JWT_SECRET"];

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it asks the kernel to stop the broker if we die first.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Asks a Kafka-protocol broker for its metadata (Metadata v4, which Apache Kafka 4 and tansu both
/// serve) and returns how many brokers it lists. A listening socket is not yet a working broker.
pub async fn probe_metadata(addr: &str) -> std::io::Result<i32> {
    let client_id = b"secureforms-probe";
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(&3i16.to_be_bytes()); // api key: Metadata
    body.extend_from_slice(&4i16.to_be_bytes()); // api version
    body.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    body.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    body.extend_from_slice(client_id);
    body.extend_from_slice(&(-1i32).to_be_bytes()); // all topics
    body.push(0); // allow_auto_topic_creation = false
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(&(body.len() as i32).to_be_bytes()).await?;
        s.write_all(&body).await?;
        let size = s.read_i32().await?;
        if !(12..=16 * 1024 * 1024).contains(&size) {
            return Err(std::io::Error::other(format!("metadata response of {size} bytes")));
        }
        let (correlation, _throttle, brokers) = (s.read_i32().await?, s.read_i32().await?, s.read_i32().await?);
        if correlation != 7 {
            return Err(std::io::Error::other("metadata response with another correlation id"));
        }
        Ok(brokers)
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| std::io::Error::other("metadata request timed out"))?
}

impl EmbeddedBroker {
    /// Starts the embedded broker `settings.embedded_broker` names.
    pub async fn start_for(settings: &Settings) -> Result<EmbeddedBroker, BrokerError> {
        match settings.embedded_broker {
            BrokerKind::Tansu => {
                let bin = find_binary(settings.broker_bin.as_deref())?;
                EmbeddedBroker::start(&bin, &settings.data_dir, settings.embedded_broker_port).await
            }
            BrokerKind::Kafka => {
                EmbeddedBroker::start_kafka(
                    &kafka_home(settings.kafka_home.as_deref()),
                    &settings.data_dir,
                    settings.embedded_broker_port,
                )
                .await
            }
        }
    }

    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// A single-node KRaft Apache Kafka (combined broker and controller) in `<data_dir>/kafka`.
    /// Storage is formatted once; the ports are kept in `kafka/ports` so the controller's address
    /// stays what the metadata log recorded.
    pub async fn start_kafka(home: &Path, data_dir: &Path, port: u16) -> Result<EmbeddedBroker, BrokerError> {
        let dir = data_dir.join("kafka");
        let dir_err = |source| BrokerError::DataDir { path: dir.display().to_string(), source };
        if !home.join(format!("kafka_2.13-{KAFKA_VERSION}.jar")).is_file() {
            return Err(BrokerError::KafkaNotInstalled { home: home.display().to_string() });
        }
        std::fs::create_dir_all(&dir).map_err(dir_err)?;
        let ports_file = dir.join("ports");
        let kept: Option<(u16, u16)> = std::fs::read_to_string(&ports_file).ok().and_then(|t| {
            let mut it = t.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        });
        let (port, cport) = match kept {
            Some((p, c)) if port == 0 || port == p => (p, c),
            Some((_, c)) => (port, c),
            None => (if port == 0 { free_port().map_err(dir_err)? } else { port }, free_port().map_err(dir_err)?),
        };
        std::fs::write(&ports_file, format!("{port} {cport}\n")).map_err(dir_err)?;
        let addr = format!("127.0.0.1:{port}");
        let log_path = dir.join("broker.log");
        let props = dir.join("server.properties");
        std::fs::write(&props, kafka_server_properties(&dir.join("data"), port, cport)).map_err(dir_err)?;
        let log4j = dir.join("log4j2.properties");
        std::fs::write(&log4j, kafka_log4j(&log_path)).map_err(dir_err)?;
        let classpath = format!("{}/*", home.display());
        let log4j_arg = format!("-Dlog4j2.configurationFile={}", log4j.display());

        if !dir.join("data/meta.properties").exists() {
            use base64::Engine;
            // As Kafka's own Uuid.randomUuid: never one that starts with '-', which the tool's
            // argument parser would take for an option (1 in 64 random ids).
            let cluster_id = std::iter::repeat_with(|| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
            })
            .find(|id| !id.starts_with('-'))
            .expect("an endless supply of ids");
            let format_log = dir.join("format.log");
            let out = std::fs::File::create(&format_log).map_err(dir_err)?;
            let mut cmd = Command::new("java");
            cmd.args([
                log4j_arg.as_str(),
                "-cp",
                &classpath,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                &cluster_id,
                "--config",
            ])
            .arg(&props)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(dir_err)?)
            .stderr(out);
            for v in WITHHELD_ENV {
                cmd.env_remove(v);
            }
            let status = cmd.status().await.map_err(|source| BrokerError::Spawn { bin: "java".into(), source })?;
            if !status.success() {
                return Err(BrokerError::Format { status: status.to_string(), log: format_log.display().to_string() });
            }
        }

        let stdout =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stdout.log")).map_err(dir_err)?;
        let mut cmd = Command::new("java");
        cmd.args([
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            log4j_arg.as_str(),
            "-cp",
            &classpath,
            "kafka.Kafka",
        ])
        .arg(&props)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().map_err(dir_err)?)
        .stderr(stdout)
        .kill_on_drop(true);
        for v in WITHHELD_ENV {
            cmd.env_remove(v);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| BrokerError::Spawn { bin: "java (kafka.Kafka)".into(), source })?;
        EmbeddedBroker::ready(child, addr, data_dir, log_path, BrokerKind::Kafka).await
    }

    /// tansu with its sqlite storage in `data_dir`.
    pub async fn start(bin: &Path, data_dir: &Path, port: u16) -> Result<EmbeddedBroker, BrokerError> {
        let dir_err = |source| BrokerError::DataDir { path: data_dir.display().to_string(), source };
        std::fs::create_dir_all(data_dir).map_err(dir_err)?;
        let port = if port == 0 { free_port().map_err(dir_err)? } else { port };
        let addr = format!("127.0.0.1:{port}");
        let db = data_dir.join("broker.db");
        let log_path = data_dir.join("broker.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(dir_err)?;
        let mut cmd = Command::new(bin);
        // tansu resolves the sqlite path against its working directory.
        cmd.current_dir(data_dir)
            .arg("broker")
            .arg("--storage-engine")
            .arg("sqlite://broker.db")
            .arg("--listener-url")
            .arg(format!("tcp://{addr}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{addr}"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(dir_err)?)
            .stderr(log)
            .kill_on_drop(true);
        for v in WITHHELD_ENV {
            cmd.env_remove(v);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| BrokerError::Spawn { bin: bin.display().to_string(), source })?;
        tracing::debug!(storage = %db.display(), "tansu started");
        EmbeddedBroker::ready(child, addr, data_dir, log_path, BrokerKind::Tansu).await
    }

    /// Waits until the broker answers a metadata request, then records its address.
    async fn ready(
        mut child: Child,
        addr: String,
        data_dir: &Path,
        log_path: PathBuf,
        kind: BrokerKind,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let dir_err = |source| BrokerError::DataDir { path: data_dir.display().to_string(), source };
        let deadline = Instant::now() + READY_TIMEOUT;
        let log_name = log_path.display().to_string();
        loop {
            if let Some(status) = child.try_wait().map_err(dir_err)? {
                return Err(BrokerError::Exited { status: status.to_string(), log: log_name });
            }
            if probe_metadata(&addr).await.is_ok_and(|brokers| brokers >= 1) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(BrokerError::NotReady { addr, secs: READY_TIMEOUT.as_secs(), log: log_name });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let addr_file = data_dir.join("broker.addr");
        std::fs::write(&addr_file, &addr).map_err(dir_err)?;
        tracing::info!(%addr, kind = kind.name(), log = %log_name, "embedded broker started");
        Ok(EmbeddedBroker { child, addr, addr_file, kind })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the broker process has ended.
    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the broker at once (SIGKILL), as a crash would; for fault-injection tests.
    pub async fn kill(mut self) {
        let _ = std::fs::remove_file(&self.addr_file);
        let _ = self.child.kill().await;
    }

    /// Stops the broker gracefully (SIGTERM, then SIGKILL after 30 s: Apache Kafka's controlled
    /// shutdown takes a few seconds).
    pub async fn stop(mut self) {
        let _ = std::fs::remove_file(&self.addr_file);
        if let Some(pid) = self.child.id() {
            // SAFETY: sending a signal to our own child.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_ok() {
                tracing::info!("embedded broker stopped");
                return;
            }
        }
        let _ = self.child.kill().await;
        tracing::warn!("embedded broker did not stop on SIGTERM and was killed");
    }
}

/// One-node KRaft settings: combined broker and controller on loopback, then the one-node settings
/// every Kafka of this project shares and the development broker's (the same files `scripts/lib.sh`
/// uses for the tests).
fn kafka_server_properties(data: &Path, port: u16, cport: u16) -> String {
    const ONE_NODE: &str = include_str!("../docker/kafka-one-node.properties");
    const DEV: &str = include_str!("../scripts/kafka/dev-broker.properties");
    format!(
        "process.roles=broker,controller\n\
         node.id=1\n\
         controller.quorum.bootstrap.servers=127.0.0.1:{cport}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
         log.dirs={}\n\
         {ONE_NODE}{DEV}",
        data.display()
    )
}

fn kafka_log4j(log: &Path) -> String {
    format!(
        "status = warn\n\
         appender.file.type = File\n\
         appender.file.name = file\n\
         appender.file.fileName = {}\n\
         appender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = INFO\n\
         rootLogger.appenderRef.file.ref = file\n",
        log.display()
    )
}

/// How often the supervisor asks the embedded broker for its metadata, and after how many failed
/// answers in a row it restarts it.
const SUPERVISE_EVERY: Duration = Duration::from_secs(5);
const RESTART_AFTER_FAILURES: u32 = 3;

/// The embedded broker under watch: restarted on the same port and data when its process ends, or
/// when it stops answering metadata requests while alive (seen on tansu 0.6.0: after a restart with
/// consumer groups rejoining, its storage task died and it refused every request until restarted).
/// The service rides out the restart like any broker outage.
pub struct SupervisedBroker {
    addr: String,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Option<EmbeddedBroker>>,
}

impl SupervisedBroker {
    pub fn start(broker: EmbeddedBroker, settings: &Settings) -> SupervisedBroker {
        let addr = broker.addr().to_string();
        let mut settings = settings.clone();
        settings.embedded_broker_port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut broker = Some(broker);
            let mut failures = 0u32;
            let mut tick = tokio::time::interval(SUPERVISE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.wait_for(|s| *s) => return broker,
                    _ = tick.tick() => {}
                }
                let restart = match broker.as_mut() {
                    None => Some("it is not running"),
                    Some(b) => {
                        if b.exited() {
                            Some("its process ended")
                        } else if probe_metadata(b.addr()).await.is_ok() {
                            failures = 0;
                            None
                        } else {
                            failures += 1;
                            (failures >= RESTART_AFTER_FAILURES).then_some("it stopped answering metadata requests")
                        }
                    }
                };
                let Some(why) = restart else { continue };
                tracing::warn!(
                    reason = why,
                    port = settings.embedded_broker_port,
                    "restarting the embedded broker on the same port and data (see its log in the data directory if this repeats)"
                );
                if let Some(b) = broker.take() {
                    b.kill().await;
                }
                failures = 0;
                match EmbeddedBroker::start_for(&settings).await {
                    Ok(b) => {
                        tracing::info!(addr = %b.addr(), "embedded broker restarted");
                        broker = Some(b);
                    }
                    Err(error) => tracing::error!(%error, "the embedded broker did not restart; trying again shortly"),
                }
            }
        });
        SupervisedBroker { addr, stop, task }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops watching, then stops the broker.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Ok(Some(b)) = self.task.await {
            b.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_kafka_version_is_the_one_the_install_script_fetches() {
        let pom = include_str!("../scripts/kafka/pom.xml");
        assert!(
            pom.contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")),
            "scripts/kafka/pom.xml pins another version than broker::KAFKA_VERSION"
        );
    }

    #[test]
    fn one_node_kafka_settings_name_both_listeners_and_single_replica_internal_topics() {
        let p = kafka_server_properties(Path::new("/d"), 9092, 9093);
        for line in [
            "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093",
            "offsets.topic.replication.factor=1",
            "log.dirs=/d",
            "group.initial.rebalance.delay.ms=0",
        ] {
            assert!(p.lines().any(|l| l == line), "missing {line:?} in\n{p}");
        }
    }
}
