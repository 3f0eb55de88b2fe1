//! The PCI account policy gate: a site whose login policy does not meet the seed's settings cannot
//! send secure forms.

use super::site::PciPolicy;

pub const MIN_PASSWORD_LENGTH: u32 = 7;
pub const MAX_FAILED_LOGINS: u32 = 3;
pub const IDLE_ACTION: &str = "logout";

/// What must change for the site's policy to comply; empty when it complies.
pub fn pci_gaps(policy: Option<&PciPolicy>) -> Vec<String> {
    let Some(p) = policy else {
        return vec![format!(
            "no pci_policy is configured: set min_password_length >= {MIN_PASSWORD_LENGTH}, \
             failed_logins_before_disable between 1 and {MAX_FAILED_LOGINS}, idle_operator_action = \"{IDLE_ACTION}\""
        )];
    };
    let mut gaps = Vec::new();
    if p.min_password_length < MIN_PASSWORD_LENGTH {
        gaps.push(format!(
            "min_password_length is {}, set it to at least {MIN_PASSWORD_LENGTH}",
            p.min_password_length
        ));
    }
    if p.failed_logins_before_disable == 0 || p.failed_logins_before_disable > MAX_FAILED_LOGINS {
        gaps.push(format!(
            "failed_logins_before_disable is {}, set it between 1 and {MAX_FAILED_LOGINS}",
            p.failed_logins_before_disable
        ));
    }
    if p.idle_operator_action != IDLE_ACTION {
        gaps.push(format!("idle_operator_action is {:?}, set it to \"{IDLE_ACTION}\"", p.idle_operator_action));
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(len: u32, fails: u32, idle: &str) -> PciPolicy {
        PciPolicy { min_password_length: len, failed_logins_before_disable: fails, idle_operator_action: idle.into() }
    }

    #[test]
    fn the_seed_settings_comply_and_each_weaker_one_is_named() {
        assert!(pci_gaps(Some(&p(7, 3, "logout"))).is_empty());
        assert!(pci_gaps(Some(&p(12, 1, "logout"))).is_empty());
        assert!(pci_gaps(Some(&p(6, 3, "logout")))[0].contains("min_password_length"));
        assert!(pci_gaps(Some(&p(7, 4, "logout")))[0].contains("failed_logins_before_disable"));
        assert!(pci_gaps(Some(&p(7, 0, "logout")))[0].contains("failed_logins_before_disable"));
        assert!(pci_gaps(Some(&p(7, 3, "none")))[0].contains("idle_operator_action"));
        assert_eq!(pci_gaps(Some(&p(1, 9, "none"))).len(), 3);
        assert_eq!(pci_gaps(None).len(), 1);
    }
}
