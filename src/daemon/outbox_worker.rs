//! The outbox worker: one task per CRM connector that takes due jobs from the
//! [`Store`] and hands them to [`Connector::deliver`].
//!
//! - A call's jobs go out in order: the store hands out at most the first unfinished
//!   job of each call, and the worker never runs two jobs of one call at once.
//! - `Retryable` → the attempt is counted and the job is retried with exponential
//!   backoff and jitter (never sooner than the CRM's `Retry-After`, which also pauses
//!   the whole connector and its rate limiter). After `max_attempts` attempts or
//!   `max_age` of failing, the job is dead: kept, listed, retryable by the admin.
//! - `Rejected` → dead at once, with the CRM's detail.
//! - `Blocked` → the connector stops for `blocked_pause` (jobs are kept, no attempt is
//!   counted), which is logged as an error and shown in [`WorkerStatus`].
//! - Woken by enqueues (the store's per-connector `Notify`), finished deliveries and a
//!   timer (`poll_interval`, or the next due job, whichever is sooner).
//! - On cancellation it takes no new job and waits for the in-flight ones, so nothing
//!   is half-recorded; a job interrupted harder than that (kill -9) is redelivered at
//!   start and its connector skips the steps it already recorded.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::crm::rate_limit::RateLimiter;
use crate::crm::{BoxFuture, Connector, CrmError, DeliveryReport, Job};
use crate::store::{DueJob, StorageConfig, Store, now_ms};

/// Retry and pacing policy of one worker (from `[storage]`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub blocked_pause: Duration,
    pub concurrency: usize,
    pub poll_interval: Duration,
}

impl From<&StorageConfig> for WorkerConfig {
    fn from(c: &StorageConfig) -> Self {
        WorkerConfig {
            max_attempts: c.max_attempts.max(1),
            max_age: c.max_age,
            retry_min: c.retry_min,
            retry_max: c.retry_max.max(c.retry_min),
            blocked_pause: c.blocked_pause,
            concurrency: c.concurrency.max(1),
            poll_interval: c.poll_interval.max(Duration::from_millis(10)),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig::from(&StorageConfig::default())
    }
}

impl WorkerConfig {
    /// Delay before attempt `attempts + 1`: `retry_min * 2^(attempts-1)` capped at
    /// `retry_max`, scaled by a random factor in [0.5, 1) so that jobs failed together
    /// do not come back together.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let base = self
            .retry_min
            .saturating_mul(1u32 << exp)
            .min(self.retry_max);
        base.mul_f64(rand::thread_rng().gen_range(0.5..1.0))
    }
}

/// Told of every job delivered (after its outcome is recorded), with the connector's
/// report: the daemon warms the autodistribution cache this way. Runs inside the
/// delivery task, bounded by [`LISTENER_TIMEOUT`]; it cannot fail the job.
pub trait DeliveryListener: Send + Sync {
    /// `queued`: from enqueue (or admin retry) to delivered; a report of a job that
    /// waited long (retries during an outage) may describe an older state of the CRM.
    fn delivered<'a>(
        &'a self,
        connector: &'a dyn Connector,
        job: &'a Job,
        report: &'a DeliveryReport,
        queued: Duration,
    ) -> BoxFuture<'a, ()>;
}

/// A connector with its own rate limiter, if any (see [`OutboxWorker::spawn`]).
pub type WorkerConnector = (Arc<dyn Connector>, Option<Arc<RateLimiter>>);

/// Longest a [`DeliveryListener`] may hold a delivery slot.
pub const LISTENER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connector is not delivering right now.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ConnectorState {
    Running,
    /// The CRM asked us to slow down (Retry-After) or the database failed.
    Paused {
        until_ms: i64,
        reason: String,
    },
    /// The CRM refused access: needs the admin (credentials, account).
    Blocked {
        until_ms: i64,
        reason: String,
    },
}

/// A worker's live status, for /healthz and `STATUS=` lines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerStatus {
    pub connector: &'static str,
    #[serde(flatten)]
    pub state: ConnectorState,
    pub in_flight: usize,
    pub last_error: Option<String>,
}

/// Histogram bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A lock-free Prometheus histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {n}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Delivery counters of one worker, for /metrics.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Delivered.
    pub done: AtomicU64,
    /// Failed, will be retried.
    pub retried: AtomicU64,
    /// Rejected by the CRM: dead.
    pub rejected: AtomicU64,
    /// Out of attempts or time: dead.
    pub expired: AtomicU64,
    /// The CRM refused access.
    pub blocked: AtomicU64,
    /// The database failed around a delivery (the job stays pending).
    pub store_errors: AtomicU64,
    /// Duration of `Connector::deliver` calls.
    pub deliver_latency: Histogram,
    /// From enqueue (or admin retry) to delivered.
    pub queue_delay: Histogram,
}

struct Shared {
    name: &'static str,
    stats: WorkerStats,
    status: Mutex<(ConnectorState, Option<String>, usize)>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, (ConnectorState, Option<String>, usize)> {
        match self.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Unix ms until which no new job may start.
    fn gate_until(&self) -> i64 {
        match &self.lock().0 {
            ConnectorState::Running => 0,
            ConnectorState::Paused { until_ms, .. } | ConnectorState::Blocked { until_ms, .. } => {
                *until_ms
            }
        }
    }

    fn set_gate(&self, state: ConnectorState) {
        let mut g = self.lock();
        let new_until = match &state {
            ConnectorState::Running => 0,
            ConnectorState::Paused { until_ms, .. } | ConnectorState::Blocked { until_ms, .. } => {
                *until_ms
            }
        };
        let old_until = match &g.0 {
            ConnectorState::Running => 0,
            ConnectorState::Paused { until_ms, .. } | ConnectorState::Blocked { until_ms, .. } => {
                *until_ms
            }
        };
        // A block outranks a pause; otherwise the later deadline wins.
        let keep_block = matches!(g.0, ConnectorState::Blocked { .. })
            && matches!(state, ConnectorState::Paused { .. })
            && old_until > now_ms();
        if !keep_block && (new_until >= old_until || matches!(state, ConnectorState::Running)) {
            g.0 = state;
        }
    }
}

/// A running worker. Dropping it does not stop it; cancel the token and
/// [`OutboxWorker::join`].
pub struct OutboxWorker {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl OutboxWorker {
    /// Start delivering `connector`'s jobs. `limiter` is the connector's own rate
    /// limiter, if it has one, so that a Retry-After pauses every request to that CRM.
    pub fn spawn(
        store: Store,
        connector: Arc<dyn Connector>,
        limiter: Option<Arc<RateLimiter>>,
        cfg: WorkerConfig,
        cancel: CancellationToken,
    ) -> OutboxWorker {
        Self::spawn_with_listener(store, connector, limiter, cfg, cancel, None)
    }

    /// [`OutboxWorker::spawn`], telling `listener` of every delivered job.
    pub fn spawn_with_listener(
        store: Store,
        connector: Arc<dyn Connector>,
        limiter: Option<Arc<RateLimiter>>,
        cfg: WorkerConfig,
        cancel: CancellationToken,
        listener: Option<Arc<dyn DeliveryListener>>,
    ) -> OutboxWorker {
        let shared = Arc::new(Shared {
            name: connector.name(),
            stats: WorkerStats::default(),
            status: Mutex::new((ConnectorState::Running, None, 0)),
        });
        let w = Worker {
            store,
            connector,
            limiter,
            cfg,
            shared: shared.clone(),
            listener,
        };
        let task = tokio::spawn(w.run(cancel));
        OutboxWorker { shared, task }
    }

    pub fn connector(&self) -> &'static str {
        self.shared.name
    }

    /// Live status (running / paused / blocked, in-flight jobs, last error).
    pub fn status(&self) -> WorkerStatus {
        let g = self.shared.lock();
        let state = match &g.0 {
            ConnectorState::Paused { until_ms, .. } | ConnectorState::Blocked { until_ms, .. }
                if *until_ms <= now_ms() =>
            {
                ConnectorState::Running
            }
            s => s.clone(),
        };
        WorkerStatus {
            connector: self.shared.name,
            state,
            in_flight: g.2,
            last_error: g.1.clone(),
        }
    }

    /// Delivery counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats
    }

    /// Wait until the worker has stopped (after its cancellation token fired and the
    /// in-flight jobs finished).
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(crm = self.shared.name, error = %e, "outbox worker task failed");
        }
    }
}

/// Append the workers' metrics in Prometheus text format.
pub fn render_prometheus(workers: &[&OutboxWorker], out: &mut String) {
    out.push_str("# HELP kolokol_crm_deliveries_total Outbox jobs handed to a CRM, by outcome.\n");
    out.push_str("# TYPE kolokol_crm_deliveries_total counter\n");
    for w in workers {
        let s = w.stats();
        for (result, n) in [
            ("done", &s.done),
            ("retry", &s.retried),
            ("rejected", &s.rejected),
            ("expired", &s.expired),
            ("blocked", &s.blocked),
            ("store_error", &s.store_errors),
        ] {
            let _ = writeln!(
                out,
                "kolokol_crm_deliveries_total{{crm=\"{}\",result=\"{result}\"}} {}",
                w.connector(),
                n.load(Ordering::Relaxed)
            );
        }
    }
    out.push_str("# HELP kolokol_crm_blocked 1 while a CRM refuses access.\n");
    out.push_str("# TYPE kolokol_crm_blocked gauge\n");
    for w in workers {
        let blocked = matches!(w.status().state, ConnectorState::Blocked { .. });
        let _ = writeln!(
            out,
            "kolokol_crm_blocked{{crm=\"{}\"}} {}",
            w.connector(),
            u8::from(blocked)
        );
    }
    out.push_str("# HELP kolokol_crm_delivery_seconds Duration of one job's delivery.\n");
    out.push_str("# TYPE kolokol_crm_delivery_seconds histogram\n");
    for w in workers {
        let labels = format!("crm=\"{}\"", w.connector());
        w.stats()
            .deliver_latency
            .render(out, "kolokol_crm_delivery_seconds", &labels);
    }
    out.push_str("# HELP kolokol_outbox_delay_seconds From enqueue to delivered.\n");
    out.push_str("# TYPE kolokol_outbox_delay_seconds histogram\n");
    for w in workers {
        let labels = format!("crm=\"{}\"", w.connector());
        w.stats()
            .queue_delay
            .render(out, "kolokol_outbox_delay_seconds", &labels);
    }
}

/// What one delivery came to, reported back to the loop.
enum Outcome {
    Done,
    Retry,
    Dead,
    Blocked,
    StoreError,
}

struct Worker {
    store: Store,
    connector: Arc<dyn Connector>,
    limiter: Option<Arc<RateLimiter>>,
    cfg: WorkerConfig,
    shared: Arc<Shared>,
    listener: Option<Arc<dyn DeliveryListener>>,
}

impl Worker {
    async fn run(self, cancel: CancellationToken) {
        let name = self.shared.name;
        let notify = self.store.notifier(name);
        let mut inflight: JoinSet<Outcome> = JoinSet::new();
        // task id → (job id, call id)
        let mut running: HashMap<tokio::task::Id, (i64, String)> = HashMap::new();
        match self.store.resume_blocked(name).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                crm = name,
                jobs = n,
                "retrying jobs put off by an earlier access refusal"
            ),
            Err(e) => tracing::warn!(crm = name, error = %e, "cannot read the outbox"),
        }
        tracing::info!(crm = name, "outbox worker started");
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let now = now_ms();
            let mut wait = self.cfg.poll_interval;
            let gate = self.shared.gate_until();
            if gate > now {
                wait = wait.min(Duration::from_millis((gate - now) as u64));
            } else {
                self.fill(&mut inflight, &mut running, now).await;
                // With jobs in flight their completion wakes us anyway; asking only
                // when idle keeps the loop at one query per finished job.
                if inflight.is_empty() {
                    match self.store.next_due_at(name).await {
                        Ok(Some(t)) if t > now => {
                            wait = wait.min(Duration::from_millis((t - now) as u64));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(crm = name, error = %e, "cannot read the outbox");
                        }
                    }
                }
            }
            self.shared.lock().2 = inflight.len();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(res) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                    self.finished(res, &mut running).await;
                }
            }
        }
        if !inflight.is_empty() {
            tracing::info!(
                crm = name,
                in_flight = inflight.len(),
                "outbox worker finishing in-flight jobs"
            );
        }
        while let Some(res) = inflight.join_next_with_id().await {
            self.finished(res, &mut running).await;
        }
        self.shared.lock().2 = 0;
        tracing::info!(crm = name, "outbox worker stopped");
    }

    /// Start due jobs up to the concurrency limit, never two of one call.
    async fn fill(
        &self,
        inflight: &mut JoinSet<Outcome>,
        running: &mut HashMap<tokio::task::Id, (i64, String)>,
        now: i64,
    ) {
        let free = self.cfg.concurrency.saturating_sub(inflight.len());
        if free == 0 {
            return;
        }
        let jobs = match self
            .store
            .due_jobs(self.shared.name, free + inflight.len(), now)
            .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(crm = self.shared.name, error = %e, "cannot read due jobs from the outbox");
                self.pause(self.cfg.poll_interval, format!("database: {e}"));
                return;
            }
        };
        let busy_jobs: HashSet<i64> = running.values().map(|(id, _)| *id).collect();
        let busy_calls: HashSet<String> = running.values().map(|(_, c)| c.clone()).collect();
        for due in jobs
            .into_iter()
            .filter(|d| !busy_jobs.contains(&d.job.id) && !busy_calls.contains(&d.call_id))
            .take(free)
        {
            let key = (due.job.id, due.call_id.clone());
            let ctx = Delivery {
                store: self.store.clone(),
                connector: self.connector.clone(),
                limiter: self.limiter.clone(),
                cfg: self.cfg.clone(),
                shared: self.shared.clone(),
                listener: self.listener.clone(),
            };
            let handle = inflight.spawn(ctx.deliver(due));
            running.insert(handle.id(), key);
        }
    }

    async fn finished(
        &self,
        res: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
        running: &mut HashMap<tokio::task::Id, (i64, String)>,
    ) {
        let name = self.shared.name;
        match res {
            Ok((tid, outcome)) => {
                running.remove(&tid);
                match outcome {
                    // Pauses and blocks were applied by the delivery itself, as soon
                    // as the CRM answered.
                    Outcome::Done | Outcome::Dead | Outcome::Retry | Outcome::Blocked => {}
                    Outcome::StoreError => {
                        self.pause(self.cfg.poll_interval, "database error".into());
                    }
                }
            }
            Err(e) => {
                // The connector panicked: count an attempt so the job cannot spin.
                let Some((job_id, call_id)) = running.remove(&e.id()) else {
                    return;
                };
                let msg = format!("the {name} connector crashed on this job: {e}");
                tracing::error!(crm = name, job_id, call_id = %call_id, error = %e, "connector task failed");
                let next = now_ms() + ms(self.cfg.backoff(1));
                if let Err(e) = self.store.mark_failed(job_id, &msg, next).await {
                    tracing::error!(crm = name, job_id, error = %e, "cannot record the failure");
                }
                self.shared.lock().1 = Some(msg);
            }
        }
    }

    fn pause(&self, d: Duration, reason: String) {
        self.shared.set_gate(ConnectorState::Paused {
            until_ms: now_ms() + ms(d),
            reason,
        });
    }
}

/// Whole milliseconds, rounded up, plus one: timestamps are truncated to the
/// millisecond, and a CRM's Retry-After must never be undercut.
fn ms(d: Duration) -> i64 {
    (d.as_micros().div_ceil(1000) + 1).min(i64::MAX as u128 / 2) as i64
}

/// Everything one delivery task needs.
struct Delivery {
    store: Store,
    connector: Arc<dyn Connector>,
    limiter: Option<Arc<RateLimiter>>,
    cfg: WorkerConfig,
    shared: Arc<Shared>,
    listener: Option<Arc<dyn DeliveryListener>>,
}

impl Delivery {
    async fn deliver(self, due: DueJob) -> Outcome {
        let name = self.shared.name;
        let stats = &self.shared.stats;
        let job = &due.job;
        let (id, call_id, stage) = (job.id, due.call_id.as_str(), job.stage.as_str());
        let steps = self.store.steps_for(&due);
        let started = Instant::now();
        let res = self.connector.deliver(job, &steps).await;
        stats.deliver_latency.observe(started.elapsed());
        let attempts = job.attempts + 1;
        let (outcome, recorded) = match res {
            Ok(report) => {
                let r = self.store.mark_done(id, &report).await;
                if r.is_ok() {
                    stats.done.fetch_add(1, Ordering::Relaxed);
                    let delay = now_ms().saturating_sub(due.window_start).max(0) as u64;
                    stats.queue_delay.observe(Duration::from_millis(delay));
                    tracing::info!(
                        crm = name,
                        job_id = id,
                        call_id,
                        stage,
                        attempts,
                        "delivered"
                    );
                    if let Some(l) = &self.listener {
                        let queued = Duration::from_millis(delay);
                        let told = l.delivered(self.connector.as_ref(), job, &report, queued);
                        if tokio::time::timeout(LISTENER_TIMEOUT, told).await.is_err() {
                            // Only a cache went unwarmed; the job is done.
                            tracing::debug!(
                                crm = name,
                                job_id = id,
                                call_id,
                                "delivery listener timed out"
                            );
                        }
                    }
                }
                (Outcome::Done, r)
            }
            Err(CrmError::Retryable {
                message,
                retry_after,
            }) => {
                let now = now_ms();
                let age = Duration::from_millis(now.saturating_sub(due.window_start).max(0) as u64);
                self.shared.lock().1 = Some(message.clone());
                if attempts >= self.cfg.max_attempts || age >= self.cfg.max_age {
                    let reason = format!(
                        "gave up after {attempts} attempts over {}: {message}",
                        humantime::format_duration(Duration::from_secs(age.as_secs()))
                    );
                    tracing::error!(crm = name, job_id = id, call_id, stage, error = %reason,
                        "job is dead; `kolokol outbox retry {id}` sends it again");
                    stats.expired.fetch_add(1, Ordering::Relaxed);
                    (Outcome::Dead, self.store.mark_dead(id, &reason).await)
                } else {
                    let delay = self
                        .cfg
                        .backoff(attempts)
                        .max(retry_after.unwrap_or_default());
                    tracing::warn!(crm = name, job_id = id, call_id, stage, attempts, error = %message,
                        retry_in = ?delay, "delivery failed, will retry");
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    if let Some(ra) = retry_after {
                        // The CRM speaks for the whole account: hold every job and
                        // every request, not just this one.
                        self.shared.set_gate(ConnectorState::Paused {
                            until_ms: now + ms(ra),
                            reason: format!("{name} asked to retry after {ra:?}"),
                        });
                        if let Some(l) = &self.limiter {
                            l.pause_for(ra).await;
                        }
                    }
                    let r = self.store.mark_failed(id, &message, now + ms(delay)).await;
                    (Outcome::Retry, r.map(|_| ()))
                }
            }
            Err(CrmError::Rejected { message }) => {
                let reason = format!("rejected by {name}: {message}");
                tracing::error!(crm = name, job_id = id, call_id, stage, error = %reason,
                    "job is dead; fix the cause, then `kolokol outbox retry {id}`");
                self.shared.lock().1 = Some(reason.clone());
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                (Outcome::Dead, self.store.mark_dead(id, &reason).await)
            }
            Err(CrmError::Blocked { message }) => {
                stats.blocked.fetch_add(1, Ordering::Relaxed);
                let next = now_ms() + ms(self.cfg.blocked_pause);
                tracing::error!(
                    crm = name,
                    job_id = id,
                    error = %message,
                    pause = %humantime::format_duration(self.cfg.blocked_pause),
                    "the CRM refused access: deliveries to {name} are paused and its jobs kept; \
                     fix the credentials or the account, deliveries resume automatically"
                );
                {
                    let mut g = self.shared.lock();
                    g.1 = Some(message.clone());
                }
                self.shared.set_gate(ConnectorState::Blocked {
                    until_ms: next,
                    reason: message.clone(),
                });
                let r = self
                    .store
                    .postpone(id, &format!("blocked: {message}"), next)
                    .await;
                (Outcome::Blocked, r)
            }
        };
        match recorded {
            Ok(()) => outcome,
            Err(e) => {
                // The job stays pending and is delivered again (idempotently).
                tracing::error!(crm = name, job_id = id, call_id, stage, error = %e,
                    "cannot record the delivery outcome; the job will be delivered again");
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                Outcome::StoreError
            }
        }
    }
}

/// The workers of every enabled CRM, started and stopped together: what `kolokol run`
/// holds.
pub struct OutboxWorkers {
    workers: Vec<OutboxWorker>,
    housekeeping: tokio::task::JoinHandle<()>,
}

impl OutboxWorkers {
    /// One worker per connector (each with its rate limiter, if any), plus the
    /// housekeeping task (prunes delivered jobs after `keep_done`, expired caches).
    /// Everything stops when `cancel` fires; then [`OutboxWorkers::join`].
    pub fn start(
        store: &Store,
        connectors: Vec<WorkerConnector>,
        storage: &StorageConfig,
        cancel: &CancellationToken,
    ) -> OutboxWorkers {
        Self::start_with_listener(store, connectors, storage, cancel, None)
    }

    /// [`OutboxWorkers::start`], telling `listener` of every delivered job.
    pub fn start_with_listener(
        store: &Store,
        connectors: Vec<WorkerConnector>,
        storage: &StorageConfig,
        cancel: &CancellationToken,
        listener: Option<Arc<dyn DeliveryListener>>,
    ) -> OutboxWorkers {
        let cfg = WorkerConfig::from(storage);
        let workers = connectors
            .into_iter()
            .map(|(c, l)| {
                OutboxWorker::spawn_with_listener(
                    store.clone(),
                    c,
                    l,
                    cfg.clone(),
                    cancel.clone(),
                    listener.clone(),
                )
            })
            .collect();
        let housekeeping = spawn_housekeeping(
            store.clone(),
            storage.keep_done,
            Duration::from_secs(3600),
            cancel.clone(),
        );
        OutboxWorkers {
            workers,
            housekeeping,
        }
    }

    pub fn workers(&self) -> &[OutboxWorker] {
        &self.workers
    }

    /// Every connector's status (for /healthz and systemd STATUS=).
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        self.workers.iter().map(OutboxWorker::status).collect()
    }

    /// Delivery metrics of every worker, Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let refs: Vec<&OutboxWorker> = self.workers.iter().collect();
        render_prometheus(&refs, out);
    }

    /// Wait for every worker to finish its in-flight jobs (after cancellation).
    pub async fn join(self) {
        for w in self.workers {
            w.join().await;
        }
        let _ = self.housekeeping.await;
    }
}

/// Every `every`: delete delivered/dropped jobs older than `keep_done` (the journal
/// keeps their outcome) and expired cache entries.
pub fn spawn_housekeeping(
    store: Store,
    keep_done: Duration,
    every: Duration,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let before = now_ms() - ms(keep_done);
            match store.prune_finished(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "pruned delivered outbox jobs"),
                Err(e) => tracing::warn!(error = %e, "cannot prune the outbox"),
            }
            if let Err(e) = store.cache_purge_expired().await {
                tracing::warn!(error = %e, "cannot purge expired cache entries");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every.max(Duration::from_secs(1))) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let cfg = WorkerConfig {
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            ..WorkerConfig::default()
        };
        for _ in 0..200 {
            let b1 = cfg.backoff(1);
            assert!(
                b1 >= Duration::from_secs(1) && b1 < Duration::from_secs(2),
                "{b1:?}"
            );
            let b3 = cfg.backoff(3);
            assert!(
                b3 >= Duration::from_secs(4) && b3 < Duration::from_secs(8),
                "{b3:?}"
            );
            let b40 = cfg.backoff(40);
            assert!(
                b40 >= Duration::from_secs(30) && b40 < Duration::from_secs(60),
                "{b40:?}"
            );
        }
    }

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(70));
        let mut out = String::new();
        h.render(&mut out, "x", "crm=\"k\"");
        assert!(
            out.contains("x_bucket{crm=\"k\",le=\"0.005\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{crm=\"k\",le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{crm=\"k\",le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("x_count{crm=\"k\"} 2\n"), "{out}");
    }
}
