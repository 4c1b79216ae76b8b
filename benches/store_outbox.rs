//! Outbox throughput and latency on a real SQLite file.
//!
//! `cargo bench --bench store_outbox` (set BENCH_DIR to put the database on another disk).
//! 1. burst: 10,000 calls x 4 stages x 2 CRMs enqueued from 64 tasks (group commit);
//! 2. serial: 2,000 single enqueues one after the other (one commit each);
//! 3. pipeline: 10,000 calls enqueued from 16 tasks while two workers deliver to
//!    zero-latency CRMs that record one step per job: jobs/s until all delivered;
//! 4. paced: 1,000 calls at 50 calls/s: the delay from the `call_ended` enqueue being
//!    acknowledged to the CRM receiving it (p50/p99);
//! for synchronous = full and normal. Prints peak RSS and CPU seconds at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kolokol::calls::{CallFull, Stage, StageEvent};
use kolokol::crm::{BoxFuture, Connector, CrmError, DeliveryReport, Job, JobSteps, Responsible};
use kolokol::daemon::outbox_worker::{OutboxWorker, WorkerConfig};
use kolokol::store::{StorageConfig, Store, Synchronous};
use tokio_util::sync::CancellationToken;

const CALLS: usize = 10_000;

fn stages(call: &str) -> Vec<StageEvent> {
    let conv = format!("{call}.1");
    let full = CallFull {
        id: call.to_string(),
        client_phone: "+79161234567".into(),
        line_number: "74950000000".into(),
        answered_by: "101".into(),
        result: 200,
        duration: 42,
        talk_duration: 30,
        ..Default::default()
    };
    [
        (Stage::ConversationRequested, Some(conv.clone())),
        (Stage::ConversationAccepted, Some(conv.clone())),
        (Stage::ConversationEnded, Some(conv)),
        (Stage::CallEnded, None),
    ]
    .into_iter()
    .map(|(stage, conversation_id)| StageEvent {
        stage,
        conversation_id,
        call_full: full.clone(),
    })
    .collect()
}

struct Sink {
    name: &'static str,
    seen: Mutex<HashMap<String, Instant>>,
    jobs: AtomicU64,
}

impl Connector for Sink {
    fn name(&self) -> &'static str {
        self.name
    }
    fn wants(&self, _: Stage) -> bool {
        true
    }
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        steps: &'a dyn JobSteps,
    ) -> BoxFuture<'a, Result<DeliveryReport, CrmError>> {
        Box::pin(async move {
            if job.stage == Stage::CallEnded {
                if let Ok(mut m) = self.seen.lock() {
                    m.insert(job.call_full.id.clone(), Instant::now());
                }
            }
            if steps.get("create").is_none() {
                steps
                    .put("create", &serde_json::json!({"id": job.id}))
                    .map_err(|message| CrmError::Retryable {
                        message,
                        retry_after: None,
                    })?;
            }
            self.jobs.fetch_add(1, Ordering::Relaxed);
            Ok(serde_json::json!({"ok": true}))
        })
    }
    fn find_responsible<'a>(
        &'a self,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmError>> {
        Box::pin(async { Ok(None) })
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn open(base: &std::path::Path, name: &str, sync: Synchronous) -> (StorageConfig, Store) {
    let cfg = StorageConfig {
        state_dir: base.join(name),
        synchronous: sync,
        poll_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let store = Store::open(&cfg).expect("open");
    (cfg, store)
}

async fn burst(base: &std::path::Path, sync: Synchronous) {
    let (_cfg, store) = open(base, &format!("burst-{sync:?}"), sync);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (t..CALLS).step_by(64) {
                for ev in stages(&format!("b{i}")) {
                    let s = Instant::now();
                    store
                        .enqueue_stage(&ev, &["kommo", "bitrix24"])
                        .await
                        .expect("enqueue");
                    lat.push(s.elapsed());
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let el = start.elapsed();
    let n = lat.len();
    println!(
        "burst    sync={:<6} {n} stage events ({} jobs) in {:.2}s = {:.0} stages/s; enqueue p50 {:.2?} p99 {:.2?}",
        format!("{sync:?}"),
        n * 2,
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
}

async fn serial(base: &std::path::Path, sync: Synchronous) {
    let (_cfg, store) = open(base, &format!("serial-{sync:?}"), sync);
    let mut lat = Vec::new();
    let start = Instant::now();
    for i in 0..500 {
        for ev in stages(&format!("s{i}")) {
            let s = Instant::now();
            store.enqueue_stage(&ev, &["kommo"]).await.expect("enqueue");
            lat.push(s.elapsed());
        }
    }
    let el = start.elapsed();
    println!(
        "serial   sync={:<6} {} single enqueues in {:.2}s = {:.0}/s; p50 {:.2?} p99 {:.2?}",
        format!("{sync:?}"),
        lat.len(),
        el.as_secs_f64(),
        lat.len() as f64 / el.as_secs_f64(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
}

/// Workers for two zero-latency CRMs on `store`.
fn sinks_and_workers(
    store: &Store,
    cfg: &StorageConfig,
    cancel: &CancellationToken,
) -> (Vec<Arc<Sink>>, Vec<OutboxWorker>) {
    let sinks: Vec<Arc<Sink>> = ["kommo", "bitrix24"]
        .into_iter()
        .map(|name| {
            Arc::new(Sink {
                name,
                seen: Mutex::new(HashMap::new()),
                jobs: AtomicU64::new(0),
            })
        })
        .collect();
    let workers = sinks
        .iter()
        .map(|s| {
            let c: Arc<dyn Connector> = s.clone();
            OutboxWorker::spawn(
                store.clone(),
                c,
                None,
                WorkerConfig::from(cfg),
                cancel.clone(),
            )
        })
        .collect();
    (sinks, workers)
}

async fn wait_jobs(sinks: &[Arc<Sink>], total: u64) {
    while sinks
        .iter()
        .map(|s| s.jobs.load(Ordering::Relaxed))
        .sum::<u64>()
        < total
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delays(sinks: &[Arc<Sink>], ended: &HashMap<String, Instant>) -> Vec<Duration> {
    let mut out = Vec::new();
    for s in sinks {
        if let Ok(seen) = s.seen.lock() {
            for (call, at) in seen.iter() {
                if let Some(e) = ended.get(call) {
                    out.push(at.saturating_duration_since(*e));
                }
            }
        }
    }
    out
}

/// Saturation: 10,000 calls enqueued as fast as 16 tasks can while the workers drain.
async fn pipeline(base: &std::path::Path, sync: Synchronous) {
    let (cfg, store) = open(base, &format!("pipe-{sync:?}"), sync);
    let cancel = CancellationToken::new();
    let (sinks, workers) = sinks_and_workers(&store, &cfg, &cancel);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..CALLS).step_by(16) {
                for ev in stages(&format!("p{i}")) {
                    store
                        .enqueue_stage(&ev, &["kommo", "bitrix24"])
                        .await
                        .expect("enqueue");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let enq = start.elapsed();
    let jobs = CALLS * 4 * 2;
    wait_jobs(&sinks, jobs as u64).await;
    let el = start.elapsed();
    cancel.cancel();
    for w in workers {
        w.join().await;
    }
    println!(
        "pipeline sync={:<6} {CALLS} calls = {jobs} jobs enqueued in {:.2}s, all delivered after {:.2}s = {:.0} jobs/s ({:.0} calls/s)",
        format!("{sync:?}"),
        enq.as_secs_f64(),
        el.as_secs_f64(),
        jobs as f64 / el.as_secs_f64(),
        CALLS as f64 / el.as_secs_f64(),
    );
    let size = std::fs::metadata(cfg.db_path())
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "         database {} MB after {jobs} jobs",
        size / 1_000_000
    );
}

/// Latency at a steady 50 calls/s (far above a busy office's peak): from the
/// acknowledged `call_ended` enqueue to the CRM receiving it.
async fn paced(base: &std::path::Path, sync: Synchronous) {
    let (cfg, store) = open(base, &format!("paced-{sync:?}"), sync);
    let cancel = CancellationToken::new();
    let (sinks, workers) = sinks_and_workers(&store, &cfg, &cancel);
    let calls = 1_000;
    let mut ended = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..calls {
        tick.tick().await;
        let call = format!("q{i}");
        for ev in stages(&call) {
            store
                .enqueue_stage(&ev, &["kommo", "bitrix24"])
                .await
                .expect("enqueue");
        }
        ended.insert(call, Instant::now());
    }
    wait_jobs(&sinks, (calls * 8) as u64).await;
    cancel.cancel();
    for w in workers {
        w.join().await;
    }
    let mut d = delays(&sinks, &ended);
    println!(
        "paced    sync={:<6} {calls} calls at 50/s: call_ended enqueued -> CRM p50 {:.2?} p99 {:.2?} max {:.2?}",
        format!("{sync:?}"),
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        pct(&mut d, 1.0)
    );
}

fn usage() -> (f64, f64) {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    (ru.ru_maxrss as f64 / 1024.0, cpu)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let base_parent = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let base = tempfile::tempdir_in(&base_parent).expect("temp dir");
    println!("database under {}", base_parent.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for sync in [Synchronous::Full, Synchronous::Normal] {
            burst(base.path(), sync).await;
            serial(base.path(), sync).await;
            pipeline(base.path(), sync).await;
            paced(base.path(), sync).await;
        }
    });
    let (rss, cpu) = usage();
    println!("peak RSS {rss:.1} MB, CPU {cpu:.1} s (whole run)");
}
