//! Autodistribution (FastAGI and `GET /autodistribution`) and click-to-call (Kommo
//! endpoint, Bitrix24 `ONEXTERNALCALLSTART`) wired to the CRMs and to the daemon's own
//! AMI connection.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio_util::sync::CancellationToken;

use super::outbox_worker::DeliveryListener;
use crate::agi::{
    AgiServer, AutodistHandler, Autodistributor, CacheWarmer, CrmLookup, ResponsibleCache, Warmed,
};
use crate::ami::{AmiHandle, Message};
use crate::config::Config;
use crate::crm::bitrix24::{Bitrix24, ClickToCall as BitrixClickToCall};
use crate::crm::{BoxFuture, Connector, DeliveryReport, Job};
use crate::hooks::Customize;
use crate::metrics::Registry;
use crate::originate::{ClickToCall, OriginateError, OriginateRequest, Originator};

/// Warms the autodistribution cache from delivered CRM registrations (the outbox
/// workers tell it of each delivered job), counted in `/metrics`.
pub(crate) struct WarmFromRegistrations {
    warmer: CacheWarmer,
    metrics: Registry,
    /// Reports of jobs queued longer than a cached answer may live are not used: their
    /// steps may describe the CRM as it was long ago.
    max_age: std::time::Duration,
}

impl WarmFromRegistrations {
    /// `None` when warming is off (`[agi] warm_from_registrations`, or no positive TTL).
    pub fn new(
        config: &Config,
        cache: Arc<ResponsibleCache>,
        connectors: &[Arc<dyn Connector>],
        metrics: Registry,
    ) -> Option<WarmFromRegistrations> {
        if !config.agi.warm_from_registrations
            || config.agi.cache_ttl.is_zero()
            || connectors.is_empty()
        {
            return None;
        }
        // The same order as the lookup's (`CrmLookup::new(connectors)` in `start`).
        let order = connectors.iter().map(|c| c.name()).collect();
        Some(WarmFromRegistrations {
            warmer: CacheWarmer::new(cache, order),
            metrics,
            max_age: config.agi.cache_ttl,
        })
    }
}

impl DeliveryListener for WarmFromRegistrations {
    fn delivered<'a>(
        &'a self,
        connector: &'a dyn Connector,
        job: &'a Job,
        report: &'a DeliveryReport,
        queued: std::time::Duration,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if queued > self.max_age {
                return;
            }
            let crm = [("crm", connector.name())];
            match self.warmer.delivered(connector, job, report).await {
                Some(Warmed::Stored) => self
                    .metrics
                    .counter(
                        "kolokol_agi_cache_warmed_total",
                        "Autodistribution answers stored from CRM registrations",
                        &crm,
                    )
                    .inc(),
                Some(Warmed::Forgotten) => self
                    .metrics
                    .counter(
                        "kolokol_agi_cache_forgotten_total",
                        "Cached autodistribution answers dropped because a registration showed them stale",
                        &crm,
                    )
                    .inc(),
                Some(Warmed::Kept) | None => {}
            }
        })
    }
}

/// Originate through the daemon's long-lived AMI connection.
pub(crate) struct AmiOriginator(pub AmiHandle);

impl Originator for AmiOriginator {
    fn originate(&self, action: Message) -> BoxFuture<'_, Result<Message, OriginateError>> {
        Box::pin(async move {
            self.0
                .action(action)
                .await
                .map(|r| r.response)
                .map_err(|e| OriginateError::Connection(e.to_string()))
        })
    }
}

/// What routing adds to the daemon.
pub(crate) struct Routing {
    pub router: Router,
    pub agi_addr: Option<SocketAddr>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(crate) async fn start(
    config: &Config,
    connectors: &[Arc<dyn Connector>],
    cache: Arc<ResponsibleCache>,
    bitrix: Option<Arc<Bitrix24>>,
    hooks: Arc<dyn Customize>,
    ami: AmiHandle,
    cancel: CancellationToken,
) -> anyhow::Result<Routing> {
    let mut router = Router::new();
    let mut tasks = Vec::new();

    // Autodistribution: the CRMs answer who is responsible for a caller.
    let lookup = Arc::new(CrmLookup::new(connectors.to_vec()));
    let auto = Arc::new(Autodistributor::new(
        &config.agi,
        lookup,
        cache,
        hooks.clone(),
    ));
    router = router.merge(crate::agi::http::router(auto.clone()));
    let mut agi_addr = None;
    if !config.agi.listen.trim().is_empty() {
        let server = AgiServer::bind(&config.agi).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for FastAGI on {} ([agi] listen): {e}",
                config.agi.listen
            )
        })?;
        let server = server.route(
            "autodistribution",
            Arc::new(AutodistHandler::new(&config.agi, auto.clone())),
        );
        agi_addr = server.local_addr().ok();
        tracing::info!(addr = ?agi_addr, "FastAGI listening (agi://.../autodistribution)");
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move { server.run(c).await }));
    }

    // Click-to-call through our AMI connection.
    let click = Arc::new(ClickToCall::new(
        config.originate.clone(),
        hooks,
        Arc::new(AmiOriginator(ami)),
    ));
    if let Some(k) = &config.kommo {
        router = router.merge(crate::originate::kommo::router(Arc::new(
            crate::originate::kommo::KommoClickToCall {
                click_to_call: click.clone(),
                token: config.originate.kommo_token.clone(),
                users: k.users.clone(),
            },
        )));
    }
    if let Some(b24) = bitrix {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<BitrixClickToCall>(64);
        let (events_router, poller) = b24.click_to_call(tx, cancel.clone());
        router = router.merge(events_router);
        if let Some(p) = poller {
            tasks.push(p);
        }
        let click = click.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let phone = if req.phone_international.is_empty() {
                    req.phone.clone()
                } else {
                    req.phone_international.clone()
                };
                let crm_call_id = req.crm_call_id.clone();
                let result = click
                    .start(OriginateRequest {
                        from: req.extension.clone(),
                        to: phone,
                        request_id: crm_call_id.clone(),
                        request_data: serde_json::json!({
                            "crm": "bitrix24",
                            "CALL_ID": crm_call_id,
                            "USER_ID": req.user_id,
                            "LINE_NUMBER": req.line_number,
                        }),
                    })
                    .await;
                match result {
                    Ok(s) => tracing::info!(crm = "bitrix24", crm_call_id, action_id = %s.action_id, "click-to-call originated"),
                    Err(e) => tracing::warn!(crm = "bitrix24", crm_call_id, error = %e, "click-to-call failed"),
                }
            }
        }));
    }
    Ok(Routing {
        router,
        agi_addr,
        tasks,
    })
}
