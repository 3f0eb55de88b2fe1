//! The `secureforms` command line. Each command lives in its own file and only parses, loads the
//! settings and calls the library. Errors end the process with a non-zero exit and a message that
//! says what to fix.

mod audit;
mod chatbus;
mod dlq;
mod keys;
mod openapi;
mod ops;
mod schemas;
mod serve;
mod sites;
mod tail;
mod topics;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "secureforms",
    version,
    about = "Secure forms for live chat: tokenized answers, one-time keys, event-sourced on Kafka",
    long_about = "Secure forms for live chat. Every setting can come from the config file (--config), \
                  from SECUREFORMS_<SETTING> environment variables, or from the flags below; flags win.",
    after_help = "Examples:\n  secureforms serve --config config/demo.toml\n  secureforms tail form-links --max 5\n  secureforms topics apply --brokers 127.0.0.1:9092"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes. Only the ones given override the file and the environment.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct GlobalArgs {
    /// Config file (TOML). See config/secureforms.example.toml.
    #[arg(long, global = true, env = "SECUREFORMS_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, `host:port[,host:port]`. Without it the embedded broker is used.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// The broker implementation behind --brokers: kafka or tansu (default: asked of the broker).
    #[arg(long, global = true, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_kind: Option<crate::kafka::BrokerKind>,
    /// Data directory for the vault, projections and the embedded broker.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Prefix of every topic name (default "secureforms.").
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// This node's name.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Log format: text or json.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// File holding the master key (base64); SECUREFORMS_MASTER_KEY takes precedence.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Serve(serve::Args),
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    Tail(tail::Args),
    Schemas(schemas::Args),
    #[command(subcommand)]
    Chatbus(chatbus::ChatbusCommand),
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    #[command(subcommand)]
    Sites(sites::SitesCommand),
    Openapi(openapi::Args),
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    Purge(ops::PurgeArgs),
    Erase(ops::EraseArgs),
    Replay(ops::ReplayArgs),
    Compliance(ops::ComplianceArgs),
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

impl GlobalArgs {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(self.config.as_deref(), self)?)
    }
}

/// Parses the arguments, runs the command, and turns any error into a message and exit code 1
/// (clap itself exits 2 on usage errors).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let log_format = cli.global.log_format.clone().unwrap_or_else(|| "text".into());
    crate::logging::init(&log_format);
    match cli.command {
        Command::Serve(a) => serve::run(&cli.global, a).await,
        Command::Topics(c) => topics::run(&cli.global, c).await,
        Command::Tail(a) => tail::run(&cli.global, a).await,
        Command::Schemas(a) => schemas::run(a),
        Command::Chatbus(c) => chatbus::run(&cli.global, c).await,
        Command::Keys(c) => keys::run(&cli.global, c).await,
        Command::Sites(c) => sites::run(&cli.global, c),
        Command::Openapi(a) => openapi::run(a),
        Command::Dlq(c) => dlq::run(&cli.global, c).await,
        Command::Purge(a) => ops::purge(&cli.global, a).await,
        Command::Erase(a) => ops::erase(&cli.global, a).await,
        Command::Replay(a) => ops::replay(&cli.global, a).await,
        Command::Compliance(a) => ops::compliance(&cli.global, a).await,
        Command::Audit(c) => audit::run(&cli.global, c).await,
    }
}
