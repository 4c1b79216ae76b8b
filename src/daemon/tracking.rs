//! The tracker task: owns all call state, fed by the AMI client, emits stage events.
//!
//! It never awaits I/O except handing stage events on (backpressure through a bounded
//! channel). Resync after a (re)connect runs the `CoreShowChannels` action in a separate
//! task, because the AMI reader may itself be waiting for us to take events.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ami::{AmiEvent, AmiHandle, Message};
use crate::calls::{LiveCall, Tracker};

use super::pipeline::PipelineMsg;
use crate::metrics::Registry;

/// What the rest of the daemon can see of the tracker.
#[derive(Debug, Default)]
pub struct TrackerView {
    pub live: RwLock<Vec<LiveCall>>,
}

impl TrackerView {
    pub fn live_calls(&self) -> Vec<LiveCall> {
        self.live.read().map(|v| v.clone()).unwrap_or_default()
    }
}

pub(crate) async fn run(
    mut tracker: Tracker,
    mut ami_events: mpsc::Receiver<AmiEvent>,
    ami: AmiHandle,
    stages: mpsc::Sender<PipelineMsg>,
    view: Arc<TrackerView>,
    metrics: Registry,
    cancel: CancellationToken,
) {
    let events_total = metrics.counter("kolokol_ami_events_total", "AMI events received", &[]);
    let live_gauge = metrics.gauge("kolokol_live_calls", "Calls in progress", &[]);
    // `None`: the resync action failed.
    let (resync_tx, mut resync_rx) = mpsc::channel::<Option<Vec<Message>>>(2);
    let mut reap = tokio::time::interval(Duration::from_secs(60));
    let mut snapshot = tokio::time::interval(Duration::from_secs(1));
    let mut out = Vec::new();

    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            ev = ami_events.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    AmiEvent::Message(m) => {
                        events_total.inc();
                        tracker.handle_into(&m, Utc::now(), &mut out);
                    }
                    AmiEvent::Connected { banner } => {
                        tracing::info!(%banner, "AMI connected; resyncing live calls");
                        // From here on, calls that events touch count as alive, so
                        // events racing the CoreShowChannels answer are not lost.
                        tracker.begin_resync();
                        spawn_resync(ami.clone(), resync_tx.clone());
                    }
                    AmiEvent::Reconnected => {
                        tracing::warn!("AMI reconnected; events in between are lost, resyncing live calls");
                        tracker.begin_resync();
                        spawn_resync(ami.clone(), resync_tx.clone());
                    }
                    AmiEvent::Disconnected { reason } => {
                        tracing::warn!(%reason, "AMI link down; calls keep their state until resync");
                    }
                }
            }
            Some(answer) = resync_rx.recv() => {
                let Some(channels) = answer else {
                    tracker.abort_resync();
                    continue;
                };
                let now = Utc::now();
                for m in &channels {
                    tracker.resync_channel(m, now);
                }
                let ended = tracker.end_resync(now);
                tracing::info!(channels = channels.len(), ended_while_away = ended.iter().filter(|e| e.stage == crate::calls::Stage::CallEnded).count(), "resync done");
                out.extend(ended);
                let live = tracker.live_calls().into_iter().map(|c| c.id).collect();
                for ev in out.drain(..) {
                    if stages.send(PipelineMsg::Stage(ev)).await.is_err() {
                        tracing::error!("pipeline stopped; stage event dropped");
                    }
                }
                let _ = stages.send(PipelineMsg::Resynced { live }).await;
            }
            _ = reap.tick() => {
                let reaped = tracker.reap(Utc::now());
                if !reaped.is_empty() {
                    tracing::warn!(stage_events = reaped.len(), "reaped calls with no event for too long");
                }
                out.extend(reaped);
            }
            _ = snapshot.tick() => {
                let live = tracker.live_calls();
                live_gauge.set(live.len() as u64);
                if let Ok(mut v) = view.live.write() {
                    *v = live;
                }
            }
        }
        for ev in out.drain(..) {
            tracing::info!(
                call_id = %ev.call_full.id,
                stage = ev.stage.as_str(),
                conversation_id = ev.conversation_id.as_deref().unwrap_or(""),
                direction = ev.call_full.direction.as_str(),
                client = %ev.call_full.client_phone,
                "stage"
            );
            metrics
                .counter(
                    "kolokol_stage_events_total",
                    "Stage events emitted",
                    &[("stage", ev.stage.as_str())],
                )
                .inc();
            if stages.send(PipelineMsg::Stage(ev)).await.is_err() {
                tracing::error!("pipeline stopped; stage event dropped");
            }
        }
    }
    tracing::info!("tracker stopped");
}

fn spawn_resync(ami: AmiHandle, tx: mpsc::Sender<Option<Vec<Message>>>) {
    tokio::spawn(async move {
        let action = Message::from_pairs(&[("Action", "CoreShowChannels")]);
        match ami.action(action).await {
            Ok(resp) if resp.is_success() => {
                let _ = tx.send(Some(resp.events)).await;
            }
            Ok(resp) => {
                tracing::warn!(
                    message = resp.message().unwrap_or(""),
                    "CoreShowChannels refused (give the AMI user read = reporting): live calls not resynced"
                );
                let _ = tx.send(None).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "CoreShowChannels failed: live calls not resynced");
                let _ = tx.send(None).await;
            }
        }
    });
}
