//! Everything besides the outbox: job step results, the call journal, OAuth tokens,
//! lookup caches and the recordings catalog.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use super::{Store, StoreError, json_err, now_ms};
use crate::crm::{JobSteps, TokenSet, TokenStore};

/// The durable [`JobSteps`] of one outbox job: results already stored are loaded up
/// front (so `get` never touches the disk); `put` returns once the result is committed.
pub struct StoreJobSteps {
    store: Store,
    job_id: i64,
    done: Mutex<HashMap<String, Value>>,
}

impl std::fmt::Debug for StoreJobSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreJobSteps")
            .field("job_id", &self.job_id)
            .finish()
    }
}

impl StoreJobSteps {
    pub fn job_id(&self) -> i64 {
        self.job_id
    }
}

impl JobSteps for StoreJobSteps {
    fn get(&self, step: &str) -> Option<Value> {
        self.done.lock().ok()?.get(step).cloned()
    }

    fn put(&self, step: &str, result: &Value) -> Result<(), String> {
        let job_id = self.job_id;
        let (step_owned, text) = (step.to_string(), result.to_string());
        self.store
            .call_blocking(move |c| {
                c.prepare_cached(
                    "INSERT INTO job_steps (job_id, step, result, created_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (job_id, step) \
                     DO UPDATE SET result = excluded.result",
                )?
                .execute(params![job_id, step_owned, text, now_ms()])?;
                Ok(())
            })
            .map_err(|e| format!("cannot store step '{step}' of job {job_id}: {e}"))?;
        if let Ok(mut m) = self.done.lock() {
            m.insert(step.to_string(), result.clone());
        }
        Ok(())
    }
}

/// One ended call from the journal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JournalEntry {
    pub call_id: String,
    /// The final `call_full`.
    pub call_full: Value,
    /// What each CRM answered: `{"kommo": {"call_ended": {"state": "done", "report": ...}}}`.
    pub crm: Value,
    /// Unix ms.
    pub ended_at: i64,
}

impl Store {
    /// The durable steps of a job handed out by [`Store::due_jobs`] (already loaded).
    pub fn steps_for(&self, due: &super::DueJob) -> StoreJobSteps {
        StoreJobSteps {
            store: self.clone(),
            job_id: due.job.id,
            done: Mutex::new(due.steps.clone()),
        }
    }

    /// The step results of job `job_id`, for `Connector::deliver`.
    pub async fn job_steps(&self, job_id: i64) -> Result<StoreJobSteps, StoreError> {
        let done = self
            .call(move |c| {
                let mut st =
                    c.prepare_cached("SELECT step, result FROM job_steps WHERE job_id = ?1")?;
                let rows = st.query_map([job_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                let mut out = HashMap::new();
                for row in rows {
                    let (step, text) = row?;
                    let v: Value =
                        serde_json::from_str(&text).map_err(json_err("job step result"))?;
                    out.insert(step, v);
                }
                Ok(out)
            })
            .await?;
        Ok(StoreJobSteps {
            store: self.clone(),
            job_id,
            done: Mutex::new(done),
        })
    }

    /// Ended calls, newest last, ended at or after `since_ms` (all if `None`); at most
    /// `limit` (the newest ones).
    pub async fn calls(
        &self,
        since_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT call_id, call_full, crm, ended_at FROM journal \
                 WHERE ended_at IS NOT NULL AND ended_at >= ?1 \
                 ORDER BY ended_at DESC, call_id DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![since_ms.unwrap_or(i64::MIN), limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (call_id, call_full, crm, ended_at) = row?;
                out.push(JournalEntry {
                    call_id,
                    call_full: serde_json::from_str(&call_full)
                        .map_err(json_err("journal call_full"))?,
                    crm: serde_json::from_str(&crm).map_err(json_err("journal crm"))?,
                    ended_at,
                });
            }
            out.reverse();
            Ok(out)
        })
        .await
    }

    /// One call from the journal (ended or not).
    pub async fn journal_entry(&self, call_id: &str) -> Result<Option<JournalEntry>, StoreError> {
        let call_id = call_id.to_string();
        self.call(move |c| {
            let row = c
                .query_row(
                    "SELECT call_id, call_full, crm, COALESCE(ended_at, 0) FROM journal \
                     WHERE call_id = ?1",
                    [call_id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(call_id, call_full, crm, ended_at)| {
                Ok(JournalEntry {
                    call_id,
                    call_full: serde_json::from_str(&call_full)
                        .map_err(json_err("journal call_full"))?,
                    crm: serde_json::from_str(&crm).map_err(json_err("journal crm"))?,
                    ended_at,
                })
            })
            .transpose()
        })
        .await
    }

    /// A cached value (e.g. `kind = "responsible:kommo"`, `key` = normalised phone),
    /// if present and not expired.
    pub async fn cache_get(&self, kind: &str, key: &str) -> Result<Option<Value>, StoreError> {
        let (kind, key) = (kind.to_string(), key.to_string());
        self.call(move |c| {
            let text: Option<String> = c
                .prepare_cached(
                    "SELECT value FROM caches WHERE kind = ?1 AND key = ?2 AND expires_at > ?3",
                )?
                .query_row(params![kind, key, now_ms()], |r| r.get(0))
                .optional()?;
            text.map(|t| serde_json::from_str(&t).map_err(json_err("cached value")))
                .transpose()
        })
        .await
    }

    /// Cache `value` for `ttl`.
    pub async fn cache_put(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (kind, key, text) = (kind.to_string(), key.to_string(), value.to_string());
        let expires = now_ms().saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
        self.call(move |c| {
            c.prepare_cached(
                "INSERT INTO caches (kind, key, value, expires_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, \
                 expires_at = excluded.expires_at",
            )?
            .execute(params![kind, key, text, expires])?;
            Ok(())
        })
        .await
    }

    /// Forget expired cache entries; returns how many.
    pub async fn cache_purge_expired(&self) -> Result<usize, StoreError> {
        self.call(|c| Ok(c.execute("DELETE FROM caches WHERE expires_at <= ?1", [now_ms()])?))
            .await
    }

    /// Register a recording under the id used in signed links.
    pub async fn recording_put(
        &self,
        id: &str,
        path: &std::path::Path,
        call_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let (id, call_id) = (id.to_string(), call_id.map(str::to_string));
        let path = path.to_string_lossy().into_owned();
        self.call(move |c| {
            c.prepare_cached(
                "INSERT INTO recordings (id, path, call_id, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET path = excluded.path, call_id = excluded.call_id",
            )?
            .execute(params![id, path, call_id, now_ms()])?;
            Ok(())
        })
        .await
    }

    /// The file behind a recording id.
    pub async fn recording_get(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(
                c.prepare_cached("SELECT path FROM recordings WHERE id = ?1")?
                    .query_row([id], |r| r.get::<_, String>(0))
                    .optional()?
                    .map(PathBuf::from),
            )
        })
        .await
    }
}

/// OAuth tokens in the `tokens` table. `put` replaces the whole set in one committed
/// statement, so a rotated refresh token is never half-written.
impl TokenStore for Store {
    fn get(&self, connector: &str) -> Option<TokenSet> {
        let connector = connector.to_string();
        let res = self.call_blocking(move |c| {
            let text: Option<String> = c
                .prepare_cached("SELECT tokens FROM tokens WHERE connector = ?1")?
                .query_row([connector], |r| r.get(0))
                .optional()?;
            text.map(|t| serde_json::from_str::<TokenSet>(&t).map_err(json_err("tokens")))
                .transpose()
        });
        match res {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read OAuth tokens from the state database");
                None
            }
        }
    }

    fn put(&self, connector: &str, tokens: &TokenSet) -> Result<(), String> {
        let text = serde_json::to_string(tokens).map_err(|e| e.to_string())?;
        let connector = connector.to_string();
        self.call_blocking(move |c| {
            c.prepare_cached(
                "INSERT INTO tokens (connector, tokens, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (connector) DO UPDATE SET tokens = excluded.tokens, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![connector, text, now_ms()])?;
            Ok(())
        })
        .map_err(|e| format!("cannot store OAuth tokens: {e}"))
    }
}
