//! Builds the configured CRM connectors (the only place that names them) and backs
//! their per-call state with the state database.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rusqlite::{OptionalExtension, params};

use crate::config::Config;
use crate::crm::Connector;
use crate::crm::bitrix24::{self, Bitrix24, CallIdStore, CallRecord, PathRecords};
use crate::crm::kommo::KommoConnector;
use crate::crm::rate_limit::RateLimiter;
use crate::hooks::{Customize, Runner};
use crate::metrics::Registry;
use crate::store::{Store, StoreError, now_ms};

/// One connector with what the daemon needs around it.
pub struct BuiltConnector {
    pub connector: Arc<dyn Connector>,
    /// Its rate limiter, when the worker should pause it on Retry-After.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Webhook routes it serves, if any.
    pub router: Option<Router>,
    /// The Bitrix24 connector itself (click-to-call intake needs it).
    pub bitrix: Option<Arc<Bitrix24>>,
}

/// How long a Bitrix24 upload waits for the recording's conversion to finish.
const UPLOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Build every connector the config enables. Account checks run in the background:
/// a CRM that is down at start must not stop call tracking (jobs wait in the outbox).
pub async fn build(
    config: &Config,
    store: &Store,
    hooks: Arc<Runner>,
    _metrics: &Registry,
    records: Option<&Arc<crate::records::Recordings>>,
) -> anyhow::Result<Vec<BuiltConnector>> {
    let mut out = Vec::new();
    let hooks: Arc<dyn Customize> = hooks;
    if let Some(cfg) = &config.kommo {
        let kommo = KommoConnector::new(cfg.clone(), Arc::new(store.clone()), hooks.clone())
            .map_err(|e| anyhow::anyhow!("[kommo]: {e}"))?;
        let kommo = Arc::new(kommo);
        let check = kommo.clone();
        tokio::spawn(async move {
            match check.check_account().await {
                Ok(report) => tracing::info!(crm = "kommo", ?report, "Kommo account checked"),
                Err(e) => {
                    tracing::error!(crm = "kommo", error = %e, "Kommo account check failed: calls stay queued until this is fixed")
                }
            }
        });
        out.push(BuiltConnector {
            connector: kommo,
            limiter: None,
            router: None,
            bitrix: None,
        });
    }
    if let Some(cfg) = &config.bitrix24 {
        let b24 = Bitrix24::new(
            cfg.clone(),
            bitrix24::Deps {
                store: Arc::new(DbCallIds(store.clone())),
                hooks: hooks.clone(),
                records: match records {
                    // Upload the converted file behind the call's signed link.
                    Some(r) => Arc::new(super::recordings::DaemonRecords {
                        catalog: Arc::new(super::recordings::DbCatalog {
                            dir: r.catalog(),
                            store: store.clone(),
                        }),
                        signer: r.signer().clone(),
                        wait: UPLOAD_WAIT,
                    }),
                    None => Arc::new(PathRecords),
                },
                tokens: Arc::new(store.clone()),
            },
        )
        .map_err(|e| anyhow::anyhow!("[bitrix24]: {e}"))?;
        let check = b24.clone();
        tokio::spawn(async move {
            match check.check_access().await {
                Ok(users) => tracing::info!(crm = "bitrix24", users, "Bitrix24 access checked"),
                Err(e) => {
                    tracing::error!(crm = "bitrix24", error = %e, "Bitrix24 access check failed: calls stay queued until this is fixed")
                }
            }
        });
        out.push(BuiltConnector {
            connector: b24.clone(),
            limiter: None,
            router: None,
            bitrix: Some(b24),
        });
    }
    Ok(out)
}

/// Bitrix24's per-call state (its CALL_ID, shown cards) in the `caches` table, so a
/// restart between a call's `register` and its `finish` still finishes the same card.
struct DbCallIds(Store);

const CALL_KIND: &str = "bitrix24:call";
/// Kept long after any call could still be running.
const CALL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl CallIdStore for DbCallIds {
    fn get(&self, call_id: &str) -> Option<CallRecord> {
        let key = call_id.to_string();
        let text = self
            .0
            .call_blocking(move |c| {
                Ok(
                    c.prepare_cached("SELECT value FROM caches WHERE kind = ?1 AND key = ?2")?
                        .query_row(params![CALL_KIND, key], |r| r.get::<_, String>(0))
                        .optional()?,
                )
            })
            .map_err(|e| tracing::error!(call_id, error = %e, "cannot read Bitrix24 call state"))
            .ok()??;
        serde_json::from_str(&text).ok()
    }

    fn put(&self, call_id: &str, rec: &CallRecord) -> Result<(), String> {
        let text = serde_json::to_string(rec).map_err(|e| e.to_string())?;
        let key = call_id.to_string();
        let expires = now_ms() + CALL_TTL.as_millis() as i64;
        self.0
            .call_blocking(move |c| {
                c.prepare_cached(
                    "INSERT INTO caches (kind, key, value, expires_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                )?
                .execute(params![CALL_KIND, key, text, expires])?;
                Ok::<_, StoreError>(())
            })
            .map_err(|e| e.to_string())
    }

    fn remove(&self, call_id: &str) {
        let key = call_id.to_string();
        if let Err(e) = self.0.call_blocking(move |c| {
            c.execute(
                "DELETE FROM caches WHERE kind = ?1 AND key = ?2",
                params![CALL_KIND, key],
            )?;
            Ok::<_, StoreError>(())
        }) {
            tracing::warn!(call_id, error = %e, "cannot forget Bitrix24 call state");
        }
    }
}
