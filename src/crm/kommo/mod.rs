//! Kommo (amoCRM) API v4 connector.
//!
//! Registers every external call the way Itgrix does: find the client's contact by
//! phone (last 10 digits), create a contact and a lead (or an incoming "unsorted" lead)
//! for an unknown number, add one call note per call (`POST /api/v4/calls`, `uniq` =
//! our call id), and a call-back task for missed incoming / unanswered outgoing calls.
//! Every request passes through the matching customization hook first.
//!
//! * [`client`]: HTTP, OAuth (refresh before expiry and once on 401, rotated refresh
//!   token stored atomically), rate limit, Kommo's error shapes → [`crate::crm::CrmError`].
//! * [`batch`]: single-item creates from concurrent jobs coalesced into one array
//!   request per endpoint (one request against the rate limit for many calls).
//! * [`connector`]: the registration steps, each recorded through
//!   [`crate::crm::JobSteps`] so a redelivered job never creates duplicates.
//! * [`warm`]: the client's responsible user read from a registration's report, to
//!   warm the autodistribution cache.
//! * [`tokens`]: a small SQLite [`crate::crm::TokenStore`] for `kolokol kommo auth`.

pub mod batch;
pub mod client;
pub mod connector;
pub mod warm;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::phone::PhoneRules;

pub use client::{KommoClient, KommoError};
pub use connector::{AccountCheck, KommoConnector, LinkFor};

/// The name of this connector in jobs, token store and logs.
pub const NAME: &str = "kommo";

/// `[kommo]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KommoConfig {
    /// The account's own URL, e.g. `https://example.kommo.com` (any http(s) URL, so a
    /// sandbox can stand in).
    pub base_url: String,
    /// OAuth integration id ("ID интеграции").
    pub client_id: String,
    pub client_secret: String,
    /// Must equal the redirect URI registered for the integration.
    pub redirect_uri: String,
    /// A private integration's long-lived token: used instead of OAuth when set.
    pub long_lived_token: Option<String>,
    /// Internal number → Kommo user id. `kolokol kommo users` lists the ids.
    pub users: BTreeMap<String, i64>,
    /// Requests per second to this account (Kommo allows 7).
    pub rate_limit: f64,
    /// Most items in one create request (contacts, leads, unsorted, calls, tasks);
    /// Kommo takes up to 250 and advises 50. 1 sends every item alone.
    pub batch_size: usize,
    /// How long the first item of a batch waits for company before it is sent. With 0
    /// (the default) an idle connector sends at once, and items that arrive while a
    /// request is waiting for the rate limit or for Kommo form the next batch.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Timeout of one HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries inside one delivery for 429/5xx/network errors before the job is handed
    /// back to the outbox for a later attempt.
    pub inline_retries: u32,
    /// Refresh the OAuth access token this long before it expires.
    #[serde(with = "humantime_serde")]
    pub refresh_margin: Duration,
    /// How client numbers are turned into international digits.
    pub phone: PhoneRules,
    /// Send phones to Kommo as `+<digits>` (else bare digits).
    pub phone_plus: bool,
    /// Unknown number: create a contact.
    pub create_contact: bool,
    /// Unknown number: create a lead linked to the new contact.
    pub create_lead: bool,
    /// Unknown number on an incoming call: create an "unsorted" lead
    /// (`/api/v4/leads/unsorted/sip`) instead of contact + lead.
    pub unsorted: bool,
    /// Pipeline and status of new leads (account defaults when unset).
    pub lead_pipeline_id: Option<i64>,
    pub lead_status_id: Option<i64>,
    /// Pipeline of unsorted leads (account default when unset).
    pub unsorted_pipeline_id: Option<i64>,
    /// Tags put on new contacts and leads.
    pub tags: Vec<String>,
    /// `source` of call notes and `source_name` of unsorted leads.
    pub source: String,
    /// Responsible for what nobody else is (missed calls to unknown numbers).
    pub default_responsible_user_id: Option<i64>,
    /// Existing contact/lead: make the employee who answered responsible.
    pub update_responsible_on_answer: bool,
    /// Create a call-back task for missed incoming and unanswered outgoing calls.
    pub create_tasks: bool,
    /// Task type: 1 call, 2 meeting, 3 e-mail.
    pub task_type_id: i64,
    /// Deadline of a call-back task, from the end of the call.
    #[serde(with = "humantime_serde")]
    pub task_deadline: Duration,
    /// Complete open call-back tasks of a client when a later call with them is answered.
    pub complete_tasks_on_answer: bool,
    /// Register only calls of these internal numbers (empty: all).
    pub only_internal_numbers: Vec<String>,
    /// Never register calls of these internal numbers.
    pub ignore_internal_numbers: Vec<String>,
    /// Register only calls through these trunks or lines (empty: all).
    pub only_trunks: Vec<String>,
    /// Never register calls through these trunks or lines.
    pub ignore_trunks: Vec<String>,
}

impl Default for KommoConfig {
    fn default() -> Self {
        KommoConfig {
            base_url: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            redirect_uri: String::new(),
            long_lived_token: None,
            users: BTreeMap::new(),
            rate_limit: 7.0,
            batch_size: 50,
            batch_window: Duration::ZERO,
            request_timeout: Duration::from_secs(15),
            inline_retries: 2,
            refresh_margin: Duration::from_secs(300),
            phone: PhoneRules::default(),
            phone_plus: true,
            create_contact: true,
            create_lead: true,
            unsorted: false,
            lead_pipeline_id: None,
            lead_status_id: None,
            unsorted_pipeline_id: None,
            tags: vec!["kolokol".into()],
            source: "kolokol".into(),
            default_responsible_user_id: None,
            update_responsible_on_answer: false,
            create_tasks: true,
            task_type_id: 1,
            task_deadline: Duration::from_secs(3600),
            complete_tasks_on_answer: false,
            only_internal_numbers: Vec::new(),
            ignore_internal_numbers: Vec::new(),
            only_trunks: Vec::new(),
            ignore_trunks: Vec::new(),
        }
    }
}

impl KommoConfig {
    /// The internal number mapped to a Kommo user id, if any.
    pub fn extension_of(&self, user_id: i64) -> Option<&str> {
        self.users
            .iter()
            .find(|(_, id)| **id == user_id)
            .map(|(ext, _)| ext.as_str())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn full_section_parses() {
        let text = r#"
[kommo]
base_url = "https://example.kommo.com"
client_id = "id"
client_secret = "secret"
redirect_uri = "https://pbx.example.com/kommo/oauth"
rate_limit = 5
request_timeout = "10s"
task_deadline = "2h"
unsorted = true
lead_pipeline_id = 7001
lead_status_id = 70012
default_responsible_user_id = 5001
tags = ["pbx"]
ignore_trunks = ["74950000000"]

[kommo.phone]
country_code = "49"
trunk_prefix = "0"
national_length = 10

[kommo.users]
"101" = 5002
"#;
        let cfg = Config::from_toml(text, Path::new("t.toml")).unwrap();
        let k = cfg.kommo.unwrap();
        assert_eq!(k.rate_limit, 5.0);
        assert_eq!(k.task_deadline, Duration::from_secs(7200));
        assert_eq!(k.phone.country_code, "49");
        assert_eq!(k.phone.international_prefixes, vec!["810", "00"]);
        assert_eq!(k.users.get("101"), Some(&5002));
        assert_eq!(k.extension_of(5002), Some("101"));
        assert!(k.create_contact && k.create_tasks && k.unsorted);

        let bad = "[kommo]\nbase_url = \"x\"\ncreate_contacts = true\n";
        let err = Config::from_toml(bad, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("create_contacts"), "{err}");
    }
}
