//! The embedded default (ADR 0003): with no brokers configured, `secureforms serve` starts a
//! Kafka-protocol broker process (tansu, installed by `scripts/install-broker.sh`) on loopback, with
//! its sqlite storage inside the data directory, so data survives restarts. The broker dies with the
//! service. Other commands (`tail`, `chatbus`, `topics`) find it through `<data_dir>/broker.addr`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

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
}

pub struct EmbeddedBroker {
    child: Child,
    addr: String,
    addr_file: PathBuf,
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

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

impl EmbeddedBroker {
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
        // SAFETY: prctl is async-signal-safe; it asks the kernel to stop the broker if we die first.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| BrokerError::Spawn { bin: bin.display().to_string(), source })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let log_name = log_path.display().to_string();
        loop {
            if let Some(status) = child.try_wait().map_err(dir_err)? {
                return Err(BrokerError::Exited { status: status.to_string(), log: log_name });
            }
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
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
        tracing::info!(%addr, storage = %db.display(), "embedded broker started");
        Ok(EmbeddedBroker { child, addr, addr_file })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops the broker gracefully (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        let _ = std::fs::remove_file(&self.addr_file);
        if let Some(pid) = self.child.id() {
            // SAFETY: sending a signal to our own child.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_ok() {
                tracing::info!("embedded broker stopped");
                return;
            }
        }
        let _ = self.child.kill().await;
        tracing::warn!("embedded broker did not stop on SIGTERM and was killed");
    }
}
