use rdkafka::message::Message;

use super::GlobalArgs;
use crate::crypto::{KeyError, KeyRing, MasterKey, data_key_id, period_of};
use crate::events::{Codec, DataKeyCreated, Event, EventHeader, EventKind};
use crate::handlers::keys::read_key_metadata;
use crate::kafka::EventProducer;
use crate::kafka::reader::read_to_end;
use crate::service::{integrity_key, kafka_settings, key_ring, master_key, resolve_brokers};
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
    /// List data keys: id, site, period, generation, state and the master key that wraps each (never
    /// key material).
    #[command(after_help = "Example:\n  secureforms keys list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print the integrity key (base64): the root of the event MACs and the audit chain. Run it once
    /// with the master key in use before its first rotation, save the output to a private file and
    /// set integrity_key_file, so events already written stay verifiable after the old master key is
    /// destroyed.
    #[command(
        after_help = "Example:\n  secureforms keys export-integrity > /etc/secureforms/integrity.key && chmod 600 /etc/secureforms/integrity.key"
    )]
    ExportIntegrity,
    /// Re-wrap every live data key with the current master key (after a master key rotation; the
    /// old one listed in previous_master_key_files). Destroyed keys are not re-wrapped: once the old
    /// master key is destroyed, no copy of them anywhere can be opened.
    #[command(after_help = "Example:\n  secureforms keys rewrap")]
    Rewrap,
}

/// Builds the key ring from the keys topic's records. Records of master keys this ring does not hold
/// are counted, not fatal: they are history once the keys they carry were re-wrapped.
fn ring_from(records: &[rdkafka::message::OwnedMessage], ring: KeyRing) -> anyhow::Result<(KeyRing, usize)> {
    let mut unknown = std::collections::BTreeSet::new();
    for m in records {
        match m.payload().map(|p| Codec::get().decode(p)) {
            Some(Ok(Event::DataKeyCreated(k))) => match ring.created(&k) {
                Ok(_) => {
                    unknown.remove(&k.key_id);
                }
                Err(KeyError::UnknownMaster { key_id, .. }) => {
                    unknown.insert(key_id);
                }
                Err(e) => return Err(e.into()),
            },
            Some(Ok(Event::DataKeyDestroyed(k))) => {
                unknown.remove(&k.key_id);
                ring.destroyed(&k);
            }
            _ => {}
        }
    }
    Ok((ring, unknown.len()))
}

pub async fn run(global: &GlobalArgs, cmd: KeysCommand) -> anyhow::Result<()> {
    if let KeysCommand::GenerateMaster = cmd {
        println!("{}", MasterKey::generate_base64().as_str());
        return Ok(());
    }
    let settings = global.settings()?;
    if let KeysCommand::ExportIntegrity = cmd {
        let master = master_key(&settings)?;
        println!("{}", integrity_key(&settings, &master)?.to_base64().as_str());
        return Ok(());
    }
    let kafka = kafka_settings(&settings, resolve_brokers(&settings)?, "keys");
    match cmd {
        KeysCommand::GenerateMaster | KeysCommand::ExportIntegrity => unreachable!("handled above"),
        KeysCommand::Rewrap => {
            let records = tokio::task::block_in_place(|| read_to_end(&kafka, Topic::Keys))?;
            let (ring, unknown) = ring_from(&records, key_ring(&settings)?)?;
            let signer =
                std::sync::Arc::new(crate::crypto::mac::EventSigner::new(&integrity_key(&settings, ring.master())?));
            let producer = EventProducer::new(&kafka)?.with_signer(signer);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            let todo = ring.not_under_current_master();
            for k in &todo {
                let event = Event::DataKeyCreated(DataKeyCreated {
                    header: EventHeader::new(EventKind::DataKeyCreated, uuid::Uuid::new_v4(), now, &k.site, "", &k.id),
                    wrapped_key: ring.master().wrap(&k.id, &k.material)?,
                    key_id: k.id.clone(),
                    period: k.period.clone(),
                    generation: k.generation,
                    master_key_id: ring.master().id().to_string(),
                });
                producer.send(&event).await?;
                println!("re-wrapped {} (was {}) with {}", k.id, k.master_key_id, ring.master().id());
            }
            println!("{} data key(s) re-wrapped with master key {}", todo.len(), ring.master().id());
            if unknown > 0 {
                anyhow::bail!(
                    "{unknown} live data key(s) are wrapped by a master key this configuration does not have: list it in previous_master_key_files and run `secureforms keys rewrap` again (`secureforms keys list` names it)"
                );
            }
            Ok(())
        }
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
            let (ring, _) = ring_from(&records, key_ring(&settings)?)?;
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
            // Signed as the service signs it: only the key holders may create data keys.
            let signer =
                std::sync::Arc::new(crate::crypto::mac::EventSigner::new(&integrity_key(&settings, ring.master())?));
            EventProducer::new(&kafka)?.with_signer(signer).send(&event).await?;
            println!("rotated: new writes for {site} use {id} (older keys stay readable until purged)");
            Ok(())
        }
    }
}
