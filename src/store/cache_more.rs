//! More of the `caches` table: deleting one entry and listing a kind (the daemon keeps
//! the last snapshot of every unfinished call there).

use rusqlite::params;
use serde_json::Value;

use super::{Store, StoreError, now_ms};

impl Store {
    /// Forget one cache entry.
    pub async fn cache_delete(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        let (kind, key) = (kind.to_string(), key.to_string());
        self.call(move |c| {
            c.execute(
                "DELETE FROM caches WHERE kind = ?1 AND key = ?2",
                params![kind, key],
            )?;
            Ok(())
        })
        .await
    }

    /// Every live (unexpired) entry of `kind`, as (key, value).
    pub async fn cache_list(&self, kind: &str) -> Result<Vec<(String, Value)>, StoreError> {
        let kind = kind.to_string();
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT key, value FROM caches WHERE kind = ?1 AND expires_at > ?2 ORDER BY key",
            )?;
            let rows = st.query_map(params![kind, now_ms()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (k, v) = row?;
                if let Ok(v) = serde_json::from_str(&v) {
                    out.push((k, v));
                }
            }
            Ok(out)
        })
        .await
    }
}
