//! FastAGI server and the autodistribution handler. (Being built: issue 9.)

use serde::Deserialize;

/// `[agi]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgiConfig {
    pub listen: String,
}

impl Default for AgiConfig {
    fn default() -> Self {
        AgiConfig {
            listen: "127.0.0.1:4573".into(),
        }
    }
}
