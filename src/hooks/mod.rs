//! Customizations: admin executables run at each stage with JSON in and out.
//! (Being built: issue 4.)

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
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

/// What a customization run decided.
#[derive(Debug, Clone, PartialEq)]
pub enum HookOutcome {
    /// The script answered `{"state": "success", "data": ...}` with non-empty data:
    /// use it (read-only fields already dropped).
    Data(Value),
    /// The script returned empty data (`{}`, `[]`, `null`) for a hook that precedes a
    /// CRM request: that request is cancelled ("cancelled by customization").
    Cancelled,
    /// The hook is not installed or failed (reason says why): use the default.
    Default { reason: String },
}

/// Runs customizations. The CRM connectors and the daemon depend on this trait, not on
/// how scripts are spawned, so they can be tested with [`NoCustomizations`].
pub trait Customize: Send + Sync {
    /// Run `hook` (e.g. `process_client_phone`) with `input` on stdin, for `call_id`
    /// (used in logs only).
    fn run<'a>(
        &'a self,
        hook: &'a str,
        input: Value,
        call_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = HookOutcome> + Send + 'a>>;
}

/// No customizations installed: every hook takes its default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCustomizations;

impl Customize for NoCustomizations {
    fn run<'a>(
        &'a self,
        _hook: &'a str,
        _input: Value,
        _call_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = HookOutcome> + Send + 'a>> {
        Box::pin(async {
            HookOutcome::Default {
                reason: "not installed".into(),
            }
        })
    }
}
