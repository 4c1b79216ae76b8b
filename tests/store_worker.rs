//! The outbox worker against a CRM stand-in, on real SQLite files: exactly-once
//! across a crash, per-call order, retries honouring Retry-After, dead letters, blocks,
//! graceful shutdown.

mod store_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kolokol::calls::Stage;
use kolokol::crm::Connector;
use kolokol::crm::rate_limit::RateLimiter;
use kolokol::daemon::outbox_worker::{
    ConnectorState, OutboxWorker, WorkerConfig, render_prometheus,
};
use kolokol::store::{JobState, ListFilter, Store, now_ms};
use std::sync::atomic::Ordering;
use store_support::*;
use tokio_util::sync::CancellationToken;

fn fast() -> WorkerConfig {
    WorkerConfig {
        max_attempts: 5,
        max_age: Duration::from_secs(3600),
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        blocked_pause: Duration::from_millis(400),
        concurrency: 4,
        poll_interval: Duration::from_millis(50),
    }
}

fn spawn(
    store: &Store,
    crm: &Arc<TestCrm>,
    cfg: WorkerConfig,
) -> (OutboxWorker, CancellationToken) {
    let cancel = CancellationToken::new();
    let conn: Arc<dyn Connector> = crm.clone();
    let w = OutboxWorker::spawn(store.clone(), conn, None, cfg, cancel.clone());
    (w, cancel)
}

async fn wait_drained(store: &Store, limit: Duration) {
    let start = Instant::now();
    loop {
        let d = store.depth().await.unwrap();
        if d.pending == 0 {
            return;
        }
        assert!(start.elapsed() < limit, "outbox not drained: {d:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_a_crash_mid_delivery() {
    let (_d, cfg, store) = temp_store();
    store
        .enqueue_stage(&event("crash", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap();
    let crm = TestCrm::new("kommo");
    crm.script("crash", vec![Answer::HangAfterCreate]);

    // "Process 1": the delivery creates the entity, then the process dies before the
    // outcome is recorded (the future is dropped, the store closed).
    {
        let due = store.due_jobs("kommo", 10, now_ms()).await.unwrap();
        assert_eq!(due.len(), 1);
        let steps = store.job_steps(due[0].job.id).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), crm.deliver(&due[0].job, &steps))
            .await;
        assert!(r.is_err(), "the delivery must hang after its first step");
    }
    drop(store);

    // "Process 2": reopen the file; the job is still pending and is redelivered; the
    // entity is not created again.
    let store = Store::open(&cfg).unwrap();
    let (w, cancel) = spawn(&store, &crm, fast());
    wait_drained(&store, WAIT).await;
    cancel.cancel();
    w.join().await;

    let st = crm.state.lock().unwrap();
    assert_eq!(st.seen.len(), 2, "delivered twice (once interrupted)");
    assert_eq!(
        st.created.get("crash|call_ended|"),
        Some(&1),
        "entity created once"
    );
    assert_eq!(
        st.notes.get("crash|call_ended|"),
        Some(&1),
        "note added once"
    );
    drop(st);
    let jobs = store
        .list(ListFilter {
            state: Some(JobState::Done),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let j = store.journal_entry("crash").await.unwrap().unwrap();
    assert_eq!(
        j.crm["kommo"]["call_ended"]["report"]["entity"]["entity_id"],
        1000 + jobs[0].id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_reach_the_crm_in_order_per_call_with_concurrency() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::with_delay("kommo", Duration::from_millis(2));
    // some calls fail now and then, which must not reorder them
    for c in (0..30).step_by(3) {
        crm.script(
            &format!("call{c}"),
            vec![Answer::Retry(None), Answer::Ok, Answer::Retry(None)],
        );
    }
    let (w, cancel) = spawn(&store, &crm, fast());
    // enqueue from many tasks while the worker runs
    let mut tasks = Vec::new();
    for c in 0..30 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for ev in call_stages(&format!("call{c}")) {
                store.enqueue_stage(&ev, &["kommo"]).await.unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_drained(&store, WAIT).await;
    cancel.cancel();
    w.join().await;

    let st = crm.state.lock().unwrap();
    assert!(
        !st.overlap,
        "two jobs of one call were delivered at the same time"
    );
    assert_eq!(st.notes.len(), 120);
    assert!(
        st.notes.values().all(|n| *n == 1),
        "a stage was registered twice"
    );
    assert!(
        st.created.values().all(|n| *n == 1),
        "an entity was created twice"
    );
    drop(st);
    for c in 0..30 {
        let call = format!("call{c}");
        let got: Vec<Stage> = crm
            .delivered_stages(&call)
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(
            got,
            vec![
                Stage::ConversationRequested,
                Stage::ConversationAccepted,
                Stage::ConversationEnded,
                Stage::CallEnded
            ],
            "{call}"
        );
    }
    // and ordering held across the retries: no job of a call was attempted before the
    // previous one was done
    let seen = crm.seen();
    for c in (0..30).step_by(3) {
        let call = format!("call{c}");
        let stages: Vec<Stage> = seen
            .iter()
            .filter(|s| s.call_id == call)
            .map(|s| s.stage)
            .collect();
        let mut sorted = stages.clone();
        sorted.sort_by_key(|s| *s as u8);
        assert_eq!(stages, sorted, "{call}: {stages:?}");
        assert_eq!(stages.len(), 6, "{call}: two retries + four deliveries");
    }
    assert_eq!(w_done(&store).await, 120);
}

async fn w_done(store: &Store) -> usize {
    store
        .list(ListFilter {
            state: Some(JobState::Done),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_pauses_the_whole_connector() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("bitrix24");
    let ra = Duration::from_millis(300);
    crm.script(
        "slow",
        vec![Answer::Retry(Some(ra)), Answer::Retry(Some(ra))],
    );
    let limiter = Arc::new(RateLimiter::new(1000.0, 10));
    let cancel = CancellationToken::new();
    let conn: Arc<dyn Connector> = crm.clone();
    let w = OutboxWorker::spawn(
        store.clone(),
        conn,
        Some(limiter.clone()),
        fast(),
        cancel.clone(),
    );
    store
        .enqueue_stage(&event("slow", Stage::CallEnded, None), &["bitrix24"])
        .await
        .unwrap();
    // wait for the first 429, then enqueue another call: it must wait for the pause too
    assert!(
        eventually(WAIT, || matches!(
            w.status().state,
            ConnectorState::Paused { .. }
        ))
        .await
    );
    let status = w.status();
    assert!(
        matches!(status.state, ConnectorState::Paused { .. }),
        "{status:?}"
    );
    assert_eq!(
        status.last_error.as_deref(),
        Some("503 Service Unavailable")
    );
    store
        .enqueue_stage(&event("other", Stage::CallEnded, None), &["bitrix24"])
        .await
        .unwrap();
    // the shared rate limiter is paused as well
    let t = Instant::now();
    limiter.acquire().await;
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "limiter not paused"
    );
    wait_drained(&store, WAIT).await;
    cancel.cancel();
    w.join().await;

    let seen = crm.seen();
    let slow: Vec<_> = seen.iter().filter(|s| s.call_id == "slow").collect();
    assert_eq!(slow.len(), 3);
    assert_eq!(
        slow.iter().map(|s| s.attempts).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for pair in slow.windows(2) {
        assert!(pair[1].at - pair[0].at >= ra, "retried before Retry-After");
    }
    let other = seen.iter().find(|s| s.call_id == "other").unwrap();
    assert!(
        other.at - slow[0].at >= ra,
        "another job went out during the pause"
    );
    let job = store
        .list(ListFilter {
            state: Some(JobState::Done),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(job.iter().any(|j| j.call_id == "slow" && j.attempts == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_job_is_dead_holds_its_call_and_can_be_retried() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script("bad", vec![Answer::Reject("phone is invalid")]);
    let (w, cancel) = spawn(&store, &crm, fast());
    for ev in call_stages("bad").into_iter().chain(call_stages("good")) {
        store.enqueue_stage(&ev, &["kommo"]).await.unwrap();
    }
    // the good call goes through; the bad one stops at its first stage
    assert!(
        eventually(WAIT, || crm.delivered_stages("good").len() == 4).await,
        "good call not delivered"
    );
    let dead = store
        .list(ListFilter {
            state: Some(JobState::Dead),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].call_id, "bad");
    assert_eq!(dead[0].stage, "conversation_requested");
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("rejected by kommo: 400 Bad Request: phone is invalid")
    );
    let waiting = store
        .list(ListFilter {
            state: Some(JobState::Pending),
            call_id: Some("bad".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(waiting.len(), 3);
    assert!(
        waiting
            .iter()
            .all(|j| j.waiting_for.is_some() && j.attempts == 0)
    );
    assert_eq!(crm.seen().iter().filter(|s| s.call_id == "bad").count(), 1);
    assert_eq!(w.stats().rejected.load(Ordering::Relaxed), 1);

    // the admin fixed it: retry → the whole call goes out, in order (the worker is
    // woken by the retry, no restart needed)
    store.retry(dead[0].id).await.unwrap();
    wait_drained(&store, WAIT).await;
    assert_eq!(crm.delivered_stages("bad").len(), 4);
    cancel.cancel();
    w.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_attempts_is_dead_then_retry_delivers() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script("down", vec![Answer::Retry(None); 3]);
    let cfg = WorkerConfig {
        max_attempts: 3,
        ..fast()
    };
    let (w, cancel) = spawn(&store, &crm, cfg);
    let id = store
        .enqueue_stage(&event("down", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    assert!(
        eventually(WAIT, || crm.seen().len() == 3).await,
        "expected three attempts"
    );
    assert!(
        eventually_async(|| async { store.job(id).await.unwrap().state == JobState::Dead }).await
    );
    let j = store.job(id).await.unwrap();
    assert_eq!(j.attempts, 3);
    assert!(
        j.last_error
            .as_deref()
            .unwrap_or("")
            .starts_with("gave up after 3 attempts"),
        "{j:?}"
    );
    assert_eq!(w.stats().expired.load(Ordering::Relaxed), 1);
    assert_eq!(w.stats().retried.load(Ordering::Relaxed), 2);
    // backoff grew: the gaps between attempts are at least half of 20 ms, 40 ms
    let seen = crm.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(10));
    assert!(seen[2].at - seen[1].at >= Duration::from_millis(20));

    store.retry(id).await.unwrap();
    wait_drained(&store, WAIT).await;
    assert_eq!(store.job(id).await.unwrap().state, JobState::Done);
    cancel.cancel();
    w.join().await;
}

async fn eventually_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_limit_kills_a_job() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script("old", vec![Answer::Retry(None); 100]);
    let cfg = WorkerConfig {
        max_age: Duration::from_millis(150),
        max_attempts: 1000,
        ..fast()
    };
    let (w, cancel) = spawn(&store, &crm, cfg);
    let id = store
        .enqueue_stage(&event("old", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    assert!(
        eventually_async(|| async { store.job(id).await.unwrap().state == JobState::Dead }).await
    );
    let j = store.job(id).await.unwrap();
    assert!(j.attempts >= 2, "{j:?}");
    assert!(j.last_error.unwrap().starts_with("gave up after"));
    cancel.cancel();
    w.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_crm_stops_the_connector_keeps_jobs_and_resumes() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script_all(vec![Answer::Block]);
    // one at a time, so that exactly one delivery meets the block
    let (w, cancel) = spawn(
        &store,
        &crm,
        WorkerConfig {
            concurrency: 1,
            ..fast()
        },
    );
    for c in ["b1", "b2", "b3"] {
        store
            .enqueue_stage(&event(c, Stage::CallEnded, None), &["kommo"])
            .await
            .unwrap();
    }
    assert!(eventually(WAIT, || !crm.seen().is_empty()).await);
    let blocked_at = crm.seen()[0].at;
    assert!(
        eventually(WAIT, || matches!(
            w.status().state,
            ConnectorState::Blocked { .. }
        ))
        .await
    );
    let st = w.status();
    match &st.state {
        ConnectorState::Blocked { reason, .. } => assert!(reason.contains("403"), "{reason}"),
        s => panic!("expected blocked, got {s:?}"),
    }
    // nothing was counted against the job, nothing is dead
    let pending = store
        .list(ListFilter {
            state: Some(JobState::Pending),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), 3);
    assert!(pending.iter().all(|j| j.attempts == 0));
    let mut metrics = String::new();
    render_prometheus(&[&w], &mut metrics);
    assert!(
        metrics.contains("kolokol_crm_blocked{crm=\"kommo\"} 1"),
        "{metrics}"
    );

    wait_drained(&store, WAIT).await;
    let seen = crm.seen();
    assert_eq!(seen.len(), 4, "one blocked attempt, then three deliveries");
    assert!(
        seen[1..]
            .iter()
            .all(|s| s.at - blocked_at >= Duration::from_millis(400))
    );
    assert_eq!(w.status().state, ConnectorState::Running);
    cancel.cancel();
    w.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_retries_blocked_jobs_at_once() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script_all(vec![Answer::Block]);
    let cfg = WorkerConfig {
        blocked_pause: Duration::from_secs(3600),
        ..fast()
    };
    let (w, cancel) = spawn(&store, &crm, cfg.clone());
    let id = store
        .enqueue_stage(&event("r", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    assert!(
        eventually(WAIT, || matches!(
            w.status().state,
            ConnectorState::Blocked { .. }
        ))
        .await
    );
    cancel.cancel();
    w.join().await;
    assert!(store.job(id).await.unwrap().next_attempt_at > now_ms() + 3_000_000);
    // the admin fixed the account and restarted the daemon
    let (w, cancel) = spawn(&store, &crm, cfg);
    wait_drained(&store, WAIT).await;
    assert_eq!(crm.seen().len(), 2);
    cancel.cancel();
    w.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_in_flight_job() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script("long", vec![Answer::Slow(Duration::from_millis(300))]);
    let (w, cancel) = spawn(&store, &crm, fast());
    let id = store
        .enqueue_stage(&event("long", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    assert!(eventually(WAIT, || !crm.seen().is_empty()).await);
    assert_eq!(w.status().in_flight, 1);
    cancel.cancel();
    // a job enqueued after the stop is not taken
    store
        .enqueue_stage(&event("late", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap();
    w.join().await;
    assert_eq!(store.job(id).await.unwrap().state, JobState::Done);
    assert_eq!(crm.seen().len(), 1);
    assert_eq!(store.depth().await.unwrap().pending, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connector_costs_an_attempt_not_a_spin() {
    let (_d, _cfg, store) = temp_store();
    let crm = TestCrm::new("kommo");
    crm.script("p", vec![Answer::Panic]);
    let (w, cancel) = spawn(&store, &crm, fast());
    let id = store
        .enqueue_stage(&event("p", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    wait_drained(&store, WAIT).await;
    let j = store.job(id).await.unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Done, 2));
    assert_eq!(crm.seen().len(), 2);
    cancel.cancel();
    w.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_deliver_independently_and_report_metrics() {
    let (_d, _cfg, store) = temp_store();
    let kommo = TestCrm::new("kommo");
    let b24 = TestCrm::new("bitrix24");
    b24.script_all(vec![Answer::Block]);
    let cfg = WorkerConfig {
        blocked_pause: Duration::from_secs(3600),
        ..fast()
    };
    let (wk, ck) = spawn(&store, &kommo, cfg.clone());
    let (wb, cb) = spawn(
        &store,
        &b24,
        WorkerConfig {
            concurrency: 1,
            ..cfg
        },
    );
    for c in 0..5 {
        for ev in call_stages(&format!("m{c}")) {
            store
                .enqueue_stage(&ev, &["kommo", "bitrix24"])
                .await
                .unwrap();
        }
    }
    // kommo delivers everything although bitrix24 is blocked
    assert!(
        eventually_async(|| async {
            store
                .depth()
                .await
                .unwrap()
                .by_connector
                .get("kommo")
                .is_none()
        })
        .await
    );
    let d = store.depth().await.unwrap();
    assert_eq!(d.by_connector["bitrix24"], (20, 0));
    // counters move right after the outcome is committed
    assert!(eventually(WAIT, || wk.stats().done.load(Ordering::Relaxed) == 20).await);
    assert!(eventually(WAIT, || wb.stats().blocked.load(Ordering::Relaxed) == 1).await);
    let mut m = String::new();
    render_prometheus(&[&wk, &wb], &mut m);
    assert!(
        m.contains("kolokol_crm_deliveries_total{crm=\"kommo\",result=\"done\"} 20"),
        "{m}"
    );
    assert!(
        m.contains("kolokol_crm_deliveries_total{crm=\"bitrix24\",result=\"blocked\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("kolokol_crm_delivery_seconds_count{crm=\"kommo\"} 20"),
        "{m}"
    );
    assert!(
        m.contains("kolokol_outbox_delay_seconds_bucket{crm=\"kommo\",le=\"+Inf\"} 20"),
        "{m}"
    );
    ck.cancel();
    cb.cancel();
    wk.join().await;
    wb.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_set_from_config_delivers_reports_and_prunes() {
    use kolokol::daemon::outbox_worker::{OutboxWorkers, spawn_housekeeping};
    use kolokol::store::StorageConfig;
    let (_d, cfg, store) = temp_store();
    let storage = StorageConfig {
        retry_min: Duration::from_millis(20),
        poll_interval: Duration::from_millis(50),
        ..cfg
    };
    let kommo = TestCrm::new("kommo");
    let b24 = TestCrm::new("bitrix24");
    b24.script("w0", vec![Answer::Reject("no such user")]);
    let cancel = CancellationToken::new();
    let k: Arc<dyn Connector> = kommo.clone();
    let b: Arc<dyn Connector> = b24.clone();
    let set = OutboxWorkers::start(&store, vec![(k, None), (b, None)], &storage, &cancel);
    let mut first = 0;
    for c in 0..3 {
        let ids = store
            .enqueue_stage(
                &event(&format!("w{c}"), Stage::CallEnded, None),
                &["kommo", "bitrix24"],
            )
            .await
            .unwrap();
        if c == 0 {
            first = ids[0];
        }
    }
    wait_drained(&store, WAIT).await;
    let st = set.statuses();
    assert_eq!(st.len(), 2);
    assert!(
        st.iter().all(|s| s.state == ConnectorState::Running),
        "{st:?}"
    );
    assert!(
        eventually(WAIT, || set.workers()[0]
            .stats()
            .done
            .load(Ordering::Relaxed)
            == 3)
        .await
    );
    let mut m = String::new();
    set.render_prometheus(&mut m);
    assert!(
        m.contains("kolokol_crm_deliveries_total{crm=\"bitrix24\",result=\"rejected\"} 1"),
        "{m}"
    );
    store
        .depth()
        .await
        .unwrap()
        .render_prometheus(now_ms(), &mut m);
    assert!(
        m.contains("kolokol_outbox_jobs{crm=\"bitrix24\",state=\"dead\"} 1"),
        "{m}"
    );
    assert!(m.contains("kolokol_outbox_oldest_age_seconds 0"), "{m}");
    cancel.cancel();
    set.join().await;

    // housekeeping deletes delivered jobs past keep_done, keeps the dead one
    let hk = spawn_housekeeping(
        store.clone(),
        Duration::ZERO,
        Duration::from_secs(60),
        CancellationToken::new(),
    );
    assert!(eventually_async(|| async { store.job(first).await.is_err() }).await);
    hk.abort();
    let left = store
        .list(ListFilter {
            state: None,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].state, JobState::Dead);
}
