//! Versioned migrations, tracked in SQLite's `user_version`.
//!
//! Append new steps at the end; never edit a released one: a database is migrated by
//! running, in order, every step past its `user_version`, each in its own transaction.

use rusqlite::Connection;

use super::StoreError;

/// Migration steps; step `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: outbox, job steps, journal, tokens, caches, recordings.
    r#"
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        connector       TEXT    NOT NULL,
        call_id         TEXT    NOT NULL,
        stage           TEXT    NOT NULL,
        conversation_id TEXT,
        payload         TEXT    NOT NULL,            -- the StageEvent as JSON
        idempotency_key TEXT    NOT NULL UNIQUE,     -- connector|call_id|stage|conversation_id
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,            -- unix ms
        last_error      TEXT,
        report          TEXT,                        -- what the CRM answered (JSON), when done
        state           TEXT    NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'done', 'dead', 'dropped')),
        held            INTEGER NOT NULL DEFAULT 0,  -- 1 while an earlier job of the call is unfinished
        created_at      INTEGER NOT NULL,            -- unix ms
        retried_at      INTEGER,                     -- unix ms of the last admin retry
        updated_at      INTEGER NOT NULL             -- unix ms
    );
    -- The workers' query: due jobs of one connector that are not held behind their
    -- call's earlier jobs (a partial index: only what can be sent is in it).
    CREATE INDEX outbox_due ON outbox (connector, next_attempt_at)
        WHERE state = 'pending' AND held = 0;
    CREATE INDEX outbox_state ON outbox (state, connector);
    -- Per-call ordering: earlier unfinished jobs of the same call.
    CREATE INDEX outbox_call ON outbox (connector, call_id, id);

    CREATE TABLE job_steps (
        job_id     INTEGER NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
        step       TEXT    NOT NULL,
        result     TEXT    NOT NULL,                 -- JSON
        created_at INTEGER NOT NULL,
        PRIMARY KEY (job_id, step)
    ) WITHOUT ROWID;

    CREATE TABLE journal (
        call_id   TEXT PRIMARY KEY,
        call_full TEXT NOT NULL,                     -- final call_full JSON
        crm       TEXT NOT NULL DEFAULT '{}',        -- {"kommo": {"call_ended": {...}}, ...}
        ended_at  INTEGER                            -- unix ms; NULL while the call is live
    );
    CREATE INDEX journal_ended ON journal (ended_at);

    CREATE TABLE tokens (
        connector  TEXT PRIMARY KEY,
        tokens     TEXT    NOT NULL,                 -- TokenSet JSON
        updated_at INTEGER NOT NULL
    );

    CREATE TABLE caches (
        kind       TEXT    NOT NULL,                 -- e.g. "responsible:kommo"
        key        TEXT    NOT NULL,                 -- e.g. a normalised phone
        value      TEXT    NOT NULL,                 -- JSON
        expires_at INTEGER NOT NULL,                 -- unix ms
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;

    CREATE TABLE recordings (
        id         TEXT PRIMARY KEY,                 -- the id in signed links
        path       TEXT    NOT NULL,
        call_id    TEXT,
        created_at INTEGER NOT NULL
    );
    "#,
];

/// The schema version this build writes.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Bring `conn` up to [`VERSION`]. Refuses a database from a newer build rather than
/// guessing at tables it does not know.
pub(crate) fn migrate(conn: &mut Connection, path: &std::path::Path) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: current,
            known: VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        // Re-check under the lock: another process may have migrated meanwhile.
        let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if v > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(db = %path.display(), version = i + 1, "database schema migrated");
    }
    Ok(())
}
