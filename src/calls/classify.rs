//! Who is who: employees (extensions), trunks and Asterisk plumbing, read from channel
//! names. Context and Exten are not used for direction: Asterisk creates an outbound
//! trunk leg in the trunk's own context with `Exten=s` (fixtures README, surprise 5).

use std::collections::HashSet;

use regex::Regex;

use super::config::{CallsConfig, CallsConfigError};

/// What kind of party a channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An employee's phone (extension).
    Internal,
    /// A trunk to the outside world (carrier, other PBX).
    Trunk,
    /// One half of a Local channel pair (plumbing, folded away).
    Local,
    /// Anything else (announcers, conference bridges, ...).
    Other,
}

/// The endpoint part of a channel name: `PJSIP/101-00000001` → (`PJSIP`, `101`);
/// `Local/101@from-queue-00000001;2` → (`Local`, `101@from-queue`).
pub fn split_channel_name(name: &str) -> (&str, &str) {
    let Some((tech, rest)) = name.split_once('/') else {
        return ("", name);
    };
    // Local halves end with ";1"/";2" after the counter.
    let rest = match rest.rsplit_once(';') {
        Some((r, half)) if half == "1" || half == "2" => r,
        _ => rest,
    };
    // Strip the `-<hex counter>` Asterisk appends to every channel.
    let resource = match rest.rsplit_once('-') {
        Some((r, counter))
            if !counter.is_empty() && counter.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            r
        }
        _ => rest,
    };
    (tech, resource)
}

/// The extension a Local channel points at: `Local/101@from-queue-...;2` → `101`.
pub fn local_exten(name: &str) -> &str {
    let (_, res) = split_channel_name(name);
    res.split('@').next().unwrap_or("")
}

/// Compiled classification rules of `[calls]`.
#[derive(Debug, Clone)]
pub struct Classifier {
    internal: Regex,
    trunks: HashSet<String>,
    internal_endpoints: HashSet<String>,
    trunk_contexts: HashSet<String>,
}

impl Classifier {
    pub fn new(cfg: &CallsConfig) -> Result<Self, CallsConfigError> {
        Ok(Classifier {
            internal: Regex::new(&cfg.internal_number_regex)?,
            trunks: cfg.trunks.iter().cloned().collect(),
            internal_endpoints: cfg.internal_endpoints.iter().cloned().collect(),
            trunk_contexts: cfg.trunk_contexts.iter().cloned().collect(),
        })
    }

    /// Is this number an extension?
    pub fn is_internal_number(&self, number: &str) -> bool {
        !number.is_empty() && self.internal.is_match(number)
    }

    /// Classify a channel by its name (and the context it was created in).
    pub fn classify(&self, channel_name: &str, context: &str) -> Kind {
        let (tech, endpoint) = split_channel_name(channel_name);
        if tech.eq_ignore_ascii_case("Local") {
            return Kind::Local;
        }
        if tech.is_empty()
            || matches!(
                tech,
                "Announcer" | "CBAnn" | "CBRec" | "Recorder" | "Bridge" | "Message" | "Surrogate"
            )
        {
            return Kind::Other;
        }
        if self.trunks.contains(endpoint) {
            return Kind::Trunk;
        }
        if self.internal_endpoints.contains(endpoint) {
            return Kind::Internal;
        }
        if !context.is_empty() && self.trunk_contexts.contains(context) {
            return Kind::Trunk;
        }
        if self.is_internal_number(endpoint) {
            Kind::Internal
        } else {
            Kind::Trunk
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_split_into_tech_and_endpoint() {
        assert_eq!(split_channel_name("PJSIP/101-00000001"), ("PJSIP", "101"));
        assert_eq!(
            split_channel_name("PJSIP/trunk-0000000a"),
            ("PJSIP", "trunk")
        );
        assert_eq!(
            split_channel_name("SIP/my-trunk-0000003f"),
            ("SIP", "my-trunk")
        );
        assert_eq!(
            split_channel_name("Local/101@from-queue-00000001;2"),
            ("Local", "101@from-queue")
        );
        assert_eq!(local_exten("Local/102@from-internal-00000000;1"), "102");
    }

    #[test]
    fn defaults_make_short_numbers_internal_and_the_rest_trunks() {
        let c = Classifier::new(&CallsConfig::default()).unwrap();
        assert_eq!(
            c.classify("PJSIP/101-00000001", "from-internal"),
            Kind::Internal
        );
        // The outbound trunk leg is created in from-trunk, but so would any trunk.
        assert_eq!(
            c.classify("PJSIP/trunk-00000013", "from-trunk"),
            Kind::Trunk
        );
        assert_eq!(c.classify("PJSIP/79161234567-00000001", ""), Kind::Trunk);
        assert_eq!(
            c.classify("Local/102@from-queue-00000002;1", ""),
            Kind::Local
        );
    }

    #[test]
    fn config_lists_override_the_number_rule() {
        let cfg = CallsConfig {
            trunks: vec!["5000".into()],
            internal_endpoints: vec!["alice-desk".into()],
            trunk_contexts: vec!["from-pstn".into()],
            ..Default::default()
        };
        let c = Classifier::new(&cfg).unwrap();
        assert_eq!(c.classify("SIP/5000-00000001", ""), Kind::Trunk);
        assert_eq!(c.classify("PJSIP/alice-desk-00000001", ""), Kind::Internal);
        assert_eq!(c.classify("DAHDI/12-1", "from-pstn"), Kind::Trunk);
    }
}
