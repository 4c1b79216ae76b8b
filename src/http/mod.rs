//! The daemon's HTTP server (axum): recordings, webhooks, health, metrics, admin.
//! Routes are assembled here from the handlers other modules provide.

pub mod admin;

use serde::Deserialize;

/// `[http]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address, e.g. "127.0.0.1:8088".
    pub listen: String,
    /// Public base URL the CRMs use to reach us (recording links, webhooks).
    pub public_url: String,
    /// Hex SHA-256 of the admin page password (`printf %s 'pass' | sha256sum`);
    /// unset disables the page.
    pub admin_password_sha256: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8088".into(),
            public_url: "http://127.0.0.1:8088".into(),
            admin_password_sha256: None,
        }
    }
}
