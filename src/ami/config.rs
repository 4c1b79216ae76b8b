//! `[ami]` config section. Key names are relied on by tools outside the project.

use serde::Deserialize;
use std::time::Duration;

/// How to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmiAuth {
    /// `Secret:` in the Login action.
    #[default]
    Plain,
    /// `Action: Challenge` then `Key: md5hex(challenge + secret)`.
    Md5,
}

/// Where and how to reach the Asterisk Manager Interface.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmiConfig {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub secret: String,
    pub auth: AmiAuth,
    /// Interval between keepalive Pings; a dead link is noticed within about two.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Optional `Events` mask sent after login (e.g. "call,cdr,agent").
    pub events: Option<String>,
    /// Optional server-side `Filter` expressions sent after login.
    pub filters: Vec<String>,
}

impl Default for AmiConfig {
    fn default() -> Self {
        AmiConfig {
            host: "127.0.0.1".into(),
            port: 5038,
            username: "kolokol".into(),
            secret: String::new(),
            auth: AmiAuth::Plain,
            ping_interval: Duration::from_secs(10),
            events: None,
            filters: Vec::new(),
        }
    }
}
