use rdkafka::message::Message;

use super::GlobalArgs;
use crate::crypto::{KeyRing, MasterKey, data_key_id, period_of};
use crate::events::{Codec, DataKeyCreated, Event, EventHeader, EventKind};
use crate::handlers::keys::read_key_metadata;
use crate::kafka::EventProducer;
use crate::kafka::reader::read_to_end;
use crate::service::{kafka_settings, master_key, resolve_brokers};
use crate::topics::Topic;

/// Keys: the master key and the per-site, per-month data keys it wraps.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Print a new random master key (base64) for SECUREFORMS_MASTER_KEY or master_key_file.
    #[command(
        after_help = "Example:\n  secureforms keys generate-master > /etc/secureforms/master.key && chmod 600 /etc/secureforms/master.key"
    )]
    GenerateMaster,
    /// Start a new data key generation for a site: new writes use it, old data stays readable.
    #[command(after_help = "Example:\n  secureforms keys rotate --site acme")]
    Rotate {
        #[arg(long)]
        site: String,
    },
    /// List data keys: id, site, period, generation and state (never key material).
    #[command(after_help = "Example:\n  secureforms keys list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(global: &GlobalArgs, cmd: KeysCommand) -> anyhow::Result<()> {
    if let KeysCommand::GenerateMaster = cmd {
        println!("{}", MasterKey::generate_base64().as_str());
        return Ok(());
    }
    let settings = global.settings()?;
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "keys");
    match cmd {
        KeysCommand::GenerateMaster => unreachable!("handled above"),
        KeysCommand::List { json } => {
            // Listing needs no key material: only what the events say.
            let keys = tokio::task::block_in_place(|| read_key_metadata(&kafka))?;
            let rows: Vec<serde_json::Value> = keys
                .iter()
                .map(|k| {
                    let mut row = serde_json::json!({"id": k.key_id, "site": k.site_id, "period": k.period, "generation": k.generation,
                        "master_key_id": k.master_key_id, "created_at": k.created_at,
                        "state": if k.is_destroyed() { "destroyed" } else { "active" }});
                    if let Some(reason) = &k.destroyed_reason {
                        row["destroyed_reason"] = reason.clone().into();
                    }
                    row
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<28} {:<10} {:<8} {:>4} {:<10} master", "key id", "site", "period", "gen", "state");
                for r in &rows {
                    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
                    println!(
                        "{:<28} {:<10} {:<8} {:>4} {:<10} {}",
                        s("id"),
                        s("site"),
                        s("period"),
                        r["generation"],
                        s("state"),
                        s("master_key_id")
                    );
                }
            }
            Ok(())
        }
        KeysCommand::Rotate { site } => {
            if !settings.sites.contains_key(&site) {
                anyhow::bail!("site {site:?} is not configured; rotate a site listed in the config file");
            }
            let records = tokio::task::block_in_place(|| read_to_end(&kafka, Topic::Keys))?;
            let events: Vec<Event> = records.iter().filter_map(|m| Codec::get().decode(m.payload()?).ok()).collect();
            let ring = KeyRing::new(master_key(&settings)?);
            for e in &events {
                match e {
                    Event::DataKeyCreated(k) => {
                        ring.created(k)?;
                    }
                    Event::DataKeyDestroyed(k) => ring.destroyed(k),
                    _ => {}
                }
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            let period = period_of(now);
            let generation = ring.current(&site, &period).map(|k| k.generation + 1).unwrap_or(1);
            let id = data_key_id(&site, &period, generation);
            let material = crate::crypto::KeyMaterial::random();
            let event = Event::DataKeyCreated(DataKeyCreated {
                header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), now, &site, "", &id),
                wrapped_key: ring.master().wrap(&id, &material)?,
                key_id: id.clone(),
                period,
                generation,
                master_key_id: ring.master().id().to_string(),
            });
            // Signed as the service signs it: only the master key's holders may create data keys.
            let signer = std::sync::Arc::new(crate::crypto::mac::EventSigner::new(ring.master()));
            EventProducer::new(&kafka)?.with_signer(signer).send(&event).await?;
            println!("rotated: new writes for {site} use {id} (older keys stay readable until purged)");
            Ok(())
        }
    }
}
