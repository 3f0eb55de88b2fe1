use super::GlobalArgs;
use crate::domain::policy::pci_gaps;

/// Sites as configured: whether each may send secure forms, and what to change if not.
#[derive(Debug, clap::Subcommand)]
pub enum SitesCommand {
    /// Check every site's PCI account policy (passwords >= 7 characters, disable after <= 3 failed
    /// logins, idle operators logged out), whether it is enabled, and its templates. Exits 1 when an
    /// enabled site cannot send forms.
    #[command(
        after_help = "Example:\n  secureforms sites check --config /etc/secureforms.toml\n  secureforms sites check --json"
    )]
    Check {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(global: &GlobalArgs, cmd: SitesCommand) -> anyhow::Result<()> {
    let settings = global.settings()?;
    let SitesCommand::Check { json } = cmd;
    let mut failing = 0;
    let mut rows = Vec::new();
    for (id, site) in &settings.sites {
        let gaps = pci_gaps(site.pci_policy.as_ref());
        let status = if !site.enabled {
            "disabled"
        } else if gaps.is_empty() {
            "ok"
        } else {
            failing += 1;
            "not_pci_compliant"
        };
        let mut todo: Vec<String> = gaps.clone();
        if !site.enabled {
            todo.push("set enabled = true to allow secure forms".into());
        }
        if site.templates.is_empty() {
            todo.push("define at least one [[sites.<id>.templates]]".into());
        }
        rows.push(
            serde_json::json!({"site": id, "status": status, "enabled": site.enabled, "templates": site.templates.len(),
            "retention_months": site.retention_months, "to_change": todo}),
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!(
            "no sites configured: add [sites.<id>] tables to the config file (see config/secureforms.example.toml)"
        );
    } else {
        for r in &rows {
            println!(
                "{:<16} {:<18} templates {:<3} retention {} months",
                r["site"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or(""),
                r["templates"],
                r["retention_months"]
            );
            for t in r["to_change"].as_array().into_iter().flatten() {
                println!("  - {}", t.as_str().unwrap_or(""));
            }
        }
    }
    if failing > 0 {
        anyhow::bail!(
            "{failing} enabled site(s) cannot send secure forms until their account policy changes (listed above)"
        );
    }
    Ok(())
}
