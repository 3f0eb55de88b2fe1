use super::GlobalArgs;
use crate::kafka::admin::Admin;
use crate::service::{apply_topics, kafka_settings, resolve_brokers};
use crate::topics::{Topic, TopicAction, TopicNames};

/// Topics as code: the files in topics/ against the broker.
#[derive(Debug, clap::Subcommand)]
pub enum TopicsCommand {
    /// Create missing topics and report drift; safe to run any number of times.
    #[command(after_help = "Example:\n  secureforms topics apply --brokers 127.0.0.1:9092")]
    Apply {
        /// Replication factor for created topics (3 on a production cluster).
        #[arg(long)]
        replication_factor: Option<i32>,
    },
    /// List the declared topics and what the broker has.
    #[command(after_help = "Example:\n  secureforms topics list")]
    List,
}

pub async fn run(global: &GlobalArgs, cmd: TopicsCommand) -> anyhow::Result<()> {
    let settings = global.settings()?;
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "cli");
    match cmd {
        TopicsCommand::Apply { replication_factor } => {
            let actions = apply_topics(&kafka, replication_factor.unwrap_or(settings.replication_factor)).await?;
            let mut drift = 0;
            for a in actions {
                match a {
                    TopicAction::Create { name, spec } => {
                        println!("created   {name} (partitions {}, {})", spec.partitions, spec.cleanup_policy)
                    }
                    TopicAction::UpToDate { name } => println!("ok        {name}"),
                    TopicAction::Drift { name, differences } => {
                        drift += 1;
                        println!("drift     {name}: {}", differences.join("; "))
                    }
                }
            }
            if drift > 0 {
                println!(
                    "{drift} topic(s) differ from topics/: change the broker or the file on purpose; apply never alters existing topics"
                );
            }
            if let Some(wrong) = Admin::new(&kafka)?.co_partitioning().await? {
                anyhow::bail!("{wrong}; secureforms serve refuses to start until they match");
            }
            Ok(())
        }
        TopicsCommand::List => {
            let names = TopicNames::new(settings.topic_prefix.clone());
            let admin = Admin::new(&kafka)?;
            let kind = admin.broker_kind().await?;
            let observed = admin.observe(&names).await?;
            println!("broker: {}", kind.name());
            println!("{:<34} {:>10} {:>8} {:<8} {:<14} key", "topic", "partitions", "broker", "cleanup", "retention");
            for &t in Topic::ALL {
                let spec = t.spec();
                let name = names.name(t);
                let broker = observed.get(&name).map(|o| o.partitions.to_string()).unwrap_or_else(|| "missing".into());
                println!(
                    "{:<34} {:>10} {:>8} {:<8} {:<14} {}",
                    name,
                    spec.partitions,
                    broker,
                    spec.cleanup_policy,
                    spec.retention_text(),
                    spec.key
                );
            }
            Ok(())
        }
    }
}
