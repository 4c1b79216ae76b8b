//! The employee directory: Bitrix24 users with an internal number (`UF_PHONE_INNER`),
//! loaded with `user.get` in pages of 50, cached, and refreshed periodically.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::Client;
use super::error::BitrixError;

/// A Bitrix24 user reachable on the PBX.
#[derive(Debug, Clone, PartialEq)]
pub struct Employee {
    pub id: i64,
    pub name: String,
    /// Internal number (extension), digits only.
    pub extension: String,
}

#[derive(Default)]
struct Snapshot {
    by_ext: HashMap<String, Employee>,
    by_id: HashMap<i64, Employee>,
    loaded_at: Option<Instant>,
}

/// Cached user list.
pub struct Directory {
    client: Arc<Client>,
    refresh_every: Duration,
    snap: RwLock<Snapshot>,
    loading: Mutex<()>,
}

/// Upper bound on pages read (50 users each).
const MAX_PAGES: usize = 400;

impl Directory {
    pub fn new(client: Arc<Client>, refresh_every: Duration) -> Self {
        Directory {
            client,
            refresh_every,
            snap: RwLock::new(Snapshot::default()),
            loading: Mutex::new(()),
        }
    }

    /// Load every active employee now. Returns how many have an internal number.
    pub async fn refresh(&self) -> Result<usize, BitrixError> {
        let _g = self.loading.lock().await;
        let mut by_ext = HashMap::new();
        let mut by_id = HashMap::new();
        let mut skipped = Vec::new();
        let mut start: i64 = 0;
        for _ in 0..MAX_PAGES {
            let page = self
                .client
                .call_full(
                    "user.get",
                    json!({
                        "FILTER": {"ACTIVE": true, "USER_TYPE": "employee"},
                        "start": start,
                    }),
                )
                .await?;
            let users = page
                .get("result")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for u in &users {
                let Some(id) = as_i64(u.get("ID")) else {
                    continue;
                };
                let name = [u.get("NAME"), u.get("LAST_NAME")]
                    .iter()
                    .filter_map(|v| v.and_then(Value::as_str))
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                let ext = u
                    .get("UF_PHONE_INNER")
                    .and_then(Value::as_str)
                    .map(crate::phone::digits)
                    .unwrap_or_default();
                if ext.is_empty() {
                    skipped.push(format!("{id} ({name})"));
                    continue;
                }
                let e = Employee {
                    id,
                    name,
                    extension: ext.clone(),
                };
                if let Some(prev) = by_ext.insert(ext.clone(), e.clone()) {
                    warn!(crm = "bitrix24", extension = %ext, users = %format!("{} and {}", prev.id, id), "two Bitrix24 users share one internal number; the later one wins: fix UF_PHONE_INNER");
                }
                by_id.insert(id, e);
            }
            match as_i64(page.get("next")) {
                Some(next) if next > start && !users.is_empty() => start = next,
                _ => break,
            }
        }
        if !skipped.is_empty() {
            let shown: Vec<_> = skipped.iter().take(20).cloned().collect();
            info!(crm = "bitrix24", count = skipped.len(), users = %shown.join(", "), "Bitrix24 users without an internal number (UF_PHONE_INNER) are skipped");
        }
        let n = by_ext.len();
        *self.snap.write().await = Snapshot {
            by_ext,
            by_id,
            loaded_at: Some(Instant::now()),
        };
        info!(crm = "bitrix24", employees = n, "employee directory loaded");
        Ok(n)
    }

    async fn ensure_fresh(&self) -> Result<(), BitrixError> {
        let stale = {
            let s = self.snap.read().await;
            s.loaded_at
                .is_none_or(|t| t.elapsed() >= self.refresh_every)
        };
        if stale {
            let have_data = self.snap.read().await.loaded_at.is_some();
            if let Err(e) = self.refresh().await {
                if have_data {
                    // A stale map beats no call registration at all.
                    warn!(crm = "bitrix24", error = %e, "cannot refresh the employee directory, using the cached one");
                } else {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The employee with this internal number.
    pub async fn by_extension(&self, ext: &str) -> Result<Option<Employee>, BitrixError> {
        self.ensure_fresh().await?;
        Ok(self
            .snap
            .read()
            .await
            .by_ext
            .get(&crate::phone::digits(ext))
            .cloned())
    }

    /// The employee with this Bitrix24 user id (if they have an internal number).
    pub async fn by_id(&self, id: i64) -> Result<Option<Employee>, BitrixError> {
        self.ensure_fresh().await?;
        Ok(self.snap.read().await.by_id.get(&id).cloned())
    }
}

/// Bitrix24 sends ids as strings or numbers.
pub fn as_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
