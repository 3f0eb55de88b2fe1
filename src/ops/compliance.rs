//! `secureforms compliance`: per site, which of the seed's controls hold, from the configuration and
//! the keys topic (key metadata only; no key material is read or unwrapped).
//!
//! Controls: the PCI account policy gate, the permissions that send and read forms, the retention
//! setting and the purge worker, and the age of every live data key (a key whose period has fully
//! expired should have been destroyed).

use serde::Serialize;

use crate::config::{DEFAULT_RETENTION_MONTHS, Settings};
use crate::domain::policy::pci_gaps;
use crate::domain::retention::{format_ms, period_end, period_expired};
pub use crate::handlers::keys::KeyMeta;
use crate::handlers::keys::read_key_metadata;
use crate::kafka::KafkaSettings;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Control {
    pub control: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do when it does not hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyAge {
    pub key_id: String,
    pub period: String,
    pub state: &'static str,
    /// Whole days since the period ended (negative: the period is current).
    pub days_since_period_end: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SiteCompliance {
    pub site_id: String,
    pub status: Status,
    pub controls: Vec<Control>,
    pub keys: Vec<KeyAge>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ComplianceReport {
    pub as_of: String,
    pub sites: Vec<SiteCompliance>,
}

/// Key metadata from the keys topic; a deployment that never ran has no keys topic, and no keys.
pub fn read_keys(kafka: &KafkaSettings) -> Result<Vec<KeyMeta>, crate::kafka::KafkaError> {
    match read_key_metadata(kafka) {
        Err(crate::kafka::KafkaError::NoSuchTopic(_)) => Ok(Vec::new()),
        other => other,
    }
}

/// The report as of `now` (ms).
pub fn report(settings: &Settings, keys: &[KeyMeta], now: i64) -> ComplianceReport {
    let mut sites = Vec::new();
    let mut ids: Vec<String> = settings.sites.keys().cloned().collect();
    for k in keys {
        if !ids.contains(&k.site_id) {
            ids.push(k.site_id.clone());
        }
    }
    for id in ids {
        let site = settings.sites.get(&id);
        let mut controls = Vec::new();
        let months = site.map(|s| s.retention_months).unwrap_or(DEFAULT_RETENTION_MONTHS);
        match site {
            None => controls.push(Control {
                control: "configured",
                status: Status::Warn,
                detail: "the site has data keys but no [sites.<id>] table; it is purged with the default retention"
                    .into(),
                fix: Some(format!(
                    "add [sites.{id}] to the config, or let its data expire after {DEFAULT_RETENTION_MONTHS} months"
                )),
            }),
            Some(s) => {
                let gaps = pci_gaps(s.pci_policy.as_ref());
                controls.push(if gaps.is_empty() {
                    Control {
                        control: "policy_gate",
                        status: Status::Pass,
                        detail: "the account login policy meets the PCI settings".into(),
                        fix: None,
                    }
                } else {
                    Control {
                        control: "policy_gate",
                        status: if s.enabled { Status::Fail } else { Status::Warn },
                        detail: "forms are refused (site_not_pci_compliant) until the account login policy changes"
                            .into(),
                        fix: Some(gaps.join("; ")),
                    }
                });
                let mut names: Vec<String> = s.profiles.keys().cloned().collect();
                for builtin in ["agent", "agent_manager"] {
                    if !names.iter().any(|n| n == builtin) {
                        names.push(builtin.into());
                    }
                }
                names.sort();
                let senders: Vec<&String> =
                    names.iter().filter(|n| s.profile(n).is_some_and(|p| p.use_secure_form)).collect();
                let readers: Vec<&String> = names
                    .iter()
                    .filter(|n| s.profile(n).is_some_and(|p| p.view_secure_form_responses_in_history))
                    .collect();
                controls.push(Control {
                    control: "permissions",
                    status: if senders.is_empty() && s.enabled { Status::Warn } else { Status::Pass },
                    detail: format!(
                        "send and retrieve (sender only, live conversation): {}; history view: {}",
                        if senders.is_empty() { "no profile".to_string() } else { join(&senders) },
                        if readers.is_empty() { "no profile (the default)".to_string() } else { join(&readers) }
                    ),
                    fix: (senders.is_empty() && s.enabled)
                        .then(|| "give a profile use_secure_form = true, or no agent can send forms".into()),
                });
                controls.push(if s.allowed_origins.is_empty() {
                    Control {
                        control: "framing",
                        status: Status::Warn,
                        detail:
                            "no allowed_origins: the form cannot be framed by the chat window (frame-ancestors 'none')"
                                .into(),
                        fix: Some("set allowed_origins to the chat window's origin(s)".into()),
                    }
                } else {
                    Control {
                        control: "framing",
                        status: Status::Pass,
                        detail: format!("frame-ancestors {}", s.allowed_origins.join(" ")),
                        fix: None,
                    }
                });
            }
        }
        controls.push(if months <= DEFAULT_RETENTION_MONTHS {
            Control {
                control: "retention",
                status: Status::Pass,
                detail: format!("tokenized submissions are purged {months} months after submission"),
                fix: None,
            }
        } else {
            Control {
                control: "retention",
                status: Status::Fail,
                detail: format!(
                    "retention is {months} months, longer than the {DEFAULT_RETENTION_MONTHS} the policy allows"
                ),
                fix: Some(format!("set retention_months to {DEFAULT_RETENTION_MONTHS} or less")),
            }
        });
        controls.push(if settings.purge_interval_secs > 0 {
            Control {
                control: "purge_worker",
                status: Status::Pass,
                detail: format!("runs every {} s on nodes with this config", settings.purge_interval_secs),
                fix: None,
            }
        } else {
            Control {
                control: "purge_worker",
                status: Status::Warn,
                detail: "purge_interval_secs = 0: this config runs no purge worker".into(),
                fix: Some("run the worker on at least one node, or schedule `secureforms purge` daily".into()),
            }
        });
        let mut ages = Vec::new();
        let mut overdue = Vec::new();
        for k in keys.iter().filter(|k| k.site_id == id) {
            let end = period_end(&k.period).unwrap_or(now);
            ages.push(KeyAge {
                key_id: k.key_id.clone(),
                period: k.period.clone(),
                state: if k.is_destroyed() { "destroyed" } else { "active" },
                days_since_period_end: (now - end).div_euclid(86_400_000),
            });
            if !k.is_destroyed() && period_expired(&k.period, months, now) {
                overdue.push(k.key_id.clone());
            }
        }
        let active = ages.iter().filter(|a| a.state == "active").count();
        controls.push(if overdue.is_empty() {
            Control {
                control: "key_ages",
                status: Status::Pass,
                detail: format!("{active} active data keys, none past retention; {} destroyed", ages.len() - active),
                fix: None,
            }
        } else {
            Control {
                control: "key_ages",
                status: Status::Fail,
                detail: format!("keys past retention still active: {}", overdue.join(", ")),
                fix: Some("run `secureforms purge` (or check the purge worker's log)".into()),
            }
        });
        let status = controls.iter().map(|c| c.status).max().unwrap_or(Status::Pass);
        sites.push(SiteCompliance { site_id: id, status, controls, keys: ages });
    }
    ComplianceReport { as_of: format_ms(now), sites }
}

fn join(names: &[&String]) -> String {
    names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// Plain-text rendering, one block per site.
pub fn render_text(r: &ComplianceReport) -> String {
    let mut out = format!("compliance as of {}\n", r.as_of);
    if r.sites.is_empty() {
        out.push_str("no sites configured and no data keys on the keys topic\n");
    }
    for s in &r.sites {
        out.push_str(&format!("\nsite {}  {}\n", s.site_id, s.status.label()));
        for c in &s.controls {
            out.push_str(&format!("  {:<5} {:<13} {}\n", c.status.label(), c.control, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("        fix: {fix}\n"));
            }
        }
        for k in &s.keys {
            let age = if k.days_since_period_end < 0 {
                "the current period".to_string()
            } else {
                format!("ended {} days ago", k.days_since_period_end)
            };
            out.push_str(&format!("        key {:<32} {:<9} period {} ({age})\n", k.key_id, k.state, k.period));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PciPolicy, SiteConfig};

    fn site(policy: bool, months: u32) -> SiteConfig {
        let mut s: SiteConfig = toml::from_str("enabled = true\nallowed_origins = [\"https://chat.example\"]").unwrap();
        s.retention_months = months;
        s.pci_policy = policy.then(|| PciPolicy {
            min_password_length: 8,
            failed_logins_before_disable: 3,
            idle_operator_action: "logout".into(),
        });
        s
    }

    fn key(id: &str, site: &str, period: &str, destroyed: bool) -> KeyMeta {
        KeyMeta {
            key_id: id.into(),
            site_id: site.into(),
            period: period.into(),
            generation: 1,
            master_key_id: "mk-test".into(),
            created_at: None,
            destroyed_reason: destroyed.then(|| "retention".into()),
        }
    }

    #[test]
    fn each_control_passes_or_fails_on_its_own_evidence() {
        let mut settings = Settings::default();
        settings.sites.insert("good".into(), site(true, 13));
        settings.sites.insert("weak".into(), site(false, 24));
        let now = crate::domain::retention::parse_as_of("2027-06-30").unwrap();
        let keys = vec![
            key("good.2027-06.g1", "good", "2027-06", false),
            key("good.2025-01.g1", "good", "2025-01", true),
            key("weak.2025-01.g1", "weak", "2025-01", false),
        ];
        let r = report(&settings, &keys, now);
        let good = r.sites.iter().find(|s| s.site_id == "good").unwrap();
        assert_eq!(good.status, Status::Pass, "{good:?}");
        assert_eq!(good.keys.len(), 2);
        let weak = r.sites.iter().find(|s| s.site_id == "weak").unwrap();
        let status = |c: &str| weak.controls.iter().find(|x| x.control == c).unwrap().status;
        assert_eq!(status("policy_gate"), Status::Fail);
        assert_eq!(status("retention"), Status::Fail);
        // 24 months: the 2025-01 key expired on 2027-02-01 and is still active.
        assert_eq!(status("key_ages"), Status::Fail);
        assert_eq!(weak.status, Status::Fail);
        let text = render_text(&r);
        assert!(text.contains("site weak  FAIL") && text.contains("fix: set retention_months"), "{text}");
        // An unconfigured site with keys is reported, not dropped.
        let r = report(&Settings::default(), &[key("ghost.2027-06.g1", "ghost", "2027-06", false)], now);
        assert_eq!(r.sites[0].controls[0].control, "configured");
    }
}
