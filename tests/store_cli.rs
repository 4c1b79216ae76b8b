//! `kolokol outbox` and `kolokol calls`, run as the real binary against a real
//! database file.

mod store_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kolokol::calls::Stage;
use kolokol::store::{JobState, StorageConfig, Store};
use store_support::*;

fn kolokol(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kolokol"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run kolokol")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn write_config(dir: &Path, cfg: &StorageConfig) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\nstate_dir = {:?}\n",
            cfg.state_dir.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// A database with: call "ok" delivered to kommo, call "bad" whose first stage is dead
/// (rejected) and the rest waiting, call "new" pending for bitrix24.
async fn seeded() -> (tempfile::TempDir, PathBuf, Store, Vec<i64>) {
    let (dir, cfg, store) = temp_store();
    let ok = store
        .enqueue_stage(&event("ok", Stage::CallEnded, None), &["kommo"])
        .await
        .unwrap()[0];
    store
        .mark_done(ok, &serde_json::json!({"note_id": 42}))
        .await
        .unwrap();
    let mut bad = Vec::new();
    for ev in call_stages("bad") {
        bad.push(store.enqueue_stage(&ev, &["kommo"]).await.unwrap()[0]);
    }
    store
        .mark_dead(bad[0], "rejected by kommo: 400 phone is invalid")
        .await
        .unwrap();
    store
        .enqueue_stage(
            &event("new", Stage::ConversationRequested, Some("n.1")),
            &["bitrix24"],
        )
        .await
        .unwrap();
    let config = write_config(dir.path(), &cfg);
    (dir, config, store, bad)
}

#[tokio::test]
async fn outbox_list_shows_waiting_and_dead_jobs() {
    let (_d, config, _store, bad) = seeded().await;
    let c = config.to_str().unwrap();
    let o = kolokol(&["outbox", "list", "--config", c]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("ID") && lines[0].contains("ERROR"),
        "{out}"
    );
    assert_eq!(lines.len(), 1 + 4 + 1, "{out}");
    let dead_line = lines.iter().find(|l| l.contains(" dead ")).unwrap();
    assert!(dead_line.contains("400 phone is invalid"), "{dead_line}");
    assert!(
        out.contains(&format!("after job {}", bad[0])),
        "waiting jobs name what they wait for: {out}"
    );
    assert!(!out.contains(" done "), "{out}");

    // --json, filters
    let o = kolokol(&[
        "outbox", "list", "--config", c, "--json", "--crm", "bitrix24",
    ]);
    let (out, _) = text(&o);
    let jobs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["call_id"], "new");
    assert_eq!(jobs[0]["state"], "pending");
    assert_eq!(jobs[0]["conversation_id"], "n.1");
    let o = kolokol(&["outbox", "list", "--config", c, "--state", "done", "--json"]);
    assert_eq!(text(&o).0.lines().count(), 1);
    let o = kolokol(&["outbox", "list", "--config", c, "--state", "sideways"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("unknown job state"), "{}", text(&o).1);
}

#[tokio::test]
async fn outbox_dead_retry_and_drop() {
    let (_d, config, store, bad) = seeded().await;
    let c = config.to_str().unwrap();
    let o = kolokol(&["outbox", "dead", "--config", c, "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let dead: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], bad[0]);
    assert_eq!(
        dead[0]["last_error"],
        "rejected by kommo: 400 phone is invalid"
    );

    let id = bad[0].to_string();
    let o = kolokol(&["outbox", "retry", &id, "--config", c]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("will be sent again"), "{out}");
    // the change is visible to the daemon's open Store at once
    let j = store.job(bad[0]).await.unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Pending, 0));

    let o = kolokol(&["outbox", "drop", &id, "--config", c]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(store.job(bad[0]).await.unwrap().state, JobState::Dropped);
    // the next stage of the call is released
    assert_eq!(store.job(bad[1]).await.unwrap().waiting_for, None);

    // errors: one sentence, non-zero exit
    let o = kolokol(&["outbox", "retry", &id, "--config", c]);
    assert!(!o.status.success());
    let (_, err) = text(&o);
    assert!(
        err.contains(&format!("outbox job {id} is dropped")),
        "{err}"
    );
    let o = kolokol(&["outbox", "drop", "987654", "--config", c]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("no outbox job with id 987654"),
        "{}",
        text(&o).1
    );
}

#[tokio::test]
async fn calls_prints_the_journal() {
    let (_d, config, _store, _bad) = seeded().await;
    let c = config.to_str().unwrap();
    let o = kolokol(&["calls", "--config", c, "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let calls: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // "ok" ended; "bad" ended (its call_ended job was enqueued in seeded()); "new" is live
    let ids: Vec<&str> = calls
        .iter()
        .map(|c| c["call_full"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{out}");
    assert!(ids.contains(&"ok") && ids.contains(&"bad"), "{out}");
    let ok = calls.iter().find(|c| c["call_full"]["id"] == "ok").unwrap();
    assert_eq!(
        ok.as_object().unwrap().len(),
        2,
        "exactly call_full and crm"
    );
    assert_eq!(ok["crm"]["kommo"]["call_ended"]["state"], "done");
    assert_eq!(ok["crm"]["kommo"]["call_ended"]["report"]["note_id"], 42);
    assert_eq!(ok["call_full"]["talk_duration"], 30);
    let bad = calls
        .iter()
        .find(|c| c["call_full"]["id"] == "bad")
        .unwrap();
    assert_eq!(
        bad["crm"]["kommo"]["conversation_requested:bad.1"]["state"],
        "dead"
    );

    // the table
    let o = kolokol(&["calls", "--config", c]);
    let (out, _) = text(&o);
    assert!(out.contains("kommo:done"), "{out}");
    assert!(out.contains("kommo:dead"), "{out}");
    assert!(out.contains("+79161234567"), "{out}");

    // --since: a duration, a date, an RFC 3339 time
    let o = kolokol(&["calls", "--config", c, "--since", "1h", "--json"]);
    assert_eq!(text(&o).0.lines().count(), 2);
    let o = kolokol(&["calls", "--config", c, "--since", "2999-01-01", "--json"]);
    assert_eq!(text(&o).0.lines().count(), 0);
    let o = kolokol(&[
        "calls",
        "--config",
        c,
        "--since",
        "2000-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!(text(&o).0.lines().count(), 2);
    let o = kolokol(&["calls", "--config", c, "--since", "yesterdayish"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("is not a duration"), "{}", text(&o).1);
}

#[test]
fn commands_explain_a_missing_database() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig {
        state_dir: dir.path().join("nothing-here"),
        ..Default::default()
    };
    let config = write_config(dir.path(), &cfg);
    for args in [
        vec!["outbox", "list"],
        vec!["calls"],
        vec!["outbox", "retry", "1"],
    ] {
        let mut a = args.clone();
        a.extend(["--config", config.to_str().unwrap()]);
        let o = kolokol(&a);
        assert!(!o.status.success());
        let (_, err) = text(&o);
        assert!(err.contains("no database at"), "{args:?}: {err}");
        assert!(err.contains("nothing-here"), "{err}");
    }
    assert!(
        !cfg.state_dir.exists(),
        "an admin command must not create the state dir"
    );
}
