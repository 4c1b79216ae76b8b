//! The pipeline: each stage event from the tracker becomes durable CRM work.
//!
//! For a call that ended with recordings, the `process_record_file_path` customization
//! may move the path; the signed link (deterministic from the recording id) goes into
//! `call_full.record_link` and the jobs are written to the outbox at once, so a crash
//! loses nothing. Conversion to mp3 then runs in the background: the link serves the
//! original until the mp3 is ready, the mp3 afterwards.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::calls::{Stage, StageEvent};
use crate::crm::Connector;
use crate::hooks::{Customize, HookOutcome};
use crate::metrics::Registry;
use crate::records::{Recordings, catalog};
use crate::store::{LIVE_CALL_KIND, Store};

/// What the tracker task hands the pipeline.
#[derive(Debug)]
pub(crate) enum PipelineMsg {
    Stage(StageEvent),
    /// A resync with Asterisk finished; these calls are live now.
    Resynced {
        live: HashSet<String>,
    },
}

pub(crate) struct Pipeline {
    /// Background work (recorded calls being finished, conversions), awaited at stop.
    pub background: TaskTracker,
    /// Recorded calls whose `call_ended` is being prepared off the pipeline task.
    pub finishing: std::sync::Mutex<HashSet<String>>,
    pub store: Store,
    pub connectors: Vec<Arc<dyn Connector>>,
    pub hooks: Arc<dyn Customize>,
    pub records: Option<Arc<Recordings>>,
    /// `[http] public_url`, the base of recording links.
    pub public_url: String,
    /// `[records] convert`: links name the mp3 that the conversion will produce.
    pub convert: bool,
    pub metrics: Registry,
    /// `[calls] time_offset`: the zone of the times written in `call_full`.
    pub time_offset: chrono::FixedOffset,
}

impl Pipeline {
    /// Drain stage events until the tracker closes the channel, then wait for the
    /// background work still running.
    pub(crate) async fn run(self: Arc<Self>, mut stages: mpsc::Receiver<PipelineMsg>) {
        while let Some(msg) = stages.recv().await {
            match msg {
                PipelineMsg::Stage(ev) => self.clone().stage(ev).await,
                PipelineMsg::Resynced { live } => self.end_calls_missed_while_down(&live).await,
            }
        }
        self.background.close();
        if !self.background.is_empty() {
            tracing::info!(
                running = self.background.len(),
                "waiting for recorded calls and conversions"
            );
        }
        self.background.wait().await;
        tracing::info!("pipeline stopped");
    }

    async fn stage(self: Arc<Self>, mut ev: StageEvent) {
        stamp_start(&mut ev.call_full, self.time_offset);
        // A recorded call's end waits for `process_record_file_path` (up to its
        // timeout): do that off this task, so a slow script never holds up other
        // calls' stages (nor, through backpressure, the AMI reader). Its earlier stages
        // are already queued, so the call's order holds.
        if ev.stage == Stage::CallEnded && self.records.is_some() && !record_paths(&ev).is_empty() {
            if let Ok(mut f) = self.finishing.lock() {
                f.insert(ev.call_full.id.clone());
            }
            let me = self.clone();
            self.background.spawn(async move {
                let mut ev = ev;
                me.prepare_records(&mut ev).await;
                me.enqueue(&ev).await;
                if let Ok(mut f) = me.finishing.lock() {
                    f.remove(&ev.call_full.id);
                }
            });
            return;
        }
        // The outbox also keeps this call's last stage while it is unfinished (same
        // transaction), for `end_calls_missed_while_down`.
        self.enqueue(&ev).await;
    }

    /// After a (re)connect: calls we had seen that Asterisk no longer has ended while
    /// kolokol was down or disconnected. Register them with what is known.
    async fn end_calls_missed_while_down(self: &Arc<Self>, live: &HashSet<String>) {
        let saved = match self.store.cache_list(LIVE_CALL_KIND).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read saved live calls");
                return;
            }
        };
        for (id, value) in saved {
            let finishing = self
                .finishing
                .lock()
                .map(|f| f.contains(&id))
                .unwrap_or(false);
            if live.contains(&id) || finishing {
                continue;
            }
            let Ok(mut ev) = serde_json::from_value::<StageEvent>(value) else {
                let _ = self.store.cache_delete(LIVE_CALL_KIND, &id).await;
                continue;
            };
            tracing::warn!(call_id = %id, last_stage = ev.stage.as_str(),
                "call ended while kolokol was not connected; registering it with what is known");
            ev.stage = Stage::CallEnded;
            ev.conversation_id = None;
            ev.call_full
                .extra
                .insert("ended_unobserved".into(), Value::Bool(true));
            self.clone().stage(ev).await;
        }
    }

    async fn enqueue(&self, ev: &StageEvent) {
        let names: Vec<&str> = self
            .connectors
            .iter()
            .filter(|c| c.wants(ev.stage))
            .map(|c| c.name())
            .collect();
        // Written even with no CRM configured: the journal row (call_ended) and the
        // live-call snapshot (other stages) are kolokol's own memory of the call.
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            match self.store.enqueue_stage(ev, &names).await {
                Ok(ids) => {
                    tracing::debug!(call_id = %ev.call_full.id, stage = ev.stage.as_str(), jobs = ?ids, "queued for CRMs");
                    return;
                }
                Err(e) => {
                    // Never drop a stage: the database may be briefly locked or full.
                    tracing::error!(call_id = %ev.call_full.id, stage = ev.stage.as_str(), error = %e,
                        "cannot write CRM jobs to the database; retrying (check disk space and [storage] state_dir)");
                    self.metrics
                        .counter(
                            "kolokol_store_errors_total",
                            "Failed writes of stage events",
                            &[],
                        )
                        .inc();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }

    /// Decide each recording's final path and link; start conversions.
    async fn prepare_records(&self, ev: &mut StageEvent) {
        let Some(records) = &self.records else {
            return;
        };
        let paths = record_paths(ev);
        let call = &ev.call_full;
        if paths.is_empty() {
            return;
        }
        let call_full_json = serde_json::to_value(call).unwrap_or(Value::Null);
        let mut links = serde_json::Map::new();
        let mut main_link = None;
        for reported in paths {
            let path = match self
                .hooks
                .run(
                    "process_record_file_path",
                    json!({"call_full": call_full_json, "path": reported}),
                    &call.id,
                )
                .await
            {
                HookOutcome::Data(d) => d
                    .get("path")
                    .and_then(Value::as_str)
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| reported.clone()),
                _ => reported.clone(),
            };
            let id = catalog::id_from_path(std::path::Path::new(&path));
            let ext = if path.to_ascii_lowercase().ends_with(".mp3") || self.convert {
                "mp3"
            } else {
                catalog::served_ext(std::path::Path::new(&path)).unwrap_or("wav")
            };
            let link = records.signer().link_ext(&self.public_url, &id, ext);
            if reported == call.record {
                main_link = Some(link.clone());
            }
            links.insert(reported.clone(), Value::String(link));
            let records = records.clone();
            let call_id = call.id.clone();
            let store = self.store.clone();
            self.background.spawn(async move {
                match records.finish(&call_id, &path).await {
                    Ok(outcome) => {
                        tracing::info!(call_id, record_id = %outcome.id, converted = outcome.converted,
                            fallback = outcome.fallback.as_deref().unwrap_or(""), "recording ready");
                        // Keep the link working across restarts, whichever file it serves.
                        if let Err(e) = store.recording_put(&outcome.id, &outcome.file, Some(&call_id)).await {
                            tracing::warn!(call_id, error = %e, "cannot remember the recording in the database");
                        }
                    }
                    Err(e) => tracing::warn!(call_id, path, error = %e, "recording not available: the CRM gets no playable link"),
                }
            });
        }
        if let Some(link) = main_link {
            ev.call_full
                .extra
                .insert("record_link".into(), Value::String(link));
        }
        ev.call_full
            .extra
            .insert("record_links".into(), Value::Object(links));
    }
}

/// Add `call_full.start_timestamp`: when the call started, Unix seconds. The times in
/// `call_full` are written at `[calls] time_offset` (UTC by default); a CRM connector
/// reading them in the host's own zone was off by the difference (Kommo's
/// `created_at` was 10 hours early on a server in Vladivostok). The pipeline knows the
/// offset, so it gives the instant itself (connectors use this key first).
fn stamp_start(call: &mut crate::calls::CallFull, offset: chrono::FixedOffset) {
    if let Some(t) = call.started_at(offset) {
        call.extra.insert("start_timestamp".into(), json!(t));
    }
}

/// Every recording a call made: each conversation's, and the call's own.
fn record_paths(ev: &StageEvent) -> Vec<String> {
    let call = &ev.call_full;
    let mut paths: Vec<String> = call
        .conversations
        .iter()
        .map(|(_, c)| c.record.clone())
        .filter(|r| !r.is_empty())
        .collect();
    if !call.record.is_empty() && !paths.contains(&call.record) {
        paths.push(call.record.clone());
    }
    paths
}
