//! Builds the configured CRM connectors (the only place that names them).

use std::sync::Arc;

use axum::Router;

use crate::config::Config;
use crate::crm::Connector;
use crate::crm::rate_limit::RateLimiter;
use crate::hooks::Runner;
use crate::metrics::Registry;
use crate::store::Store;

/// One connector with what the daemon needs around it.
pub struct BuiltConnector {
    pub connector: Arc<dyn Connector>,
    /// Its rate limiter, so a Retry-After pauses every request to that CRM.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Webhook routes it serves (click-to-call events), if any.
    pub router: Option<Router>,
}

/// Build every connector the config enables.
pub async fn build(
    _config: &Config,
    _store: &Store,
    _hooks: Arc<Runner>,
    _metrics: &Registry,
) -> anyhow::Result<Vec<BuiltConnector>> {
    Ok(Vec::new())
}
