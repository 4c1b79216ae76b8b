//! The SQLite store on real files: enqueue, ordering, outcomes, journal, tokens,
//! caches, recordings, migrations and open errors.

mod store_support;

use std::collections::HashSet;
use std::time::Duration;

use kolokol::calls::Stage;
use kolokol::crm::{JobSteps, TokenSet, TokenStore};
use kolokol::store::{JobState, ListFilter, StorageConfig, Store, StoreError, now_ms};
use store_support::*;

const FAR: i64 = i64::MAX / 4;

#[tokio::test]
async fn enqueue_is_idempotent_per_connector_call_stage_conversation() {
    let (_d, _cfg, store) = temp_store();
    let ev = event("c1", Stage::ConversationRequested, Some("c1.1"));
    let a = store
        .enqueue_stage(&ev, &["kommo", "bitrix24"])
        .await
        .unwrap();
    let b = store
        .enqueue_stage(&ev, &["kommo", "bitrix24"])
        .await
        .unwrap();
    assert_eq!(a.len(), 2);
    assert_ne!(a[0], a[1]);
    assert_eq!(a, b, "replaying a stage must return the same jobs");
    // another conversation of the same call and stage is a different job
    let other = event("c1", Stage::ConversationRequested, Some("c1.2"));
    let c = store.enqueue_stage(&other, &["kommo"]).await.unwrap();
    assert!(!a.contains(&c[0]));
    let all = store
        .list(ListFilter {
            state: Some(JobState::Pending),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
}

#[tokio::test]
async fn call_ended_writes_the_journal_in_the_same_transaction() {
    let (_d, _cfg, store) = temp_store();
    let ev = event("c9", Stage::CallEnded, None);
    let ids = store.enqueue_stage(&ev, &["kommo"]).await.unwrap();
    let calls = store.calls(None, 10).await.unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].call_id, "c9");
    assert_eq!(calls[0].call_full["client_phone"], "+79161234567");
    assert_eq!(calls[0].crm, serde_json::json!({}));
    // the CRM's answer lands in the journal
    store
        .mark_done(ids[0], &serde_json::json!({"lead_id": 7}))
        .await
        .unwrap();
    let calls = store.calls(None, 10).await.unwrap();
    assert_eq!(
        calls[0].crm["kommo"]["call_ended"],
        serde_json::json!({"state": "done", "report": {"lead_id": 7}})
    );
    // a call with no CRM at all is still journaled
    store
        .enqueue_stage(&event("c10", Stage::CallEnded, None), &[])
        .await
        .unwrap();
    assert_eq!(store.calls(None, 10).await.unwrap().len(), 2);
    // --since filters
    let later = store.calls(Some(now_ms() + 60_000), 10).await.unwrap();
    assert!(later.is_empty());
}

#[tokio::test]
async fn due_jobs_hands_out_one_job_per_call_in_stage_order() {
    let (_d, _cfg, store) = temp_store();
    let mut ids = Vec::new();
    for ev in call_stages("a") {
        ids.push(store.enqueue_stage(&ev, &["kommo"]).await.unwrap()[0]);
    }
    store
        .enqueue_stage(&event("b", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap();
    let due = store.due_jobs("kommo", 10, now_ms()).await.unwrap();
    let got: Vec<(String, Stage)> = due
        .iter()
        .map(|d| (d.call_id.clone(), d.job.stage))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".to_string(), Stage::ConversationRequested),
            ("b".to_string(), Stage::CallEnded)
        ]
    );
    assert!(
        store
            .due_jobs("bitrix24", 10, now_ms())
            .await
            .unwrap()
            .is_empty()
    );

    // a failed first stage holds the rest of its call until it is due again
    store.mark_failed(ids[0], "503", FAR).await.unwrap();
    let due = store.due_jobs("kommo", 10, now_ms()).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].call_id, "b");
    // and the next wake-up is the held head's time, not the waiting jobs' (which are due)
    store
        .mark_done(due[0].job.id, &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(store.next_due_at("kommo").await.unwrap(), Some(FAR));

    // success releases the next stage
    store.retry(ids[0]).await.unwrap();
    let d = store.due_jobs("kommo", 10, now_ms()).await.unwrap();
    assert_eq!(d[0].job.id, ids[0]);
    store
        .mark_done(ids[0], &serde_json::json!({}))
        .await
        .unwrap();
    let d = store.due_jobs("kommo", 10, now_ms()).await.unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].job.id, ids[1]);
    assert_eq!(d[0].job.stage, Stage::ConversationAccepted);
}

#[tokio::test]
async fn dead_jobs_hold_their_call_until_retried_or_dropped() {
    let (_d, _cfg, store) = temp_store();
    let mut ids = Vec::new();
    for ev in call_stages("x") {
        ids.push(store.enqueue_stage(&ev, &["kommo"]).await.unwrap()[0]);
    }
    store
        .mark_dead(ids[0], "rejected: bad phone")
        .await
        .unwrap();
    assert!(
        store
            .due_jobs("kommo", 10, now_ms())
            .await
            .unwrap()
            .is_empty()
    );
    let dead = store
        .list(ListFilter {
            state: Some(JobState::Dead),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("rejected: bad phone"));
    assert_eq!(dead[0].attempts, 1);
    let waiting = store.job(ids[1]).await.unwrap();
    assert_eq!(waiting.waiting_for, Some(ids[0]));
    // the journal shows the dead stage
    let j = store.journal_entry("x").await.unwrap().unwrap();
    assert_eq!(
        j.crm["kommo"]["conversation_requested:x.1"]["state"],
        "dead"
    );

    // retry: fresh attempts, delivered first
    let r = store.retry(ids[0]).await.unwrap();
    assert_eq!((r.state, r.attempts), (JobState::Pending, 0));
    assert_eq!(
        store.due_jobs("kommo", 10, now_ms()).await.unwrap()[0]
            .job
            .id,
        ids[0]
    );
    // drop: the next stage is released, and a replay does not resurrect the job
    store.drop_job(ids[0]).await.unwrap();
    assert_eq!(
        store.due_jobs("kommo", 10, now_ms()).await.unwrap()[0]
            .job
            .id,
        ids[1]
    );
    let again = store
        .enqueue_stage(&call_stages("x")[0], &["kommo"])
        .await
        .unwrap();
    assert_eq!(again[0], ids[0]);
    assert_eq!(store.job(ids[0]).await.unwrap().state, JobState::Dropped);

    // done jobs can be neither retried nor dropped; unknown ids are named
    store
        .mark_done(ids[1], &serde_json::json!({}))
        .await
        .unwrap();
    let e = store.retry(ids[1]).await.unwrap_err();
    assert!(matches!(e, StoreError::WrongState { .. }), "{e}");
    assert!(
        store
            .drop_job(ids[1])
            .await
            .unwrap_err()
            .to_string()
            .contains("already delivered")
    );
    let e = store.retry(99_999).await.unwrap_err();
    assert_eq!(e.to_string(), "no outbox job with id 99999");
}

#[tokio::test]
async fn marks_do_not_resurrect_dropped_jobs() {
    let (_d, _cfg, store) = temp_store();
    let id = store
        .enqueue_stage(&event("d", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    store.drop_job(id).await.unwrap();
    // a delivery that was in flight finishes after the admin dropped the job
    store.mark_done(id, &serde_json::json!({})).await.unwrap();
    store.mark_failed(id, "x", 0).await.unwrap();
    store.mark_dead(id, "x").await.unwrap();
    assert_eq!(store.job(id).await.unwrap().state, JobState::Dropped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_from_many_tasks_all_land_once() {
    let (_d, _cfg, store) = temp_store();
    let mut tasks = Vec::new();
    for t in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for c in 0..10 {
                for ev in call_stages(&format!("t{t}c{c}")) {
                    ids.extend(
                        store
                            .enqueue_stage(&ev, &["kommo", "bitrix24"])
                            .await
                            .unwrap(),
                    );
                }
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 40 * 10 * 4 * 2);
    assert_eq!(unique.len(), all.len());
    let depth = store.depth().await.unwrap();
    assert_eq!(depth.pending, 3200);
    assert_eq!(depth.by_connector["kommo"], (1600, 0));
    assert!(depth.oldest_age(now_ms()).is_some());
    assert_eq!(store.calls(None, 10_000).await.unwrap().len(), 400);
}

#[tokio::test]
async fn job_steps_survive_reopening() {
    let (_d, cfg, store) = temp_store();
    let id = store
        .enqueue_stage(&event("s", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    let steps = store.job_steps(id).await.unwrap();
    assert_eq!(steps.get("create"), None);
    steps
        .put("create", &serde_json::json!({"lead": 1}))
        .unwrap();
    assert_eq!(steps.get("create"), Some(serde_json::json!({"lead": 1})));
    drop(steps);
    drop(store);
    let store = Store::open(&cfg).unwrap();
    let steps = store.job_steps(id).await.unwrap();
    assert_eq!(steps.get("create"), Some(serde_json::json!({"lead": 1})));
    assert_eq!(steps.get("note"), None);
}

#[test]
fn tokens_are_durable_outside_any_runtime() {
    let (_d, cfg, store) = temp_store();
    assert_eq!(TokenStore::get(&store, "kommo"), None);
    let t = TokenSet {
        access_token: "a1".into(),
        refresh_token: "r1".into(),
        expires_at: 1_900_000_000,
    };
    store.put("kommo", &t).unwrap();
    let t2 = TokenSet {
        refresh_token: "r2".into(),
        ..t.clone()
    };
    store.put("kommo", &t2).unwrap();
    drop(store);
    let store = Store::open(&cfg).unwrap();
    assert_eq!(TokenStore::get(&store, "kommo"), Some(t2));
    assert_eq!(TokenStore::get(&store, "bitrix24"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_steps_work_from_the_daemon_runtime() {
    // On the multi-thread runtime the blocking wait goes through block_in_place.
    let (_d, _cfg, store) = temp_store();
    let s = store.clone();
    tokio::spawn(async move {
        let t = TokenSet {
            access_token: "a".into(),
            refresh_token: "r".into(),
            expires_at: 1,
        };
        s.put("bitrix24", &t).unwrap();
        assert_eq!(TokenStore::get(&s, "bitrix24"), Some(t));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn caches_expire() {
    let (_d, _cfg, store) = temp_store();
    let v = serde_json::json!({"extension": "101", "name": "ООО Ромашка"});
    store
        .cache_put(
            "responsible:kommo",
            "9161234567",
            &v,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    store
        .cache_put("responsible:kommo", "9160000000", &v, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        store
            .cache_get("responsible:kommo", "9161234567")
            .await
            .unwrap(),
        Some(v)
    );
    assert_eq!(
        store
            .cache_get("responsible:kommo", "9160000000")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .cache_get("responsible:bitrix24", "9161234567")
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.cache_purge_expired().await.unwrap(), 1);
}

#[tokio::test]
async fn recordings_catalog() {
    let (_d, _cfg, store) = temp_store();
    let p = std::path::Path::new("/var/spool/asterisk/monitor/2026/11/22/x.wav");
    store.recording_put("tok123", p, Some("c1")).await.unwrap();
    assert_eq!(
        store.recording_get("tok123").await.unwrap().as_deref(),
        Some(p)
    );
    assert_eq!(store.recording_get("nope").await.unwrap(), None);
}

#[tokio::test]
async fn prune_removes_only_finished_jobs() {
    let (_d, _cfg, store) = temp_store();
    let a = store
        .enqueue_stage(&event("p1", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    let b = store
        .enqueue_stage(&event("p2", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    store.mark_done(a, &serde_json::json!({})).await.unwrap();
    store
        .job_steps(a)
        .await
        .unwrap()
        .put("create", &serde_json::json!(1))
        .unwrap();
    assert_eq!(store.prune_finished(now_ms() + 1).await.unwrap(), 1);
    assert!(matches!(store.job(a).await, Err(StoreError::NoSuchJob(_))));
    assert_eq!(store.job(b).await.unwrap().state, JobState::Pending);
    // the journal keeps the outcome
    assert_eq!(
        store.journal_entry("p1").await.unwrap().unwrap().crm["kommo"]["call_ended"]["state"],
        "done"
    );
}

#[test]
fn database_is_wal_and_versioned() {
    let (_d, cfg, store) = temp_store();
    drop(store);
    let conn = rusqlite::Connection::open(cfg.db_path()).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(v >= 1);
    // reopening an up-to-date database changes nothing
    drop(conn);
    Store::open(&cfg).unwrap();
    // a database from a newer kolokol is refused, not guessed at
    let conn = rusqlite::Connection::open(cfg.db_path()).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let e = Store::open(&cfg).unwrap_err();
    assert!(matches!(e, StoreError::TooNew { found: 999, .. }), "{e}");
    assert!(e.to_string().contains("newer kolokol"), "{e}");
}

#[test]
fn open_errors_say_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let cfg = StorageConfig {
        state_dir: file.join("state"),
        ..Default::default()
    };
    let e = Store::open(&cfg).unwrap_err().to_string();
    assert!(e.starts_with("cannot create state dir "), "{e}");
    assert!(
        e.contains("check [storage] state_dir and the service user"),
        "{e}"
    );

    let cfg = StorageConfig {
        state_dir: dir.path().join("empty"),
        ..Default::default()
    };
    let e = Store::open_existing(&cfg).unwrap_err().to_string();
    assert!(e.starts_with("no database at "), "{e}");

    // a file that is not a database
    let cfg = StorageConfig {
        state_dir: dir.path().join("junk"),
        ..Default::default()
    };
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    std::fs::write(cfg.db_path(), vec![b'z'; 8192]).unwrap();
    let e = Store::open(&cfg).unwrap_err().to_string();
    assert!(e.starts_with("cannot open database "), "{e}");
}

#[tokio::test]
async fn health_check_writes() {
    let (_d, _cfg, store) = temp_store();
    store.check_writable().await.unwrap();
    assert_eq!(store.queued_ops(), 0);
}
