//! `kolokol run`: wiring of AMI → tracker → customizations → outbox → CRM workers,
//! plus the HTTP (and FastAGI) servers. The one place where the parts meet.
//!
//! Shutdown order on SIGTERM/SIGINT (≤ 10 s): stop AMI intake, let the tracker hand
//! over what it has, let the pipeline write every stage to the outbox, let the CRM
//! workers finish their in-flight job, stop HTTP. Pending jobs stay in the database
//! and are resumed at the next start.

pub mod crms;
pub mod outbox_worker;
pub(crate) mod pipeline;
mod recordings;
mod routing;
pub mod systemd;
mod tracking;
mod web;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ami::{AmiClient, AmiHandle, LinkState};
use crate::calls::Tracker;
use crate::config::Config;
use crate::crm::Connector;
use crate::hooks::Runner;
use crate::metrics::Registry;
use crate::records::Recordings;
use crate::store::Store;

pub use tracking::TrackerView;

/// State the HTTP handlers and the status line read.
pub(crate) struct Shared {
    pub store: Store,
    pub ami: AmiHandle,
    pub hooks: Arc<Runner>,
    pub tracker: Arc<TrackerView>,
    pub metrics: Registry,
    pub workers: Mutex<Option<outbox_worker::OutboxWorkers>>,
}

impl Shared {
    fn ami_up(&self) -> bool {
        matches!(self.ami.state(), LinkState::Up { .. })
    }

    fn ami_state_text(&self) -> String {
        match self.ami.state() {
            LinkState::Up { banner } => format!("connected ({banner})"),
            LinkState::Connecting => "connecting".into(),
            LinkState::Down { error } => format!("down: {error}"),
            LinkState::Stopped => "stopped".into(),
        }
    }

    fn workers_status(&self) -> Vec<(String, String)> {
        let Ok(w) = self.workers.lock() else {
            return Vec::new();
        };
        let Some(w) = w.as_ref() else {
            return Vec::new();
        };
        w.statuses()
            .into_iter()
            .map(|s| {
                let state = match &s.state {
                    outbox_worker::ConnectorState::Running => "running".to_string(),
                    outbox_worker::ConnectorState::Paused { reason, .. } => {
                        format!("paused: {reason}")
                    }
                    outbox_worker::ConnectorState::Blocked { reason, .. } => {
                        format!("BLOCKED: {reason}")
                    }
                };
                (s.connector.to_string(), state)
            })
            .collect()
    }
}

/// Where the running daemon listens (the demo and tests read it).
#[derive(Debug, Clone)]
pub struct Listening {
    pub http: SocketAddr,
    pub agi: Option<SocketAddr>,
}

/// Run until `cancel` fires (or a signal arrives, when `handle_signals`).
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    handle_signals: bool,
    on_listening: Option<tokio::sync::oneshot::Sender<Listening>>,
) -> anyhow::Result<()> {
    let notifier = systemd::Notifier::from_env();
    let metrics = Registry::new();

    let store = Store::open(&config.storage)
        .with_context(|| "cannot open the state database ([storage] state_dir)")?;
    let hooks = Arc::new(Runner::new(config.customizations.clone()));
    let records = Recordings::new(
        &config.records,
        &config.storage.state_dir,
        &config.http.public_url,
    )
    .map(Arc::new)
    .map_err(|e| tracing::error!(error = %e, "recordings disabled: fix [records]"))
    .ok();

    let built = crms::build(&config, &store, hooks.clone(), &metrics, records.as_ref())
        .await
        .context("CRM setup failed")?;
    let connectors: Vec<Arc<dyn Connector>> = built.iter().map(|b| b.connector.clone()).collect();
    if connectors.is_empty() {
        tracing::warn!(
            "no CRM configured ([kommo] / [bitrix24]): calls are tracked and journaled only"
        );
    }

    let tracker = Tracker::new(&config.calls).context("invalid [calls] settings")?;
    let (ami, ami_events) = AmiClient::spawn(config.ami.clone());
    let view = Arc::new(TrackerView::default());

    let shared = Arc::new(Shared {
        store: store.clone(),
        ami: ami.clone(),
        hooks: hooks.clone(),
        tracker: view.clone(),
        metrics: metrics.clone(),
        workers: Mutex::new(None),
    });

    // The autodistribution cache, shared by the routing (FastAGI, HTTP) and the CRM
    // workers, whose registrations warm it.
    let agi_cache = Arc::new(crate::agi::ResponsibleCache::from_config(&config.agi));
    let warm = routing::WarmFromRegistrations::new(
        &config,
        agi_cache.clone(),
        &connectors,
        metrics.clone(),
    )
    .map(|w| Arc::new(w) as Arc<dyn outbox_worker::DeliveryListener>);

    // CRM workers first: pending jobs from before a restart resume right away.
    let workers_cancel = CancellationToken::new();
    let workers = outbox_worker::OutboxWorkers::start_with_listener(
        &store,
        built
            .iter()
            .map(|b| (b.connector.clone(), b.limiter.clone()))
            .collect(),
        &config.storage,
        &workers_cancel,
        warm,
    );
    if let Ok(mut w) = shared.workers.lock() {
        *w = Some(workers);
    }

    // HTTP.
    let mut app = web::router(shared.clone()).merge(crate::http::admin::router(
        Arc::new(web::Admin(shared.clone())),
        crate::http::admin::AdminAuth {
            password_sha256: config.http.admin_password_sha256.clone(),
        },
    ));
    if let Some(r) = &records {
        let catalog = Arc::new(recordings::DbCatalog {
            dir: r.catalog(),
            store: store.clone(),
        });
        app = app.merge(crate::records::http::router(
            crate::records::http::RecordsHttp::new(catalog, r.signer().clone()),
        ));
    }
    for b in &built {
        if let Some(r) = &b.router {
            app = app.merge(r.clone());
        }
    }
    let routing_cancel = CancellationToken::new();
    let routing = routing::start(
        &config,
        &connectors,
        agi_cache,
        built.iter().find_map(|b| b.bitrix.clone()),
        hooks.clone(),
        ami.clone(),
        routing_cancel.clone(),
    )
    .await?;
    app = app.merge(routing.router);
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} ([http] listen): is another process using it?",
                config.http.listen
            )
        })?;
    let http_addr = listener.local_addr()?;
    tracing::info!(%http_addr, "HTTP listening (healthz, metrics, admin, records)");
    let http_cancel = CancellationToken::new();
    let http_task = {
        let c = http_cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    };

    // Tracker and pipeline.
    let (stage_tx, stage_rx) = mpsc::channel(4096);
    let tracker_cancel = CancellationToken::new();
    let tracker_task = tokio::spawn(tracking::run(
        tracker,
        ami_events,
        ami.clone(),
        stage_tx,
        view.clone(),
        metrics.clone(),
        tracker_cancel.clone(),
    ));
    let pipeline = Arc::new(pipeline::Pipeline {
        background: tokio_util::task::TaskTracker::new(),
        finishing: Mutex::new(std::collections::HashSet::new()),
        store: store.clone(),
        connectors: connectors.clone(),
        hooks: hooks.clone(),
        records: records.clone(),
        public_url: config.http.public_url.clone(),
        convert: config.records.convert,
        metrics: metrics.clone(),
        time_offset: crate::calls::config::offset_or_utc(&config.calls.time_offset),
    });
    let pipeline_task = tokio::spawn(pipeline.run(stage_rx));

    if let Some(tx) = on_listening {
        let _ = tx.send(Listening {
            http: http_addr,
            agi: routing.agi_addr,
        });
    }
    notifier.ready();
    tracing::info!(crms = ?connectors.iter().map(|c| c.name()).collect::<Vec<_>>(), "kolokol running");

    // Watchdog + status line.
    let status_task = {
        let shared = shared.clone();
        let cancel = cancel.clone();
        let interval = systemd::Notifier::watchdog_interval().unwrap_or(Duration::from_secs(5));
        tokio::spawn(async move {
            let notifier = systemd::Notifier::from_env();
            let mut tick = tokio::time::interval(interval.min(Duration::from_secs(5)));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if notifier.enabled() {
                    let depth = shared.store.depth().await.unwrap_or_default();
                    notifier.watchdog();
                    notifier.status(&format!(
                        "AMI {}; {} live calls; outbox {} pending, {} dead",
                        if shared.ami_up() { "up" } else { "down" },
                        shared.tracker.live_calls().len(),
                        depth.pending,
                        depth.dead
                    ));
                }
            }
        })
    };

    if handle_signals {
        wait_for_signal(&cancel).await;
    } else {
        cancel.cancelled().await;
    }
    cancel.cancel();
    notifier.stopping();
    tracing::info!("shutting down: stopping AMI intake");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(9);

    routing_cancel.cancel();
    ami.shutdown().await;
    tracker_cancel.cancel();
    let _ = tokio::time::timeout_at(deadline, tracker_task).await;
    if tokio::time::timeout_at(deadline, pipeline_task)
        .await
        .is_err()
    {
        tracing::warn!(
            "pipeline did not finish in time; unconverted recordings keep their original file"
        );
    }
    workers_cancel.cancel();
    let workers = shared.workers.lock().ok().and_then(|mut w| w.take());
    if let Some(w) = workers {
        if tokio::time::timeout_at(deadline, w.join()).await.is_err() {
            tracing::warn!(
                "CRM workers still busy at shutdown; their jobs stay pending and resume at next start"
            );
        }
    }
    http_cancel.cancel();
    let _ = tokio::time::timeout_at(deadline, http_task).await;
    status_task.abort();
    for t in routing.tasks {
        t.abort();
    }
    tracing::info!("kolokol stopped");
    Ok(())
}

async fn wait_for_signal(cancel: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with the cancel token only");
        cancel.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = cancel.cancelled() => {}
    }
}
