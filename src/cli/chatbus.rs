use anyhow::Context;

use super::GlobalArgs;
use crate::events::{ConversationClosed, ConversationTransferred, Event, EventHeader, EventKind, FormSent};
use crate::kafka::EventProducer;
use crate::service::{kafka_settings, resolve_brokers};
use crate::topics::Topic;

/// Act as the upstream chat bus: produce its events (for demos, tests and troubleshooting).
#[derive(Debug, clap::Subcommand)]
pub enum ChatbusCommand {
    /// Produce a FormSent: an agent sends a secure form in a conversation.
    #[command(
        after_help = "Example:\n  secureforms chatbus send-form --site acme --conversation c-1 --agent a-7 --template card-payment"
    )]
    SendForm {
        #[arg(long)]
        site: String,
        #[arg(long)]
        conversation: String,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        template: String,
        /// The agent's permission profile.
        #[arg(long, default_value = "agent")]
        profile: String,
        /// Form instance id (a new UUID when omitted).
        #[arg(long)]
        form_id: Option<String>,
        /// The agent's session (the token's `sid`): the FormReady key is then usable only from it.
        #[arg(long)]
        agent_session: Option<String>,
    },
    /// Produce a ConversationTransferred (kind transfer or reassign).
    #[command(
        after_help = "Example:\n  secureforms chatbus transfer --site acme --conversation c-1 --from a-7 --to a-9"
    )]
    Transfer {
        #[arg(long)]
        site: String,
        #[arg(long)]
        conversation: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "transfer", value_parser = ["transfer", "reassign"])]
        kind: String,
    },
    /// Produce a ConversationClosed.
    #[command(after_help = "Example:\n  secureforms chatbus close --site acme --conversation c-1")]
    Close {
        #[arg(long)]
        site: String,
        #[arg(long)]
        conversation: String,
    },
    /// Produce raw bytes to the chat-events topic (to see how bad records are dead-lettered).
    #[command(after_help = "Example:\n  secureforms chatbus raw --key c-1 --text 'not avro'")]
    Raw {
        #[arg(long)]
        key: String,
        #[arg(long)]
        text: String,
    },
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn header(kind: EventKind, site: &str, conversation: &str, correlation: &str) -> EventHeader {
    EventHeader::new(kind, uuid::Uuid::new_v4(), now_ms(), site, conversation, correlation)
}

pub async fn run(global: &GlobalArgs, cmd: ChatbusCommand) -> anyhow::Result<()> {
    let settings = global.settings()?;
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "chatbus");
    let producer = EventProducer::new(&kafka)?;
    let event = match cmd {
        ChatbusCommand::SendForm { site, conversation, agent, template, profile, form_id, agent_session } => {
            let form_id = form_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            Event::FormSent(FormSent {
                header: header(EventKind::FormSent, &site, &conversation, &form_id),
                form_id,
                agent_id: agent,
                agent_profile: profile,
                template_id: template,
                visitor_ref: None,
                agent_session_id: agent_session,
            })
        }
        ChatbusCommand::Transfer { site, conversation, from, to, kind } => {
            Event::ConversationTransferred(ConversationTransferred {
                header: header(EventKind::ConversationTransferred, &site, &conversation, &conversation),
                from_agent_id: from,
                to_agent_id: to,
                kind,
            })
        }
        ChatbusCommand::Close { site, conversation } => Event::ConversationClosed(ConversationClosed {
            header: header(EventKind::ConversationClosed, &site, &conversation, &conversation),
            closed_by: "agent".into(),
            reason: "resolved".into(),
        }),
        ChatbusCommand::Raw { key, text } => {
            let (p, o) = producer
                .send_raw(Topic::ChatEvents, key.as_bytes(), text.as_bytes())
                .await
                .context("producing the raw record")?;
            println!("{{\"produced\":\"raw\",\"partition\":{p},\"offset\":{o}}}");
            return Ok(());
        }
    };
    let (p, o) = producer.send(&event).await.context("producing the event")?;
    println!(
        "{}",
        serde_json::json!({"produced": event.kind().name(), "event_id": event.header().event_id, "correlation_id": event.header().correlation_id, "partition": p, "offset": o})
    );
    Ok(())
}
