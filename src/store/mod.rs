//! SQLite storage: migrations, the durable outbox, the call journal, OAuth tokens and
//! caches. (Being built: issue 6.)

use serde::Deserialize;
use std::path::PathBuf;

/// `[storage]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub state_dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            state_dir: PathBuf::from("/var/lib/kolokol"),
        }
    }
}
