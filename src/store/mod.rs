//! SQLite storage: migrations, the durable outbox, the call journal, OAuth tokens,
//! caches and the recordings catalog, in one file `<state_dir>/kolokol.db`.
//!
//! One [`Store`] (cheap to clone) owns one connection on a dedicated thread (see
//! `writer`): async callers queue work and await the committed result, so the event
//! loop never touches the disk. The file is in WAL mode, so `kolokol outbox` and
//! `kolokol calls` can read and edit it while the daemon runs.
//!
//! Durability contract of the outbox: [`Store::enqueue_stage`] writes one job per CRM
//! (and, for `call_ended`, the journal row) in one transaction *before* anything is sent;
//! a job leaves `pending` only through [`Store::mark_done`] / [`Store::mark_dead`] /
//! [`Store::drop_job`]. A crash between delivery and `mark_done` redelivers the job, and
//! the connector skips the steps it recorded through [`StoreJobSteps`].

mod cache_more;
mod data;
mod outbox;
mod schema;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use tokio::sync::Notify;

pub use data::{JournalEntry, StoreJobSteps};
pub use outbox::{DueJob, JobState, LIVE_CALL_KIND, ListFilter, OutboxDepth, OutboxJob};

/// The database file's name inside `state_dir`.
pub const DB_FILE: &str = "kolokol.db";

/// SQLite's `synchronous` setting for the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: nothing acknowledged is lost even on power failure.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a crash of kolokol, may lose the last
    /// commits on power failure. Faster on slow disks.
    Normal,
}

/// `[storage]` config section: where state lives and how the outbox retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of `kolokol.db`; created if missing (mode of the service user).
    pub state_dir: PathBuf,
    /// How long a write waits for another process (e.g. `kolokol outbox retry`)
    /// holding the database lock.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// `full` (default) or `normal`; see [`Synchronous`].
    pub synchronous: Synchronous,
    /// Maximum database operations queued at once; producers wait beyond it.
    pub queue: usize,
    /// A job is dead after this many failed attempts...
    pub max_attempts: u32,
    /// ...or when it has been failing for this long.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// First retry delay; doubles each attempt (with jitter) up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long a CRM that refused access (403, revoked token) is left alone before
    /// trying again.
    #[serde(with = "humantime_serde")]
    pub blocked_pause: Duration,
    /// Jobs delivered at once per CRM (never two of the same call).
    pub concurrency: usize,
    /// Workers look for due jobs at least this often (they are also woken on enqueue).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Delivered jobs are deleted after this long (the journal keeps the outcome).
    #[serde(with = "humantime_serde")]
    pub keep_done: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            state_dir: PathBuf::from("/var/lib/kolokol"),
            busy_timeout: Duration::from_secs(5),
            synchronous: Synchronous::Full,
            queue: 1024,
            max_attempts: 25,
            max_age: Duration::from_secs(2 * 24 * 3600),
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(10 * 60),
            blocked_pause: Duration::from_secs(5 * 60),
            concurrency: 16,
            poll_interval: Duration::from_secs(2),
            keep_done: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl StorageConfig {
    /// `<state_dir>/kolokol.db`.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join(DB_FILE)
    }
}

/// What went wrong with the state database; messages say what to check.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create state dir {path}: {reason} — check [storage] state_dir and the service user"
    )]
    CreateDir { path: PathBuf, reason: String },
    #[error(
        "cannot open database {path}: {reason} — check [storage] state_dir and that the service user may write it"
    )]
    Open { path: PathBuf, reason: String },
    #[error(
        "no database at {path}: the daemon has not run with this [storage] state_dir yet (or --config points elsewhere)"
    )]
    Missing { path: PathBuf },
    #[error(
        "database {path} has schema version {found} but this kolokol knows only up to {known}: it was written by a newer kolokol; upgrade this binary"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored {what} is not valid JSON: {reason}")]
    Json { what: &'static str, reason: String },
    #[error("no outbox job with id {0}")]
    NoSuchJob(i64),
    #[error("outbox job {id} is {state}: {hint}")]
    WrongState {
        id: i64,
        state: String,
        hint: &'static str,
    },
    #[error("the database transaction failed: {0}")]
    Batch(String),
    #[error("the storage thread has stopped")]
    Closed,
}

/// Unix time in milliseconds, the unit of every timestamp in the database.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The state database. Clone freely: clones share the connection thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    writer: writer::Writer,
    path: PathBuf,
    queue: usize,
    /// Per-connector wake-ups for the outbox workers, fired after an enqueue commits.
    notify: Mutex<HashMap<String, Arc<Notify>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Open (creating the directory and file if needed) and migrate the database.
    pub fn open(cfg: &StorageConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| StoreError::CreateDir {
            path: cfg.state_dir.clone(),
            reason: io_reason(&e),
        })?;
        Store::open_file(&cfg.db_path(), cfg, true)
    }

    /// Open an existing database (the admin commands): a missing file is an error
    /// rather than a new empty database somewhere unexpected.
    pub fn open_existing(cfg: &StorageConfig) -> Result<Store, StoreError> {
        let path = cfg.db_path();
        if !path.exists() {
            return Err(StoreError::Missing { path });
        }
        Store::open_file(&path, cfg, false)
    }

    fn open_file(path: &Path, cfg: &StorageConfig, create: bool) -> Result<Store, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.to_path_buf(),
            reason: match &e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::CannotOpen
                        || f.code == rusqlite::ErrorCode::ReadOnly
                        || f.code == rusqlite::ErrorCode::PermissionDenied =>
                {
                    format!("{e} (permission denied?)")
                }
                _ => e.to_string(),
            },
        };
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(cfg.busy_timeout).map_err(open_err)?;
        // WAL: readers (the CLI) never block the daemon's writer, and a commit is one
        // sequential append.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %path.display(), mode = %mode, "SQLite refused WAL mode; continuing");
        }
        let sync = match cfg.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        schema::migrate(&mut conn, path).map_err(|e| match e {
            StoreError::Sqlite(e) => open_err(e),
            other => other,
        })?;
        let writer =
            writer::Writer::start(conn, cfg.queue, path.display().to_string()).map_err(|e| {
                StoreError::Open {
                    path: path.to_path_buf(),
                    reason: format!("cannot start the storage thread: {e}"),
                }
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                writer,
                path: path.to_path_buf(),
                queue: cfg.queue.max(1),
                notify: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Database operations waiting or running now (a saturation gauge for /metrics).
    pub fn queued_ops(&self) -> usize {
        self.inner.writer.queued(self.inner.queue)
    }

    /// The wake-up a worker for `connector` waits on; fired whenever a job for it is
    /// enqueued or retried through this `Store`.
    pub fn notifier(&self, connector: &str) -> Arc<Notify> {
        let mut map = match self.inner.notify.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(connector.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    fn wake(&self, connector: &str) {
        self.notifier(connector).notify_one();
    }

    /// Whether the database takes a write right now (for /healthz).
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        self.inner
            .writer
            .call(|c| {
                // A real write to the main file (page 1), committed like any other.
                c.pragma_update(None, "user_version", schema::VERSION)?;
                Ok(())
            })
            .await
    }

    pub(crate) async fn call<F, T>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.inner.writer.call(f).await
    }

    pub(crate) fn call_blocking<F, T>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.inner.writer.call_blocking(f)
    }
}

fn json_err(what: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Json {
        what,
        reason: e.to_string(),
    }
}
