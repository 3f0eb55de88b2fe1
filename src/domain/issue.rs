//! Step 1 of the flow: a FormSent from the chat bus becomes FormIssued (with the visitor link and its
//! one-time open key) or FormRejected (with a stable reason code).

use std::collections::BTreeMap;

use super::site::SiteConfig;
use crate::domain::otk::{OtkSecret, Purpose};
use crate::domain::policy::pci_gaps;
use crate::events::{Event, EventHeader, EventKind, FormIssued, FormRejected, FormSent, derived_event_id};

/// Why a form was not issued. The codes are part of the FormRejected contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    UnknownSite,
    SiteDisabled,
    SiteNotPciCompliant(Vec<String>),
    UnknownProfile(String),
    PermissionDenied,
    UnknownTemplate,
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::UnknownSite => "unknown_site",
            Rejection::SiteDisabled => "site_disabled",
            Rejection::SiteNotPciCompliant(_) => "site_not_pci_compliant",
            Rejection::UnknownProfile(_) => "unknown_profile",
            Rejection::PermissionDenied => "permission_denied",
            Rejection::UnknownTemplate => "unknown_template",
        }
    }

    pub fn detail(&self, sent: &FormSent) -> String {
        match self {
            Rejection::UnknownSite => format!("site {:?} is not configured for secure forms", sent.header.site_id),
            Rejection::SiteDisabled => format!("secure forms are not enabled for site {:?}", sent.header.site_id),
            Rejection::SiteNotPciCompliant(gaps) => {
                format!("the site's account policy does not meet PCI settings: {}", gaps.join("; "))
            }
            Rejection::UnknownProfile(p) => format!("agent profile {p:?} is not defined for this site"),
            Rejection::PermissionDenied => format!(
                "agent {:?} (profile {:?}) lacks the \"use secure form within a conversation\" permission",
                sent.agent_id, sent.agent_profile
            ),
            Rejection::UnknownTemplate => format!("template {:?} is not defined for this site", sent.template_id),
        }
    }
}

/// Everything the decision needs beyond the sites catalogue, prepared by the caller.
pub struct IssueInput<'a> {
    pub sent: &'a FormSent,
    pub now_ms: i64,
    /// A fresh key; used only when the form is issued.
    pub open_key: &'a OtkSecret,
    /// Base URL of the visitor gateway.
    pub public_url: &'a str,
}

/// Checks the site, its policy, the agent's permission and the template, in that order.
pub fn check(sites: &BTreeMap<String, SiteConfig>, sent: &FormSent) -> Result<(), Rejection> {
    let site = sites.get(&sent.header.site_id).ok_or(Rejection::UnknownSite)?;
    if !site.enabled {
        return Err(Rejection::SiteDisabled);
    }
    let gaps = pci_gaps(site.pci_policy.as_ref());
    if !gaps.is_empty() {
        return Err(Rejection::SiteNotPciCompliant(gaps));
    }
    let profile =
        site.profile(&sent.agent_profile).ok_or_else(|| Rejection::UnknownProfile(sent.agent_profile.clone()))?;
    if !profile.use_secure_form {
        return Err(Rejection::PermissionDenied);
    }
    site.template(&sent.template_id).ok_or(Rejection::UnknownTemplate)?;
    Ok(())
}

/// The visitor link for a form: the gateway's `/f/{site}/{form}` page with the open key.
pub fn visitor_link(public_url: &str, site_id: &str, form_id: &str, key: &OtkSecret) -> String {
    let mut url = url::Url::parse(public_url).expect("public_url is validated at load");
    url.path_segments_mut().expect("http(s) URL has a path").pop_if_empty().extend(["f", site_id, form_id]);
    url.query_pairs_mut().append_pair("k", key.expose());
    url.to_string()
}

/// Decides the outcome of a FormSent. The output's event id is derived from the input's, so
/// re-processing the same FormSent yields an event consumers recognise as the same one.
pub fn decide(sites: &BTreeMap<String, SiteConfig>, input: &IssueInput<'_>) -> Event {
    let sent = input.sent;
    let h = &sent.header;
    match check(sites, sent) {
        Ok(()) => {
            let site = &sites[&h.site_id];
            let template = site.template(&sent.template_id).expect("checked above");
            let header = EventHeader::new(
                EventKind::FormIssued,
                derived_event_id(&h.event_id, EventKind::FormIssued),
                input.now_ms,
                &h.site_id,
                &h.conversation_id,
                &sent.form_id,
            );
            Event::FormIssued(FormIssued {
                header,
                form_id: sent.form_id.clone(),
                agent_id: sent.agent_id.clone(),
                template_id: sent.template_id.clone(),
                template_version: template.version,
                link: visitor_link(input.public_url, &h.site_id, &sent.form_id, input.open_key),
                open_key_hash: input.open_key.hash(Purpose::Open, &h.site_id, &sent.form_id),
                open_expires_at: input.now_ms + (site.open_key_ttl_secs as i64) * 1000,
                reopen_limit: site.reopen_limit,
            })
        }
        Err(rejection) => {
            let header = EventHeader::new(
                EventKind::FormRejected,
                derived_event_id(&h.event_id, EventKind::FormRejected),
                input.now_ms,
                &h.site_id,
                &h.conversation_id,
                &sent.form_id,
            );
            Event::FormRejected(FormRejected {
                header,
                form_id: sent.form_id.clone(),
                agent_id: sent.agent_id.clone(),
                template_id: sent.template_id.clone(),
                reason: rejection.code().to_string(),
                detail: rejection.detail(sent),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::site::{PciPolicy, Profile};
    use crate::domain::template::{QuestionKind, QuestionSpec, Template};

    fn compliant() -> PciPolicy {
        PciPolicy { min_password_length: 8, failed_logins_before_disable: 3, idle_operator_action: "logout".into() }
    }

    fn site() -> SiteConfig {
        let mut profiles = BTreeMap::new();
        profiles.insert(
            "no-forms".to_string(),
            Profile { use_secure_form: false, view_secure_form_responses_in_history: false },
        );
        SiteConfig {
            enabled: true,
            allowed_origins: vec![],
            reopen_limit: 2,
            open_key_ttl_secs: 300,
            submit_key_ttl_secs: 1800,
            retrieve_key_ttl_secs: 60,
            off_record_ttl_secs: 300,
            retention_months: 13,
            pci_policy: Some(compliant()),
            profiles,
            templates: vec![Template {
                id: "pay".into(),
                version: 4,
                title: "Pay".into(),
                instructions: String::new(),
                questions: vec![QuestionSpec::required("pan", "Card number", QuestionKind::CardNumber)],
            }],
        }
    }

    fn sent(site: &str, profile: &str, template: &str) -> FormSent {
        FormSent {
            header: EventHeader::new(EventKind::FormSent, uuid::Uuid::from_u128(9), 1, site, "conv-1", "corr"),
            form_id: "form-1".into(),
            agent_id: "agent-7".into(),
            agent_profile: profile.into(),
            template_id: template.into(),
            visitor_ref: None,
            agent_session_id: None,
        }
    }

    /// given the sites, when this FormSent arrives, then expect this event.
    fn when(sites: &BTreeMap<String, SiteConfig>, s: &FormSent) -> Event {
        let key = OtkSecret::parse("AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        decide(sites, &IssueInput { sent: s, now_ms: 1_000, open_key: &key, public_url: "https://forms.example/base/" })
    }

    fn rejected_reason(e: Event) -> String {
        match e {
            Event::FormRejected(r) => r.reason,
            other => panic!("expected FormRejected, got {other:?}"),
        }
    }

    fn given(site: SiteConfig) -> BTreeMap<String, SiteConfig> {
        BTreeMap::from([("acme".to_string(), site)])
    }

    #[test]
    fn a_valid_form_is_issued_with_a_link_and_a_hashed_open_key() {
        let e = when(&given(site()), &sent("acme", "agent", "pay"));
        let Event::FormIssued(i) = e else { panic!("expected FormIssued") };
        assert_eq!(i.link, "https://forms.example/base/f/acme/form-1?k=AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(i.template_version, 4);
        assert_eq!(i.open_expires_at, 1_000 + 300_000);
        assert_eq!(i.reopen_limit, 2);
        assert!(!i.open_key_hash.contains("AAAA"));
        let key = OtkSecret::parse("AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert!(key.verify(&i.open_key_hash, Purpose::Open, "acme", "form-1"));
        assert_eq!(i.header.conversation_id, "conv-1");
        assert_eq!(i.header.correlation_id, "form-1");
    }

    #[test]
    fn each_reason_to_refuse_is_reported() {
        assert_eq!(rejected_reason(when(&given(site()), &sent("nope", "agent", "pay"))), "unknown_site");
        let mut disabled = site();
        disabled.enabled = false;
        assert_eq!(rejected_reason(when(&given(disabled), &sent("acme", "agent", "pay"))), "site_disabled");
        let mut weak = site();
        weak.pci_policy.as_mut().unwrap().min_password_length = 4;
        assert_eq!(rejected_reason(when(&given(weak), &sent("acme", "agent", "pay"))), "site_not_pci_compliant");
        assert_eq!(rejected_reason(when(&given(site()), &sent("acme", "ghost", "pay"))), "unknown_profile");
        assert_eq!(rejected_reason(when(&given(site()), &sent("acme", "no-forms", "pay"))), "permission_denied");
        assert_eq!(rejected_reason(when(&given(site()), &sent("acme", "agent", "nope"))), "unknown_template");
    }

    #[test]
    fn the_output_id_is_derived_from_the_input_id() {
        let sites = given(site());
        let a = when(&sites, &sent("acme", "agent", "pay"));
        let b = when(&sites, &sent("acme", "agent", "pay"));
        assert_eq!(a.header().event_id, b.header().event_id);
        assert_ne!(a.header().event_id, uuid::Uuid::from_u128(9).to_string());
    }
}
