//! Kommo (amoCRM) API v4 connector. (Being built: issue 7.)

use serde::Deserialize;

/// `[kommo]` config section.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KommoConfig {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    pub long_lived_token: Option<String>,
    /// Internal number → Kommo user id.
    pub users: std::collections::BTreeMap<String, i64>,
}
