//! Recordings: locate each conversation's file, convert wav to mp3 off the event loop,
//! sign links. (Being built: issue 5.)

use serde::Deserialize;
use std::path::PathBuf;

/// `[records]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// Where MixMonitor writes (used when the event carries a bare file name).
    pub dir: PathBuf,
    /// Secret for HMAC-signed links; empty means generated at first start and kept in state.
    pub link_secret: String,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            dir: PathBuf::from("/var/spool/asterisk/monitor"),
            link_secret: String::new(),
        }
    }
}
