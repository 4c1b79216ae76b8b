//! Bitrix24 REST connector, built on the external-call API (`telephony.externalcall.*`).
//!
//! * [`Bitrix24`] implements [`crate::crm::Connector`]: the first ring of a call at an
//!   employee registers it once (`register`, `EXTERNAL_CALL_ID` = our call id), further
//!   rings `show` the card, an answer `hide`s the others, the end `finish`es it (one per
//!   call) and only then attaches the recording.
//! * [`events`] receives click-to-call (`ONEXTERNALCALLSTART`) as online events
//!   (`POST /bitrix24/events`) or by polling `event.offline.get` (works behind NAT).
//! * [`client`] is the REST client (webhook or OAuth, leaky-bucket limit, batch, retries).
//! * [`lookup`] is CallGate's contact → company → lead chain, used for registration and
//!   autodistribution.
//! * [`warm`] reads a finished call's entity to warm the autodistribution cache.

pub mod client;
pub mod connector;
pub mod error;
pub mod events;
pub mod form;
pub mod lookup;
pub mod store;
pub mod users;
pub mod warm;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

pub use connector::{Bitrix24, Deps, PathRecords, RecordSource};
pub use error::BitrixError;
pub use events::{CRM_CALL_ID_VAR, ClickToCall};
pub use store::{CallIdStore, CallRecord, MemoryCallIdStore};

/// When the employee sees Bitrix24's call card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShowMode {
    /// As soon as their phone rings (hidden again when someone else answers).
    #[default]
    OnRing,
    /// Only to whoever answers.
    OnAnswer,
    /// Never: calls are registered silently.
    Never,
}

/// How the recording reaches Bitrix24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecordMode {
    /// `RECORD_URL`: Bitrix24 downloads the signed mp3 link from our HTTP server
    /// (`[http] public_url` must be reachable from Bitrix24).
    #[default]
    Link,
    /// `FILENAME` + `FILE_CONTENT` (base64): works when Bitrix24 cannot reach us.
    Upload,
    /// Do not attach recordings.
    None,
}

/// Who gets a call nobody answered (its `finish` `USER_ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissedResponsible {
    /// The responsible of the client's CRM entity, else the first employee that rang.
    #[default]
    Crm,
    /// The first employee whose phone rang.
    FirstRang,
    /// The last employee whose phone rang.
    LastRang,
    /// Always `default_user_id`.
    Fixed,
}

/// How the client is looked up in the CRM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LookupMethod {
    /// `crm.duplicate.findbycomm` per entity type and number format (CallGate's chain).
    #[default]
    Findbycomm,
    /// `telephony.externalCall.searchCrmEntities`.
    SearchCrmEntities,
}

/// `[bitrix24]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bitrix24Config {
    /// Incoming webhook base, e.g. `https://portal.bitrix24.ru/rest/1/SECRET/`.
    pub webhook_url: Option<String>,
    /// Or a local application: portal base URL with client id/secret.
    pub base_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// OAuth token endpoint.
    pub oauth_url: String,
    /// First refresh token of the local application (used once; the rotated ones are
    /// kept in the state database).
    pub refresh_token: Option<String>,
    /// `auth[application_token]` Bitrix24 sends with online events; events without it
    /// are refused. Empty: online events are refused altogether.
    pub application_token: String,

    /// When to show the call card.
    pub show: ShowMode,
    /// Create a lead for unknown numbers (`CRM_CREATE`).
    pub crm_create: bool,
    /// `CRM_SOURCE` of created leads (e.g. `CALL`), empty = Bitrix24's default.
    pub crm_source: String,
    /// Post the call to the CRM entity's chat (`ADD_TO_CHAT`).
    pub add_to_chat: bool,
    /// How recordings are attached.
    pub record: RecordMode,
    /// Recordings larger than this are not uploaded (link mode is unaffected).
    pub record_max_bytes: u64,

    /// Leaky bucket: requests per second and burst (Bitrix24: 2/50, Enterprise 5/250).
    pub rate_per_sec: f64,
    pub burst: u32,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of one request on QUERY_LIMIT_EXCEEDED/5xx/network before the job is
    /// handed back to the outbox for a later attempt.
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,

    /// Show/hide operations are collected this long and sent as one `batch`; `0s`
    /// sends them within the job that caused them.
    #[serde(with = "humantime_serde")]
    pub card_debounce: Duration,

    /// Who gets missed calls.
    pub missed_responsible: MissedResponsible,
    /// Fallback user for calls that cannot be tied to an employee (default: the
    /// webhook's user).
    pub default_user_id: Option<i64>,
    /// After an answered call, make who answered the responsible of the existing
    /// lead/contact/company the call was bound to.
    pub set_responsible_on_answer: bool,
    /// Create a to-do (`crm.activity.todo.add`) for missed incoming calls.
    pub todo_on_missed: bool,
    /// Deadline of that to-do, from the end of the call.
    #[serde(with = "humantime_serde")]
    pub todo_deadline: Duration,
    /// Send `im.notify` when a call cannot be registered (to this user, else to the
    /// responsible).
    pub notify_unregistered: bool,
    pub notify_user_id: Option<i64>,

    /// How the client is searched for.
    pub lookup: LookupMethod,
    /// How often the employee directory (`user.get`) is reloaded.
    #[serde(with = "humantime_serde")]
    pub users_refresh: Duration,

    /// Poll `event.offline.get` for click-to-call (for a PBX Bitrix24 cannot reach).
    pub offline_events: bool,
    #[serde(with = "humantime_serde")]
    pub offline_poll_interval: Duration,
    /// Click-to-call events repeated within this window are dropped.
    #[serde(with = "humantime_serde")]
    pub click_to_call_dedup: Duration,

    /// Overrides of the call result → `STATUS_CODE` map: keys `"487"` or
    /// `"inbound:487"`, values Bitrix24 codes such as `"603-S"`.
    pub status_map: BTreeMap<String, String>,
}

impl Default for Bitrix24Config {
    fn default() -> Self {
        Bitrix24Config {
            webhook_url: None,
            base_url: None,
            client_id: None,
            client_secret: None,
            oauth_url: "https://oauth.bitrix.info/oauth/token/".into(),
            refresh_token: None,
            application_token: String::new(),
            show: ShowMode::OnRing,
            crm_create: true,
            crm_source: String::new(),
            add_to_chat: false,
            record: RecordMode::Link,
            record_max_bytes: 100 * 1024 * 1024,
            rate_per_sec: 2.0,
            burst: 50,
            request_timeout: Duration::from_secs(15),
            max_retries: 3,
            retry_backoff: Duration::from_millis(500),
            card_debounce: Duration::from_millis(300),
            missed_responsible: MissedResponsible::Crm,
            default_user_id: None,
            set_responsible_on_answer: false,
            todo_on_missed: false,
            todo_deadline: Duration::from_secs(3600),
            notify_unregistered: false,
            notify_user_id: None,
            lookup: LookupMethod::Findbycomm,
            users_refresh: Duration::from_secs(600),
            offline_events: false,
            offline_poll_interval: Duration::from_secs(2),
            click_to_call_dedup: Duration::from_secs(30),
            status_map: BTreeMap::new(),
        }
    }
}

impl Bitrix24Config {
    /// The user id inside a webhook URL (`/rest/USER_ID/SECRET/`).
    pub fn webhook_user_id(&self) -> Option<i64> {
        let url = self.webhook_url.as_deref()?;
        let mut parts = url.trim_end_matches('/').rsplit('/');
        let _secret = parts.next()?;
        parts.next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_keys() {
        let c: Bitrix24Config = toml::from_str(
            "webhook_url = \"https://p.bitrix24.ru/rest/7/abc/\"\nshow = \"on_answer\"\nrecord = \"upload\"\ncard_debounce = \"0s\"\n[status_map]\n\"487\" = \"603-S\"\n",
        )
        .unwrap();
        assert_eq!(c.show, ShowMode::OnAnswer);
        assert_eq!(c.record, RecordMode::Upload);
        assert_eq!(c.card_debounce, Duration::ZERO);
        assert_eq!(c.webhook_user_id(), Some(7));
        assert_eq!(c.burst, 50);
        assert!(toml::from_str::<Bitrix24Config>("shwo = \"never\"").is_err());
    }

    #[test]
    fn section_in_the_main_config() {
        let c = crate::config::Config::from_toml(
            "[bitrix24]\nbase_url = \"https://p.bitrix24.ru\"\nclient_id = \"app\"\nclient_secret = \"s\"\nmissed_responsible = \"last_rang\"\ntodo_deadline = \"2h\"\n",
            std::path::Path::new("c.toml"),
        )
        .unwrap();
        let b = c.bitrix24.unwrap();
        assert_eq!(b.missed_responsible, MissedResponsible::LastRang);
        assert_eq!(b.todo_deadline, Duration::from_secs(7200));
        let err = crate::config::Config::from_toml(
            "[bitrix24]\nshow = \"sometimes\"\n",
            std::path::Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bitrix24.show"), "{err}");
    }
}
