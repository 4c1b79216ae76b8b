//! The pipeline: each stage event from the tracker becomes durable CRM work.
//!
//! For a call that ended with recordings, the `process_record_file_path` customization
//! may move the path; the signed link (deterministic from the recording id) goes into
//! `call_full.record_link` and the jobs are written to the outbox at once, so a crash
//! loses nothing. Conversion to mp3 then runs in the background: the link serves the
//! original until the mp3 is ready, the mp3 afterwards.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::calls::{Stage, StageEvent};
use crate::crm::Connector;
use crate::hooks::{Customize, HookOutcome};
use crate::metrics::Registry;
use crate::records::{Recordings, catalog};
use crate::store::Store;

/// What the tracker task hands the pipeline.
#[derive(Debug)]
pub(crate) enum PipelineMsg {
    Stage(StageEvent),
    /// A resync with Asterisk finished; these calls are live now.
    Resynced {
        live: HashSet<String>,
    },
}

/// Where the last snapshot of every unfinished call is kept (in the `caches` table), so
/// that a call whose end kolokol missed while it was down is still registered.
const LIVE_KIND: &str = "live_call";
/// A call cannot run longer than this; older snapshots expire.
const LIVE_TTL: Duration = Duration::from_secs(2 * 24 * 3600);

pub(crate) struct Pipeline {
    pub store: Store,
    pub connectors: Vec<Arc<dyn Connector>>,
    pub hooks: Arc<dyn Customize>,
    pub records: Option<Arc<Recordings>>,
    /// `[http] public_url`, the base of recording links.
    pub public_url: String,
    /// `[records] convert`: links name the mp3 that the conversion will produce.
    pub convert: bool,
    pub metrics: Registry,
}

impl Pipeline {
    /// Drain stage events until the tracker closes the channel, then wait for the
    /// background conversions still running.
    pub(crate) async fn run(self, mut stages: mpsc::Receiver<PipelineMsg>) {
        let mut conversions = JoinSet::new();
        while let Some(msg) = stages.recv().await {
            match msg {
                PipelineMsg::Stage(ev) => self.stage(ev, &mut conversions).await,
                PipelineMsg::Resynced { live } => {
                    self.end_calls_missed_while_down(&live, &mut conversions)
                        .await
                }
            }
            while conversions.try_join_next().is_some() {}
        }
        if !conversions.is_empty() {
            tracing::info!(
                running = conversions.len(),
                "waiting for recording conversions"
            );
        }
        while conversions.join_next().await.is_some() {}
        tracing::info!("pipeline stopped");
    }

    async fn stage(&self, mut ev: StageEvent, conversions: &mut JoinSet<()>) {
        if ev.stage == Stage::CallEnded {
            self.prepare_records(&mut ev, conversions).await;
        }
        self.enqueue(&ev).await;
        // Remember where each unfinished call stands (after its jobs are durable: a
        // crash in between at worst ends the call again, which the outbox's
        // idempotency keys absorb).
        let id = ev.call_full.id.clone();
        let result = if ev.stage == Stage::CallEnded {
            self.store.cache_delete(LIVE_KIND, &id).await
        } else {
            match serde_json::to_value(&ev) {
                Ok(v) => self.store.cache_put(LIVE_KIND, &id, &v, LIVE_TTL).await,
                Err(_) => Ok(()),
            }
        };
        if let Err(e) = result {
            tracing::warn!(call_id = %id, error = %e, "cannot save the live call snapshot");
        }
    }

    /// After a (re)connect: calls we had seen that Asterisk no longer has ended while
    /// kolokol was down or disconnected. Register them with what is known.
    async fn end_calls_missed_while_down(
        &self,
        live: &HashSet<String>,
        conversions: &mut JoinSet<()>,
    ) {
        let saved = match self.store.cache_list(LIVE_KIND).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read saved live calls");
                return;
            }
        };
        for (id, value) in saved {
            if live.contains(&id) {
                continue;
            }
            let Ok(mut ev) = serde_json::from_value::<StageEvent>(value) else {
                let _ = self.store.cache_delete(LIVE_KIND, &id).await;
                continue;
            };
            tracing::warn!(call_id = %id, last_stage = ev.stage.as_str(),
                "call ended while kolokol was not connected; registering it with what is known");
            ev.stage = Stage::CallEnded;
            ev.conversation_id = None;
            ev.call_full
                .extra
                .insert("ended_unobserved".into(), Value::Bool(true));
            self.stage(ev, conversions).await;
        }
    }

    async fn enqueue(&self, ev: &StageEvent) {
        let names: Vec<&str> = self
            .connectors
            .iter()
            .filter(|c| c.wants(ev.stage))
            .map(|c| c.name())
            .collect();
        // The journal row for call_ended is written even with no CRM configured.
        if names.is_empty() && ev.stage != Stage::CallEnded {
            return;
        }
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
    async fn prepare_records(&self, ev: &mut StageEvent, conversions: &mut JoinSet<()>) {
        let Some(records) = &self.records else {
            return;
        };
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
            conversions.spawn(async move {
                match records.finish(&call_id, &path).await {
                    Ok(outcome) => tracing::info!(call_id, record_id = %outcome.id, converted = outcome.converted,
                        fallback = outcome.fallback.as_deref().unwrap_or(""), "recording ready"),
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
