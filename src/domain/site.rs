//! A site (a brand's account) as the domain decides with it: its switches, key lifetimes, retention,
//! PCI login policy, agent permission profiles and form templates. The configuration file builds it
//! (`[sites.<id>]`); the domain owns the type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::template::Template;

/// Retention of tokenized submissions when a site does not set `retention_months`.
pub const DEFAULT_RETENTION_MONTHS: u32 = 13;

/// One site (a brand's account).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Secure forms are switched on for this site.
    #[serde(default)]
    pub enabled: bool,
    /// Origins allowed to frame the form (the chat window).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// How many times a visitor may open a form before submitting it.
    #[serde(default = "defaults::reopen_limit")]
    pub reopen_limit: i32,
    #[serde(default = "defaults::open_key_ttl_secs")]
    pub open_key_ttl_secs: u64,
    #[serde(default = "defaults::submit_key_ttl_secs")]
    pub submit_key_ttl_secs: u64,
    #[serde(default = "defaults::retrieve_key_ttl_secs")]
    pub retrieve_key_ttl_secs: u64,
    #[serde(default = "defaults::off_record_ttl_secs")]
    pub off_record_ttl_secs: u64,
    #[serde(default = "defaults::retention_months")]
    pub retention_months: u32,
    /// The account's login policy; must meet the PCI settings for forms to be sent.
    pub pci_policy: Option<PciPolicy>,
    /// Agent permission profiles. `agent` (may use secure forms) and `agent_manager` exist unless
    /// redefined here.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    #[serde(default)]
    pub templates: Vec<Template>,
}

mod defaults {
    pub fn reopen_limit() -> i32 {
        3
    }
    pub fn open_key_ttl_secs() -> u64 {
        300
    }
    pub fn submit_key_ttl_secs() -> u64 {
        1800
    }
    pub fn retrieve_key_ttl_secs() -> u64 {
        60
    }
    pub fn off_record_ttl_secs() -> u64 {
        300
    }
    pub fn retention_months() -> u32 {
        super::DEFAULT_RETENTION_MONTHS
    }
}

/// The account settings the seed requires before secure forms may be used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PciPolicy {
    pub min_password_length: u32,
    pub failed_logins_before_disable: u32,
    /// `logout` is the only compliant value.
    pub idle_operator_action: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// "Use secure form within a conversation".
    #[serde(default)]
    pub use_secure_form: bool,
    /// "View secure form responses in conversation history" (off by default).
    #[serde(default)]
    pub view_secure_form_responses_in_history: bool,
}

impl SiteConfig {
    /// The profile named `name`, with the built-in defaults for `agent` and `agent_manager`.
    pub fn profile(&self, name: &str) -> Option<Profile> {
        if let Some(p) = self.profiles.get(name) {
            return Some(p.clone());
        }
        match name {
            "agent" => Some(Profile { use_secure_form: true, view_secure_form_responses_in_history: false }),
            "agent_manager" => Some(Profile::default()),
            _ => None,
        }
    }

    pub fn template(&self, id: &str) -> Option<&Template> {
        self.templates.iter().find(|t| t.id == id)
    }
}
