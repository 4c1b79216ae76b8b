//! `kolokol replay` as the real binary: stdout is one JSON stage event per line.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/ami/{name}.ami"))
}

fn kolokol() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kolokol"))
}

#[test]
fn replays_a_fixture_to_json_lines() {
    let out = kolokol()
        .arg("replay")
        .arg(fixture("01-inbound-answered-recorded"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stages: Vec<&str> = lines.iter().map(|l| l["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        [
            "conversation_requested",
            "conversation_accepted",
            "conversation_ended",
            "call_ended"
        ]
    );
    assert_eq!(lines[0]["conversation_id"], "1795304861.1");
    assert!(lines[3].get("conversation_id").is_none());
    let c = &lines[3]["call_full"];
    assert_eq!(c["id"], "1795304861.0");
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["answered_by"], "101");
    assert_eq!(c["result"], 200);
    assert_eq!(c["talk_duration"], 4);
    assert_eq!(
        c["conversations"]["1795304861.1"]["channel"]["state"],
        "ended"
    );
    assert_eq!(c["channel"]["answer_time"], "2026-11-21 23:47:44");
}

#[test]
fn several_files_through_one_tracker_and_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[calls]\ntime_offset = \"+03:00\"\n").unwrap();
    let out = kolokol()
        .arg("replay")
        .arg("--config")
        .arg(&cfg)
        .arg(fixture("02-inbound-noanswer-missed"))
        .arg(fixture("08-outbound-101-answered"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ended: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["stage"] == "call_ended")
        .collect();
    assert_eq!(ended.len(), 2);
    assert_eq!(ended[0]["call_full"]["result"], 480);
    assert_eq!(ended[1]["call_full"]["direction"], "outbound");
    // 23:49:19 UTC shown at +03:00.
    assert!(
        ended[1]["call_full"]["channel"]["start_time"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-22 02:49:")
    );
}

#[test]
fn errors_say_what_is_wrong() {
    let out = kolokol()
        .args(["replay", "/nonexistent/x.ami"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/x.ami"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[calls]\ntime_offset = \"Moscow\"\n").unwrap();
    let out = kolokol()
        .arg("replay")
        .arg("--config")
        .arg(&cfg)
        .arg(fixture("01-inbound-answered-recorded"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("time_offset"), "{err}");

    // A broken timeline is reported with its line.
    let ami = dir.path().join("x.ami");
    std::fs::copy(fixture("01-inbound-answered-recorded"), &ami).unwrap();
    std::fs::write(dir.path().join("x.timeline"), "0.1 recv 0 99999999\n").unwrap();
    let out = kolokol().arg("replay").arg(&ami).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timeline line 1"), "{err}");
    // ... and can be ignored.
    let out = kolokol()
        .args(["replay", "--no-timeline"])
        .arg(&ami)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
}
