//! Customizations: admin executables run at each stage with JSON in and out.
//!
//! An admin drops an executable named after a hook (`need_registration`,
//! `process_client_phone.py`, ...) into `[customizations] dir`. At that point of a call
//! kolokol runs it ([`Runner`]), writes the hook's input JSON to its stdin and reads
//! `{"state": "success", "data": {...}}` from its stdout. A missing or broken script
//! never stops a call: the run ends in [`HookOutcome::Default`] and kolokol carries on
//! with its own behaviour. See `customizations/README.md` for every hook's JSON.
//!
//! How the rest of kolokol uses it:
//!
//! ```no_run
//! use std::sync::Arc;
//! use kolokol::calls::{CallFull, Stage};
//! use kolokol::hooks::{Customize, Hook, HooksConfig, Runner, contract, registration_wanted};
//!
//! # async fn stage(cfg: HooksConfig, call: CallFull) {
//! let runner = Arc::new(Runner::new(cfg));
//! // Typed: the report also says why a default was used.
//! let input = contract::need_registration_input(&call, Stage::CallEnded);
//! let report = runner.run_hook(Hook::NeedRegistration, &input, &call.id).await;
//! if !registration_wanted(&report.outcome) {
//!     return;
//! }
//! // Or through the trait the CRM connectors take (`Arc<dyn Customize>`).
//! let customize: Arc<dyn Customize> = runner.clone();
//! let input = contract::client_phone_input(&call.client_phone, &call, Stage::CallEnded);
//! let outcome = customize.run("process_client_phone", input, &call.id).await;
//! let Some(_phone) = contract::phone_from(&outcome, &call.client_phone) else {
//!     return; // cancelled by customization
//! };
//! // `/metrics`:
//! let _text = runner.metrics().render_prometheus();
//! # }
//! ```

pub mod contract;
pub mod metrics;
pub mod names;
pub mod runner;
pub mod samples;

pub use metrics::{FailureKind, HookMetrics, MetricsSnapshot};
pub use names::{Hook, OnEmpty};
pub use runner::{HookFailure, Installed, RunReport, Runner};

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
    /// The customizations folder: one executable per hook, named after it (optionally
    /// with one extension). Default `/etc/kolokol/customizations`.
    pub dir: PathBuf,
    /// Per-hook timeouts, e.g. `process_record_file_path = "10s"`.
    #[serde(with = "humantime_serde_map")]
    pub timeouts: BTreeMap<String, Duration>,
    /// How many scripts may run at once, all hooks together (0 is taken as 1).
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
                if super::Hook::from_name(&k).is_none() {
                    return Err(serde::de::Error::custom(format!(
                        "unknown hook {k:?} (known: {})",
                        super::Hook::names()
                    )));
                }
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

impl HookOutcome {
    /// True when the script asked to skip the request.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, HookOutcome::Cancelled)
    }

    /// The script's data, if it is to be used.
    pub fn data(&self) -> Option<&Value> {
        match self {
            HookOutcome::Data(v) => Some(v),
            _ => None,
        }
    }
}

/// The decision of `need_registration`: register unless the script cancelled or
/// answered `{"result": false}`. A failed or absent script registers the call.
pub fn registration_wanted(outcome: &HookOutcome) -> bool {
    match outcome {
        HookOutcome::Cancelled => false,
        HookOutcome::Data(v) => v.get("result").and_then(Value::as_bool) != Some(false),
        HookOutcome::Default { .. } => true,
    }
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
