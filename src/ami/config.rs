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
    /// Limit for the TCP connect.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit for the banner + login exchange and for every action's response.
    #[serde(with = "humantime_serde")]
    pub action_timeout: Duration,
    /// First reconnect delay; it doubles (with jitter) after each failed attempt.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay (at most 30 s is sensible: calls go untracked meanwhile).
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How many messages may wait for the consumer (the call tracker) before the
    /// client stops reading the socket (back-pressure instead of unbounded memory).
    pub queue_capacity: usize,
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
            connect_timeout: Duration::from_secs(5),
            action_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            queue_capacity: 8192,
        }
    }
}

impl AmiConfig {
    /// `host:port`, for connecting and for log lines.
    pub fn addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}
