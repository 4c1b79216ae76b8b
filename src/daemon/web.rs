//! The daemon's HTTP surface: `/healthz`, `/metrics`, the admin page, plus the routes
//! other parts provide (recordings, autodistribution, CRM webhooks).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use super::Shared;
use crate::crm::BoxFuture;
use crate::http::admin::{AdminSnapshot, AdminSource, JobRow, LiveCallRow, RecentCallRow};
use crate::store::ListFilter;

/// `/healthz` and `/metrics`.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let ami_up = s.ami_up();
    let db = s.store.check_writable().await;
    let depth = s.store.depth().await.unwrap_or_default();
    let crms: Vec<_> = s
        .workers_status()
        .into_iter()
        .map(|(name, state)| json!({"crm": name, "state": state}))
        .collect();
    let ok = ami_up && db.is_ok();
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "ami": {"connected": ami_up, "state": s.ami_state_text()},
        "database": {"writable": db.is_ok(), "error": db.err().map(|e| e.to_string())},
        "outbox": {"pending": depth.pending, "dead": depth.dead},
        "crm": crms,
        "live_calls": s.tracker.live_calls().len(),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let depth = s.store.depth().await.unwrap_or_default();
    s.metrics
        .gauge("kolokol_outbox_pending", "CRM jobs waiting", &[])
        .set(depth.pending);
    s.metrics
        .gauge("kolokol_outbox_dead", "CRM jobs given up (retryable)", &[])
        .set(depth.dead);
    let age = depth
        .oldest_age(crate::store::now_ms())
        .map_or(0, |d| d.as_secs());
    s.metrics
        .gauge(
            "kolokol_outbox_oldest_age_seconds",
            "Age of the oldest pending CRM job",
            &[],
        )
        .set(age);
    let stats = s.ami.stats();
    s.metrics
        .gauge("kolokol_ami_connected", "1 when logged in to AMI", &[])
        .set(u64::from(s.ami_up()));
    s.metrics
        .gauge("kolokol_ami_reconnects", "AMI reconnects since start", &[])
        .set(stats.reconnects);
    s.metrics
        .gauge(
            "kolokol_ami_malformed_frames",
            "AMI frames skipped as malformed",
            &[],
        )
        .set(stats.malformed);
    let mut text = s.metrics.render();
    text.push_str(&s.hooks.metrics().render_prometheus());
    if let Ok(w) = s.workers.lock() {
        if let Some(w) = w.as_ref() {
            w.render_prometheus(&mut text);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The admin page's data source.
pub(crate) struct Admin(pub Arc<Shared>);

impl AdminSource for Admin {
    fn snapshot(&self) -> BoxFuture<'_, AdminSnapshot> {
        Box::pin(async move {
            let s = &self.0;
            let live_calls = s
                .tracker
                .live_calls()
                .into_iter()
                .map(|c| {
                    let mut state = Vec::new();
                    if !c.talking.is_empty() {
                        state.push(format!("talking {}", c.talking.join(", ")));
                    }
                    if !c.ringing.is_empty() {
                        state.push(format!("ringing {}", c.ringing.join(", ")));
                    }
                    LiveCallRow {
                        call_id: c.id,
                        direction: c.direction.as_str().into(),
                        client_phone: c.client_phone,
                        state: state.join("; "),
                        since: c.started,
                    }
                })
                .collect();
            let recent_calls = s
                .store
                .calls(None, 50)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|e| {
                    let cf = &e.call_full;
                    let text =
                        |k: &str| cf.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                    let crm = e
                        .crm
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(name, stages)| (name.clone(), summarize_crm(stages)))
                                .collect()
                        })
                        .unwrap_or_default();
                    RecentCallRow {
                        call_id: e.call_id.clone(),
                        ended_at: chrono::DateTime::from_timestamp_millis(e.ended_at)
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_default(),
                        direction: text("direction"),
                        client_phone: text("client_phone"),
                        answered_by: text("answered_by"),
                        result: cf.get("result").and_then(|v| v.as_u64()).unwrap_or(0) as u16,
                        duration: cf.get("duration").and_then(|v| v.as_u64()).unwrap_or(0),
                        record_link: cf
                            .get("record_link")
                            .and_then(|v| v.as_str())
                            .map(str::to_string),
                        crm,
                    }
                })
                .collect();
            let jobs = s
                .store
                .list(ListFilter {
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|j| JobRow {
                    id: j.id,
                    connector: j.connector,
                    call_id: j.call_id,
                    stage: j.stage,
                    state: j.state.as_str().into(),
                    attempts: j.attempts,
                    last_error: j.last_error.unwrap_or_default(),
                })
                .collect();
            let hook_failures = s
                .hooks
                .metrics()
                .snapshot()
                .failures
                .into_iter()
                .filter(|(reason, n)| *n > 0 && *reason != "not_installed")
                .map(|(reason, n)| ("any".to_string(), reason.to_string(), n))
                .collect();
            AdminSnapshot {
                ami_status: s.ami_state_text(),
                crm_status: s.workers_status(),
                live_calls,
                recent_calls,
                jobs,
                hook_failures,
            }
        })
    }

    fn retry_job(&self, id: i64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.0
                .store
                .retry(id)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

fn summarize_crm(stages: &serde_json::Value) -> String {
    let Some(m) = stages.as_object() else {
        return String::new();
    };
    let mut states: Vec<String> = m
        .iter()
        .map(|(stage, v)| {
            let st = v.get("state").and_then(|s| s.as_str()).unwrap_or("?");
            format!("{stage}: {st}")
        })
        .collect();
    states.sort();
    states.join(", ")
}
