use crate::events::Codec;

/// List every event schema the service reads and writes, with its version, fingerprint and topic.
///
/// Records are framed with Avro single-object encoding: C3 01, then the 8-byte little-endian
/// CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form shown here (what every standard
/// Avro library computes), then the Avro body. The legacy fingerprint is what versions before 0.2
/// wrote; records carrying it are still read.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  secureforms schemas\n  secureforms schemas --json | jq '.[] | select(.current)'")]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let entries = Codec::get().entries();
    if args.json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.kind.name(), "version": e.version, "current": e.current,
                    "fingerprint": hex::encode(e.fingerprint),
                    "legacy_fingerprint": hex::encode(e.legacy_fingerprint), "file": format!("schemas/{}", e.file),
                    "topic": e.kind.topic().suffix(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<24} {:>7} {:<18} {:<18} {:<14} file",
            "schema", "version", "fingerprint", "legacy (read)", "topic"
        );
        for e in entries {
            let v = if e.current { format!("{}", e.version) } else { format!("{} (old)", e.version) };
            println!(
                "{:<24} {:>7} {:<18} {:<18} {:<14} schemas/{}",
                e.kind.name(),
                v,
                hex::encode(e.fingerprint),
                hex::encode(e.legacy_fingerprint),
                e.kind.topic().suffix(),
                e.file
            );
        }
    }
    Ok(())
}
