//! kill -9 of a real process in the middle of writing the outbox: every stage the
//! process acknowledged is in the database after the crash, the file is intact, and
//! replaying the same stages after the restart adds nothing.
//!
//! The writing process is this test binary re-executed with `KOLOKOL_STORE_CRASH_CHILD`
//! set (running only `child_process_helper_for_kill9`), so that it runs the real `Store`
//! code in its own process, which the test can SIGKILL.

mod store_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use kolokol::store::{StorageConfig, Store};
use store_support::*;

const CHILD_ENV: &str = "KOLOKOL_STORE_CRASH_CHILD";
const TASKS: usize = 8;

/// Not a test on its own: the body of the child process of
/// `kill9_during_enqueue_loses_no_acknowledged_stage`. Without the variable it returns.
#[test]
fn child_process_helper_for_kill9() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cfg = StorageConfig {
            state_dir: dir.into(),
            ..Default::default()
        };
        let store = Store::open(&cfg).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for t in 0..TASKS {
            let (store, tx) = (store.clone(), tx.clone());
            tokio::spawn(async move {
                // Always from the start: the first calls replay what an earlier run
                // (killed) already wrote, as the tracker's resync would.
                for i in 0.. {
                    let call = format!("t{t}-c{i}");
                    for ev in call_stages(&call) {
                        let ids = store
                            .enqueue_stage(&ev, &["kommo", "bitrix24"])
                            .await
                            .unwrap();
                        let key = format!(
                            "{}|{}|{}",
                            call,
                            ev.stage.as_str(),
                            ev.conversation_id.as_deref().unwrap_or("")
                        );
                        // acknowledged = committed: only now may the parent count it
                        let _ = tx.send(format!("ack {key} {} {}", ids[0], ids[1]));
                    }
                }
            });
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        while let Some(line) = rx.recv().await {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
}

#[test]
fn kill9_during_enqueue_loses_no_acknowledged_stage() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // key → (kommo id, bitrix24 id), as acknowledged by any run
    let mut acked: HashMap<String, (i64, i64)> = HashMap::new();
    for round in 1..=4usize {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_helper_for_kill9",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &state)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let want = 300 * round;
        let mut n = 0;
        while n < want {
            let Some(Ok(line)) = lines.next() else {
                panic!("child stopped early after {n} acks")
            };
            let Some(rest) = line.strip_prefix("ack ") else {
                continue;
            };
            let mut p = rest.split(' ');
            let (key, k, b) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
            let ids = (k.parse().unwrap(), b.parse().unwrap());
            if let Some(prev) = acked.insert(key.to_string(), ids) {
                assert_eq!(prev, ids, "{key}: a replayed stage got new jobs");
            }
            n += 1;
        }
        // SIGKILL while the other tasks are still writing
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(acked.len() >= 1000, "{}", acked.len());

    let conn = rusqlite::Connection::open(state.join("kolokol.db")).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let mut st = conn
        .prepare("SELECT id, idempotency_key, payload FROM outbox")
        .unwrap();
    let mut rows: HashMap<String, i64> = HashMap::new();
    let all: Vec<(i64, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, key, payload) in &all {
        // every row is whole
        let ev: kolokol::calls::StageEvent = serde_json::from_str(payload).unwrap();
        assert!(key.contains(&ev.call_full.id));
        assert!(rows.insert(key.clone(), *id).is_none(), "duplicate {key}");
    }
    for (key, (k, b)) in &acked {
        assert_eq!(
            rows.get(&format!("kommo|{key}")),
            Some(k),
            "lost kommo|{key}"
        );
        assert_eq!(
            rows.get(&format!("bitrix24|{key}")),
            Some(b),
            "lost bitrix24|{key}"
        );
        if key.contains("|call_ended|") {
            let call = key.split('|').next().unwrap();
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM journal WHERE call_id = ?1 AND ended_at IS NOT NULL",
                    [call],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 1, "journal row of {call} lost");
        }
    }
    // jobs and journal were written together: no ended call without its jobs
    let orphans: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM journal j WHERE ended_at IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM outbox o WHERE o.call_id = j.call_id AND o.stage = 'call_ended')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0);
}
