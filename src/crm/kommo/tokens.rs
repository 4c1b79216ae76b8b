//! OAuth tokens in SQLite, so `kolokol kommo auth` and the daemon share them.
//!
//! A minimal stand-in until the shared `store` module offers a token table: one row
//! per connector, replaced in a single statement (atomic in SQLite), in the file
//! `<storage.state_dir>/tokens.sqlite`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::crm::{TokenSet, TokenStore};

/// Tokens kept in a SQLite file.
pub struct SqliteTokenStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteTokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteTokenStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteTokenStore {
    /// Open (creating if needed) the token database at `path`.
    pub fn open(path: &Path) -> Result<Self, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .map_err(|e| format!("cannot open token database {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS crm_tokens (
                 connector TEXT PRIMARY KEY,
                 access_token TEXT NOT NULL,
                 refresh_token TEXT NOT NULL,
                 expires_at INTEGER NOT NULL,
                 updated_at INTEGER NOT NULL
             );",
        )
        .map_err(|e| format!("cannot prepare token database {}: {e}", path.display()))?;
        Ok(SqliteTokenStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }
}

impl TokenStore for SqliteTokenStore {
    fn get(&self, connector: &str) -> Option<TokenSet> {
        let conn = self.conn.lock().ok()?;
        conn.query_row(
            "SELECT access_token, refresh_token, expires_at FROM crm_tokens WHERE connector = ?1",
            params![connector],
            |r| {
                Ok(TokenSet {
                    access_token: r.get(0)?,
                    refresh_token: r.get(1)?,
                    expires_at: r.get(2)?,
                })
            },
        )
        .optional()
        .unwrap_or_else(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "cannot read tokens");
            None
        })
    }

    fn put(&self, connector: &str, t: &TokenSet) -> Result<(), String> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| "token store poisoned".to_string())?;
        conn.execute(
            "INSERT INTO crm_tokens (connector, access_token, refresh_token, expires_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, strftime('%s','now'))
             ON CONFLICT(connector) DO UPDATE SET access_token = excluded.access_token,
                 refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
                 updated_at = excluded.updated_at",
            params![connector, t.access_token, t.refresh_token, t.expires_at],
        )
        .map(|_| ())
        .map_err(|e| format!("cannot write tokens to {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.sqlite");
        let s = SqliteTokenStore::open(&p).unwrap();
        assert!(s.get("kommo").is_none());
        let t = TokenSet {
            access_token: "a".into(),
            refresh_token: "r".into(),
            expires_at: 5,
        };
        s.put("kommo", &t).unwrap();
        let t2 = TokenSet {
            refresh_token: "r2".into(),
            ..t
        };
        s.put("kommo", &t2).unwrap();
        drop(s);
        let s = SqliteTokenStore::open(&p).unwrap();
        assert_eq!(s.get("kommo"), Some(t2));
    }
}
