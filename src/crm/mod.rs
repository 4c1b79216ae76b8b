//! CRM connectors. Each CRM is one implementation of [`Connector`] in its own folder;
//! nothing outside `src/crm/<name>/` knows that CRM's API.
//!
//! The daemon writes every CRM side effect as a durable job (see `store`); a worker per
//! connector hands each job to [`Connector::deliver`], which must be idempotent: a job
//! may be delivered again after a crash, so each step records its result through
//! [`JobSteps`] and skips steps already done.

pub mod bitrix24;
pub mod kommo;
pub mod rate_limit;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::calls::{CallFull, Stage};

/// A boxed future, so that connectors can live behind `Arc<dyn Connector>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One durable unit of CRM work: a call's stage to register in one CRM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Outbox row id.
    pub id: i64,
    /// `kommo` or `bitrix24`.
    pub connector: String,
    pub stage: Stage,
    pub conversation_id: Option<String>,
    pub call_full: CallFull,
    /// How many times delivery was tried before this attempt.
    pub attempts: u32,
}

/// How a delivery went wrong, which decides what the worker does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CrmError {
    /// Try again later (5xx, 429, network): after `retry_after` if the CRM said so.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The CRM refused the request as invalid (e.g. 400 validation errors): retrying
    /// will not help, the job goes to the dead letters with this detail for the admin.
    #[error("{message}")]
    Rejected { message: String },
    /// Access is blocked (403, revoked token): stop sending to this CRM, keep the jobs,
    /// alert the admin.
    #[error("{message}")]
    Blocked { message: String },
}

/// What a finished delivery produced, kept in the call journal.
pub type DeliveryReport = serde_json::Value;

/// Per-job step results, persisted so a redelivered job skips what was done.
pub trait JobSteps: Send + Sync {
    /// The stored result of `step` for this job, if it already ran.
    fn get(&self, step: &str) -> Option<serde_json::Value>;
    /// Record the result of `step` (durably, before the next step runs).
    fn put(&self, step: &str, result: &serde_json::Value) -> Result<(), String>;
}

/// Who is responsible for a client in the CRM (for autodistribution).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Responsible {
    /// The employee's internal number (extension).
    pub extension: String,
    /// Name to show as CallerID name (client or entity name).
    pub name: String,
    /// The CRM entity that matched, as the CRM describes it.
    pub entity: serde_json::Value,
}

/// What a delivered registration says about who is responsible for a client, for the
/// autodistribution cache (see [`Connector::responsible_from_report`]).
#[derive(Debug, Clone, PartialEq)]
pub enum LearnedResponsible {
    /// [`Connector::find_responsible`] for `phone` would now answer `responsible`.
    Found {
        phone: String,
        responsible: Responsible,
    },
    /// The client's responsible employee is someone this CRM cannot route to (no
    /// internal number), or may have changed: an answer cached from this CRM is stale.
    NoRoute { phone: String },
}

/// One CRM.
pub trait Connector: Send + Sync {
    /// `kommo` or `bitrix24`: the name used in config, jobs, logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether this connector wants a job for this stage at all (so the outbox holds
    /// only work that will be done).
    fn wants(&self, stage: Stage) -> bool;

    /// Deliver one job, idempotently.
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        steps: &'a dyn JobSteps,
    ) -> BoxFuture<'a, Result<DeliveryReport, CrmError>>;

    /// Find the responsible employee for a client phone, if any.
    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmError>>;

    /// After [`Connector::deliver`] returned `report` for `job`: who is responsible for
    /// the client now, exactly as [`Connector::find_responsible`] would answer (same
    /// extension, name and entity), so the daemon can warm the autodistribution cache
    /// and the client's next call is routed without a CRM request. Read from the report;
    /// `None` when it does not say. Never fails: warming is best effort.
    fn responsible_from_report<'a>(
        &'a self,
        job: &'a Job,
        report: &'a DeliveryReport,
    ) -> BoxFuture<'a, Option<LearnedResponsible>> {
        let _ = (job, report);
        Box::pin(async { None })
    }
}

/// OAuth tokens of one CRM account, as stored durably.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenSet {
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds when the access token expires.
    pub expires_at: i64,
}

/// Durable token storage (SQLite in the daemon; in memory in tests). `put` must be
/// atomic: a rotated refresh token that is lost locks the account out.
pub trait TokenStore: Send + Sync {
    fn get(&self, connector: &str) -> Option<TokenSet>;
    fn put(&self, connector: &str, tokens: &TokenSet) -> Result<(), String>;
}

/// Tokens kept in memory only (tests, `long_lived_token` setups).
#[derive(Debug, Default)]
pub struct MemoryTokenStore(std::sync::Mutex<std::collections::HashMap<String, TokenSet>>);

impl TokenStore for MemoryTokenStore {
    fn get(&self, connector: &str) -> Option<TokenSet> {
        self.0.lock().ok()?.get(connector).cloned()
    }
    fn put(&self, connector: &str, tokens: &TokenSet) -> Result<(), String> {
        self.0
            .lock()
            .map_err(|_| "token store poisoned".to_string())?
            .insert(connector.to_string(), tokens.clone());
        Ok(())
    }
}

/// Step results kept in memory (tests).
#[derive(Debug, Default)]
pub struct MemoryJobSteps(std::sync::Mutex<std::collections::HashMap<String, serde_json::Value>>);

impl JobSteps for MemoryJobSteps {
    fn get(&self, step: &str) -> Option<serde_json::Value> {
        self.0.lock().ok()?.get(step).cloned()
    }
    fn put(&self, step: &str, result: &serde_json::Value) -> Result<(), String> {
        self.0
            .lock()
            .map_err(|_| "step store poisoned".to_string())?
            .insert(step.to_string(), result.clone());
        Ok(())
    }
}

/// `call_full` as flat JSON for connectors: every field (typed or extra) by its
/// documented name, with parties (`user`, channel `from`/`to`/`trunk`) reduced to
/// their number. Connectors read conversations and channels through this, so they work
/// the same on tracker snapshots and on snapshots a customization or test built by hand.
pub fn call_view(call: &CallFull) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    fn number_of(v: &mut Value) {
        if let Value::Object(o) = v {
            if let Some(n) = o.get("number").cloned() {
                *v = n;
            }
        }
    }
    fn flatten_channel(ch: &mut Value) {
        if let Value::Object(o) = ch {
            for k in ["from", "to", "trunk"] {
                if let Some(p) = o.get_mut(k) {
                    number_of(p);
                }
            }
        }
    }
    let mut view = match serde_json::to_value(call) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let Some(ch) = view.get_mut("channel") {
        flatten_channel(ch);
    }
    if let Some(Value::Object(convs)) = view.get_mut("conversations") {
        for conv in convs.values_mut() {
            if let Value::Object(c) = conv {
                if let Some(u) = c.get_mut("user") {
                    number_of(u);
                }
                if let Some(ch) = c.get_mut("channel") {
                    flatten_channel(ch);
                }
            }
        }
    }
    view
}
