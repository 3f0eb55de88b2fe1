use anyhow::Context;

use super::GlobalArgs;
use crate::kafka::runtime::system_clock;

/// Run the service until SIGINT or SIGTERM: issue forms from the chat bus's events, serve the
/// visitor page and the agent API on http_listen, tokenize submissions into the vault, and keep the
/// projections. Needs the master key (SECUREFORMS_MASTER_KEY or --master-key-file).
///
/// Without --brokers it starts the embedded broker (tansu, from scripts/install-broker.sh) with its
/// data in the data directory, so everything survives a restart.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  secureforms serve --config config/demo.toml\n  secureforms serve --brokers kafka-1:9092,kafka-2:9092 --config /etc/secureforms.toml"
)]
pub struct Args {}

pub async fn run(global: &GlobalArgs, _args: Args) -> anyhow::Result<()> {
    let settings = global.settings()?;
    crate::service::serve(settings, system_clock(), shutdown_signal())
        .await
        .context("the service stopped with an error")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the service");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
