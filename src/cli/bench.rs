use super::GlobalArgs;
use crate::bench::{BenchOptions, run as run_bench};
use crate::service::resolve_brokers;

/// Measure throughput and latency against a broker: raw consume->produce passthrough, the
/// tokenizer's durable path, their ratio, and FormSubmitted->FormReady latency (p50/p99).
///
/// Uses fresh topics under a unique prefix; leaves them behind (delete them on a shared cluster).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  scripts/bench.sh\n  secureforms bench --brokers 127.0.0.1:9092 --records 20000 --json"
)]
pub struct Args {
    /// Records for the throughput phases.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Steady produce rate for the latency phase (records/s).
    #[arg(long, default_value_t = 200)]
    latency_rate: u32,
    /// Duration of the latency phase (seconds).
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Steady request rate for the agent retrieve phase (requests/s).
    #[arg(long, default_value_t = 1000)]
    retrieve_rate: u32,
    /// Duration of the agent retrieve phase (seconds).
    #[arg(long, default_value_t = 5)]
    retrieve_secs: u64,
    /// Run with the client settings from before the latency tuning (linger.ms=2, Nagle on,
    /// fetch.wait.max.ms=20 on every broker), to
    /// compare: the report of a run with and one without says what the tuning buys.
    #[arg(long)]
    untuned: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(global: &GlobalArgs, args: Args) -> anyhow::Result<()> {
    if args.records == 0
        || args.latency_rate == 0
        || args.latency_secs == 0
        || args.retrieve_rate == 0
        || args.retrieve_secs == 0
    {
        anyhow::bail!(
            "--records, --latency-rate, --latency-secs, --retrieve-rate and --retrieve-secs must be at least 1"
        );
    }
    let mut settings = global.settings()?;
    if args.untuned {
        for (k, v) in [("linger.ms", "2"), ("socket.nagle.disable", "false"), ("fetch.wait.max.ms", "20")] {
            settings.kafka_properties.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }
    let brokers = resolve_brokers(&settings)?;
    let report = run_bench(
        &settings,
        &brokers,
        &BenchOptions {
            records: args.records,
            latency_rate: args.latency_rate,
            latency_secs: args.latency_secs,
            retrieve_rate: args.retrieve_rate,
            retrieve_secs: args.retrieve_secs,
        },
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
