//! `[calls]` config section: how to tell employees from trunks.

use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Internal numbers (extensions) match this regex.
    pub internal_number_regex: String,
    /// Endpoints that are trunks, whatever their number looks like. Empty: every
    /// endpoint whose name is not an internal number is a trunk.
    pub trunks: Vec<String>,
    /// Forget a call that had no event for this long.
    #[serde(with = "humantime_serde")]
    pub reap_after: Duration,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            internal_number_regex: r"^\d{2,5}$".into(),
            trunks: Vec::new(),
            reap_after: Duration::from_secs(6 * 3600),
        }
    }
}
