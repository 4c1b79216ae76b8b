//! The durable outbox: one row per (CRM, call, stage, conversation), written before
//! anything is sent and finished only by the worker that delivered it (or the admin).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use serde_json::Value;

use super::{Store, StoreError, json_err, now_ms};
use crate::calls::{Stage, StageEvent};
use crate::crm::{DeliveryReport, Job};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to be delivered (possibly after a failed attempt).
    Pending,
    /// Delivered.
    Done,
    /// Gave up (rejected, too many attempts, too old): kept for the admin to retry.
    Dead,
    /// Removed from delivery by the admin (`kolokol outbox drop`).
    Dropped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Done => "done",
            JobState::Dead => "dead",
            JobState::Dropped => "dropped",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "done" => JobState::Done,
            "dead" => JobState::Dead,
            "dropped" => JobState::Dropped,
            _ => JobState::Pending,
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(JobState::Pending),
            "done" => Ok(JobState::Done),
            "dead" => Ok(JobState::Dead),
            "dropped" => Ok(JobState::Dropped),
            other => Err(format!(
                "unknown job state '{other}' (pending, done, dead, dropped)"
            )),
        }
    }
}

/// A job as the admin sees it (no payload).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxJob {
    pub id: i64,
    pub connector: String,
    pub call_id: String,
    pub stage: String,
    pub conversation_id: Option<String>,
    pub state: JobState,
    pub attempts: u32,
    /// Unix ms.
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// A pending job waiting for this earlier unfinished job of the same call.
    pub waiting_for: Option<i64>,
}

/// A job ready to hand to `Connector::deliver`.
#[derive(Debug, Clone)]
pub struct DueJob {
    pub job: Job,
    pub call_id: String,
    /// Unix ms when the current attempt window began (enqueue, or the last
    /// `kolokol outbox retry`): the age limit counts from here.
    pub window_start: i64,
    /// Step results recorded by earlier attempts (see [`Store::steps_for`]).
    pub steps: HashMap<String, Value>,
}

/// Which jobs `list` shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state; `None` = pending and dead (what needs attention).
    pub state: Option<JobState>,
    pub connector: Option<String>,
    pub call_id: Option<String>,
    /// At most this many (0 = 1000).
    pub limit: usize,
}

/// Outbox figures for /metrics and /healthz.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutboxDepth {
    pub pending: u64,
    pub dead: u64,
    /// Per connector: (pending, dead).
    pub by_connector: BTreeMap<String, (u64, u64)>,
    /// Unix ms of the oldest pending job.
    pub oldest_pending_at: Option<i64>,
}

impl OutboxDepth {
    /// Age of the oldest pending job at `now_ms`.
    pub fn oldest_age(&self, now_ms: i64) -> Option<Duration> {
        self.oldest_pending_at
            .map(|t| Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64))
    }

    /// Append `kolokol_outbox_jobs{crm,state}` and `kolokol_outbox_oldest_age_seconds`
    /// in Prometheus text format.
    pub fn render_prometheus(&self, now_ms: i64, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str(
            "# HELP kolokol_outbox_jobs Outbox jobs waiting (pending) or given up (dead).\n",
        );
        out.push_str("# TYPE kolokol_outbox_jobs gauge\n");
        for (crm, (pending, dead)) in &self.by_connector {
            let _ = writeln!(
                out,
                "kolokol_outbox_jobs{{crm=\"{crm}\",state=\"pending\"}} {pending}"
            );
            let _ = writeln!(
                out,
                "kolokol_outbox_jobs{{crm=\"{crm}\",state=\"dead\"}} {dead}"
            );
        }
        out.push_str("# HELP kolokol_outbox_oldest_age_seconds Age of the oldest pending job.\n");
        out.push_str("# TYPE kolokol_outbox_oldest_age_seconds gauge\n");
        let age = self.oldest_age(now_ms).map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(out, "kolokol_outbox_oldest_age_seconds {age}");
    }
}

/// `connector|call_id|stage|conversation_id`: the same stage replayed after a crash maps
/// to the same row.
pub(crate) fn idempotency_key(connector: &str, event: &StageEvent) -> String {
    format!(
        "{}|{}|{}|{}",
        connector,
        event.call_full.id,
        event.stage.as_str(),
        event.conversation_id.as_deref().unwrap_or("")
    )
}

/// The journal's key for one stage's CRM result.
pub(crate) fn journal_stage_key(stage: &str, conversation_id: Option<&str>) -> String {
    match conversation_id {
        Some(c) if !c.is_empty() => format!("{stage}:{c}"),
        _ => stage.to_string(),
    }
}

const JOB_COLUMNS: &str = "o.id, o.connector, o.call_id, o.stage, o.conversation_id, o.state, \
     o.attempts, o.next_attempt_at, o.last_error, o.created_at, o.updated_at";

/// Jobs of the same call and connector that must finish first.
const EARLIER_UNFINISHED: &str = "SELECT p.id FROM outbox p WHERE p.connector = o.connector \
     AND p.call_id = o.call_id AND p.id < o.id AND p.state IN ('pending', 'dead') \
     ORDER BY p.id DESC LIMIT 1";

fn job_row(r: &Row<'_>) -> rusqlite::Result<OutboxJob> {
    Ok(OutboxJob {
        id: r.get(0)?,
        connector: r.get(1)?,
        call_id: r.get(2)?,
        stage: r.get(3)?,
        conversation_id: r.get(4)?,
        state: JobState::parse(&r.get::<_, String>(5)?),
        attempts: r.get::<_, i64>(6)?.clamp(0, u32::MAX as i64) as u32,
        next_attempt_at: r.get(7)?,
        last_error: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        waiting_for: r.get(11)?,
    })
}

fn state_of(c: &Connection, id: i64) -> Result<JobState, StoreError> {
    c.query_row("SELECT state FROM outbox WHERE id = ?1", [id], |r| {
        r.get::<_, String>(0)
    })
    .optional()?
    .map(|s| JobState::parse(&s))
    .ok_or(StoreError::NoSuchJob(id))
}

/// Record a job's outcome in the call journal (`crm.<connector>.<stage[:conv]>`).
fn journal_outcome(c: &Connection, id: i64, outcome: Value) -> Result<(), StoreError> {
    let row: Option<(String, String, String, Option<String>, String)> = c
        .query_row(
            "SELECT connector, call_id, stage, conversation_id, payload FROM outbox WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((connector, call_id, stage, conv, payload)) = row else {
        return Ok(());
    };
    let existing: Option<String> = c
        .query_row(
            "SELECT crm FROM journal WHERE call_id = ?1",
            [&call_id],
            |r| r.get(0),
        )
        .optional()?;
    let mut crm: serde_json::Map<String, Value> = match &existing {
        Some(text) => serde_json::from_str(text).unwrap_or_default(),
        None => serde_json::Map::new(),
    };
    let per = crm
        .entry(connector)
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(m) = per {
        m.insert(journal_stage_key(&stage, conv.as_deref()), outcome);
    }
    let crm_text = Value::Object(crm).to_string();
    if existing.is_some() {
        c.execute(
            "UPDATE journal SET crm = ?2 WHERE call_id = ?1",
            params![call_id, crm_text],
        )?;
    } else {
        // The call has not ended yet: keep the snapshot this stage carried.
        let event: StageEvent =
            serde_json::from_str(&payload).map_err(json_err("outbox payload"))?;
        let call_full = serde_json::to_string(&event.call_full).map_err(json_err("call_full"))?;
        c.execute(
            "INSERT INTO journal (call_id, call_full, crm, ended_at) VALUES (?1, ?2, ?3, NULL)",
            params![call_id, call_full, crm_text],
        )?;
    }
    Ok(())
}

/// `caches` kind holding the last stage event of every unfinished call.
pub const LIVE_CALL_KIND: &str = "live_call";
/// No call runs longer than this; older snapshots expire.
const LIVE_CALL_TTL_MS: i64 = 2 * 24 * 3600 * 1000;

impl Store {
    /// Write the durable work for one stage event: one job per connector in
    /// `connectors` (normally those whose `wants(stage)` is true) and, for `call_ended`,
    /// the journal row — all in one transaction. Returns the job ids in `connectors`
    /// order. Replaying the same stage (same call, stage, conversation) after a crash
    /// returns the existing ids instead of adding jobs.
    pub async fn enqueue_stage(
        &self,
        event: &StageEvent,
        connectors: &[&str],
    ) -> Result<Vec<i64>, StoreError> {
        let payload = serde_json::to_string(event).map_err(json_err("stage event"))?;
        let call_full = if event.stage == Stage::CallEnded {
            Some(serde_json::to_string(&event.call_full).map_err(json_err("call_full"))?)
        } else {
            None
        };
        let rows: Vec<(String, String)> = connectors
            .iter()
            .map(|c| (c.to_string(), idempotency_key(c, event)))
            .collect();
        let call_id = event.call_full.id.clone();
        let stage = event.stage.as_str();
        let conv = event.conversation_id.clone();
        let ids = self
            .call(move |c| {
                let now = now_ms();
                // A job waits (held) while an earlier job of its call is unfinished;
                // finishing that one releases it (`release_next`).
                let mut insert = c.prepare_cached(
                    "INSERT INTO outbox (connector, call_id, stage, conversation_id, payload, \
                     idempotency_key, next_attempt_at, created_at, updated_at, held) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7, EXISTS (SELECT 1 FROM outbox p \
                     WHERE p.connector = ?1 AND p.call_id = ?2 AND p.state IN ('pending', 'dead'))) \
                     ON CONFLICT (idempotency_key) DO NOTHING",
                )?;
                let mut lookup =
                    c.prepare_cached("SELECT id FROM outbox WHERE idempotency_key = ?1")?;
                let mut ids = Vec::with_capacity(rows.len());
                for (connector, key) in &rows {
                    insert.execute(params![connector, call_id, stage, conv, payload, key, now])?;
                    ids.push(lookup.query_row([key], |r| r.get::<_, i64>(0))?);
                }
                if let Some(call_full) = &call_full {
                    c.prepare_cached(
                        "INSERT INTO journal (call_id, call_full, ended_at) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (call_id) DO UPDATE SET call_full = excluded.call_full, \
                         ended_at = COALESCE(journal.ended_at, excluded.ended_at)",
                    )?
                    .execute(params![call_id, call_full, now])?;
                    c.prepare_cached("DELETE FROM caches WHERE kind = ?1 AND key = ?2")?
                        .execute(params![LIVE_CALL_KIND, call_id])?;
                } else {
                    // The call's last known stage, in the same transaction as its jobs, so
                    // a call whose end kolokol misses (crash, link down) can still be
                    // ended with what is known.
                    c.prepare_cached(
                        "INSERT INTO caches (kind, key, value, expires_at) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, \
                         expires_at = excluded.expires_at",
                    )?
                    .execute(params![
                        LIVE_CALL_KIND,
                        call_id,
                        payload,
                        now.saturating_add(LIVE_CALL_TTL_MS)
                    ])?;
                }
                Ok(ids)
            })
            .await?;
        for c in connectors {
            self.wake(c);
        }
        Ok(ids)
    }

    /// Up to `limit` pending jobs of `connector` due at `now_ms`, oldest first, at most
    /// one per call: a job waits while an earlier job of its call is pending or dead,
    /// so a call's stages reach the CRM in order.
    pub async fn due_jobs(
        &self,
        connector: &str,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<DueJob>, StoreError> {
        let connector = connector.to_string();
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT o.id, o.connector, o.stage, o.conversation_id, o.payload, o.attempts, \
                 o.call_id, COALESCE(o.retried_at, o.created_at) FROM outbox o \
                 WHERE o.connector = ?1 AND o.state = 'pending' AND o.held = 0 \
                 AND o.next_attempt_at <= ?2 ORDER BY o.next_attempt_at, o.id LIMIT ?3",
            )?;
            let mut steps_st =
                c.prepare_cached("SELECT step, result FROM job_steps WHERE job_id = ?1")?;
            let rows = st.query_map(params![connector, now_ms, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, connector, payload, attempts, call_id, window_start) = row?;
                let event: StageEvent =
                    serde_json::from_str(&payload).map_err(json_err("outbox payload"))?;
                let mut steps = HashMap::new();
                let rows = steps_st.query_map([id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (step, text) = row?;
                    let v: Value =
                        serde_json::from_str(&text).map_err(json_err("job step result"))?;
                    steps.insert(step, v);
                }
                out.push(DueJob {
                    steps,
                    job: Job {
                        id,
                        connector,
                        stage: event.stage,
                        conversation_id: event.conversation_id,
                        call_full: event.call_full,
                        attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                    },
                    call_id,
                    window_start,
                });
            }
            Ok(out)
        })
        .await
    }

    /// When the next job of `connector` that is not waiting behind its call's earlier
    /// jobs becomes due (unix ms), if any.
    pub async fn next_due_at(&self, connector: &str) -> Result<Option<i64>, StoreError> {
        let connector = connector.to_string();
        self.call(move |c| {
            Ok(c.prepare_cached(
                "SELECT MIN(next_attempt_at) FROM outbox \
                 WHERE connector = ?1 AND state = 'pending' AND held = 0",
            )?
            .query_row([connector], |r| r.get::<_, Option<i64>>(0))?)
        })
        .await
    }

    /// The job was delivered: keep the CRM's answer in the journal. A job dropped by
    /// the admin meanwhile stays dropped.
    pub async fn mark_done(&self, id: i64, report: &DeliveryReport) -> Result<(), StoreError> {
        let report_text = report.to_string();
        let report = report.clone();
        self.call(move |c| {
            let n = c.execute(
                "UPDATE outbox SET state = 'done', report = ?2, attempts = attempts + 1, \
                 last_error = NULL, updated_at = ?3 WHERE id = ?1 AND state = 'pending'",
                params![id, report_text, now_ms()],
            )?;
            if n == 1 {
                journal_outcome(
                    c,
                    id,
                    serde_json::json!({"state": "done", "report": report}),
                )?;
                release_next(c, id)?;
            }
            Ok(())
        })
        .await
    }

    /// A failed attempt: count it, remember why, try again at `next_attempt_at`.
    /// Returns the attempts so far.
    pub async fn mark_failed(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<u32, StoreError> {
        let error = error.to_string();
        self.call(move |c| {
            let n: Option<i64> = c
                .query_row(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, \
                     next_attempt_at = ?3, updated_at = ?4 WHERE id = ?1 AND state = 'pending' \
                     RETURNING attempts",
                    params![id, error, next_attempt_at, now_ms()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(n.unwrap_or(0).clamp(0, u32::MAX as i64) as u32)
        })
        .await
    }

    /// Put a job off without counting an attempt (the CRM is blocked or paused, which
    /// is not this job's fault).
    pub async fn postpone(
        &self,
        id: i64,
        reason: &str,
        next_attempt_at: i64,
    ) -> Result<(), StoreError> {
        let reason = reason.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET last_error = ?2, next_attempt_at = ?3, updated_at = ?4 \
                 WHERE id = ?1 AND state = 'pending'",
                params![id, reason, next_attempt_at, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// Make jobs of `connector` that were put off because the CRM refused access due
    /// now (at start: the admin may have fixed the credentials and restarted).
    /// Returns how many.
    pub async fn resume_blocked(&self, connector: &str) -> Result<usize, StoreError> {
        let connector = connector.to_string();
        self.call(move |c| {
            let now = now_ms();
            Ok(c.execute(
                "UPDATE outbox SET next_attempt_at = ?2 WHERE connector = ?1 AND state = 'pending' \
                 AND held = 0 AND next_attempt_at > ?2 AND last_error LIKE 'blocked: %'",
                params![connector, now],
            )?)
        })
        .await
    }

    /// Give up on a job after an attempt (rejected, or out of attempts/time): it stays
    /// visible in `kolokol outbox list` and can be retried.
    pub async fn mark_dead(&self, id: i64, reason: &str) -> Result<(), StoreError> {
        let reason = reason.to_string();
        self.call(move |c| {
            let n = c.execute(
                "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?2, \
                 updated_at = ?3 WHERE id = ?1 AND state = 'pending'",
                params![id, reason, now_ms()],
            )?;
            if n == 1 {
                journal_outcome(c, id, serde_json::json!({"state": "dead", "error": reason}))?;
            }
            Ok(())
        })
        .await
    }

    /// Send a dead (or waiting) job again now, with a fresh attempt count and age
    /// window. Delivered and dropped jobs cannot be retried.
    pub async fn retry(&self, id: i64) -> Result<OutboxJob, StoreError> {
        let job = self
            .call(move |c| {
                match state_of(c, id)? {
                    JobState::Pending | JobState::Dead => {}
                    s => {
                        return Err(StoreError::WrongState {
                            id,
                            state: s.as_str().into(),
                            hint: "only pending or dead jobs can be retried",
                        });
                    }
                }
                let now = now_ms();
                c.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?2, \
                     retried_at = ?2, updated_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
                // A retried job that waits behind its call's earlier jobs stays held.
                release_next(c, id)?;
                get_job(c, id)
            })
            .await?;
        self.wake(&job.connector);
        Ok(job)
    }

    /// Take a job out of delivery for good (kept as `dropped`, so a replay of the same
    /// stage does not bring it back). Later jobs of the same call are released.
    pub async fn drop_job(&self, id: i64) -> Result<OutboxJob, StoreError> {
        let job = self
            .call(move |c| {
                if state_of(c, id)? == JobState::Done {
                    return Err(StoreError::WrongState {
                        id,
                        state: "done".into(),
                        hint: "it was already delivered",
                    });
                }
                c.execute(
                    "UPDATE outbox SET state = 'dropped', updated_at = ?2 WHERE id = ?1",
                    params![id, now_ms()],
                )?;
                journal_outcome(c, id, serde_json::json!({"state": "dropped"}))?;
                release_next(c, id)?;
                get_job(c, id)
            })
            .await?;
        self.wake(&job.connector);
        Ok(job)
    }

    /// One job by id.
    pub async fn job(&self, id: i64) -> Result<OutboxJob, StoreError> {
        self.call(move |c| get_job(c, id)).await
    }

    /// Jobs matching `filter`, oldest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<OutboxJob>, StoreError> {
        self.call(move |c| {
            let mut sql = format!(
                "SELECT {JOB_COLUMNS}, CASE WHEN o.state = 'pending' THEN ({EARLIER_UNFINISHED}) END \
                 FROM outbox o WHERE 1 = 1"
            );
            let mut args: Vec<String> = Vec::new();
            match filter.state {
                Some(s) => {
                    args.push(s.as_str().to_string());
                    sql.push_str(&format!(" AND o.state = ?{}", args.len()));
                }
                None => sql.push_str(" AND o.state IN ('pending', 'dead')"),
            }
            if let Some(conn) = &filter.connector {
                args.push(conn.clone());
                sql.push_str(&format!(" AND o.connector = ?{}", args.len()));
            }
            if let Some(call) = &filter.call_id {
                args.push(call.clone());
                sql.push_str(&format!(" AND o.call_id = ?{}", args.len()));
            }
            let limit = if filter.limit == 0 { 1000 } else { filter.limit };
            sql.push_str(&format!(" ORDER BY o.id LIMIT {limit}"));
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(args.iter()), job_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Pending and dead counts and the oldest pending job.
    pub async fn depth(&self) -> Result<OutboxDepth, StoreError> {
        self.call(|c| {
            let mut d = OutboxDepth::default();
            let mut st = c.prepare_cached(
                "SELECT connector, state, COUNT(*), MIN(created_at) FROM outbox \
                 WHERE state IN ('pending', 'dead') GROUP BY connector, state",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (connector, state, n, oldest) = row?;
                let n = n.max(0) as u64;
                let e = d.by_connector.entry(connector).or_default();
                if state == "pending" {
                    d.pending += n;
                    e.0 += n;
                    d.oldest_pending_at =
                        Some(d.oldest_pending_at.map_or(oldest, |o: i64| o.min(oldest)));
                } else {
                    d.dead += n;
                    e.1 += n;
                }
            }
            Ok(d)
        })
        .await
    }

    /// Age of the oldest pending job (for /metrics), `None` when the outbox is empty.
    pub async fn oldest_age(&self) -> Result<Option<Duration>, StoreError> {
        Ok(self.depth().await?.oldest_age(now_ms()))
    }

    /// Delete delivered and dropped jobs (and their step results) last touched before
    /// `before_ms`. Returns how many went.
    pub async fn prune_finished(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM outbox WHERE state IN ('done', 'dropped') AND updated_at < ?1",
                [before_ms],
            )?)
        })
        .await
    }
}

/// After job `id` changed state: un-hold the first unfinished job of its call (if it
/// is pending and held), so exactly one job per call and connector is sendable.
fn release_next(c: &Connection, id: i64) -> Result<(), StoreError> {
    let head: Option<(i64, String, bool)> = c
        .prepare_cached(
            "SELECT n.id, n.state, n.held FROM outbox o JOIN outbox n \
             ON n.connector = o.connector AND n.call_id = o.call_id \
             WHERE o.id = ?1 AND n.state IN ('pending', 'dead') ORDER BY n.id LIMIT 1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((head, state, true)) = head
        && state == "pending"
    {
        c.prepare_cached(
            "UPDATE outbox SET held = 0, next_attempt_at = MAX(next_attempt_at, ?2) WHERE id = ?1",
        )?
        .execute(params![head, now_ms()])?;
    }
    Ok(())
}

fn get_job(c: &Connection, id: i64) -> Result<OutboxJob, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS}, CASE WHEN o.state = 'pending' THEN ({EARLIER_UNFINISHED}) END \
         FROM outbox o WHERE o.id = ?1"
    );
    c.query_row(&sql, [id], job_row)
        .optional()?
        .ok_or(StoreError::NoSuchJob(id))
}
