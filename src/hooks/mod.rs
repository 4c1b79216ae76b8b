//! Customizations: admin executables run at each stage with JSON in and out.
//! (Being built: issue 4.)

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `[customizations]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    pub dir: PathBuf,
    /// Per-hook timeouts, e.g. `process_record_file_path = "10s"`.
    #[serde(with = "humantime_serde_map")]
    pub timeouts: BTreeMap<String, Duration>,
    /// How many scripts may run at once.
    pub max_concurrent: usize,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            dir: PathBuf::from("/etc/kolokol/customizations"),
            timeouts: BTreeMap::new(),
            max_concurrent: 16,
        }
    }
}

mod humantime_serde_map {
    use serde::{Deserialize, Deserializer};
    use std::collections::BTreeMap;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|dur| (k.clone(), dur))
                    .map_err(|e| serde::de::Error::custom(format!("{k}: {e}")))
            })
            .collect()
    }
}
