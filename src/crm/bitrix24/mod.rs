//! Bitrix24 REST connector (external-call API). (Being built: issue 8.)

use serde::Deserialize;

/// `[bitrix24]` config section.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Bitrix24Config {
    /// Incoming webhook base, e.g. `https://portal.bitrix24.ru/rest/1/SECRET/`.
    pub webhook_url: Option<String>,
    /// Or a local application: portal base URL with client id/secret.
    pub base_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}
