//! The customization runner against real child processes: the JSON contract, every
//! failure mode, timeouts that kill whole process groups, and the concurrency bound.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kolokol::hooks::{
    Customize, FailureKind, Hook, HookFailure, HookOutcome, HooksConfig, Installed, Runner,
    registration_wanted,
};
use serde_json::json;

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn runner(dir: &Path, timeouts: &[(&str, Duration)], max_concurrent: usize) -> Runner {
    Runner::new(HooksConfig {
        dir: dir.to_path_buf(),
        timeouts: timeouts
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<_, _>>(),
        max_concurrent,
    })
}

/// True once `pid` no longer runs (gone, or a zombie nobody has reaped yet).
fn wait_gone(pid: i32, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                // The state follows the parenthesised command name.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                if state == Some("Z") || state == Some("X") {
                    return true;
                }
            }
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_pid(path: &Path) -> i32 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(pid) = s.trim().parse()
        {
            return pid;
        }
        assert!(
            Instant::now() < until,
            "script never wrote {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn failure_kind(report: &kolokol::hooks::RunReport) -> Option<FailureKind> {
    report.failure.as_ref().map(HookFailure::kind)
}

#[tokio::test]
async fn success_uses_data_with_minimal_env_and_cwd() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "process_client_phone.sh",
        r#"#!/bin/sh
input=$(cat)
printf '{"state":"success","data":{"phone":"+79161234567","seen":%s,"env":{"path":"%s","lang":"%s","hook":"%s","home":"%s"},"cwd":"%s"}}' \
  "$input" "$PATH" "$LANG" "$KOLOKOL_HOOK" "${HOME:-}" "$(pwd)"
"#,
    );
    let r = runner(dir.path(), &[], 4);
    let input = json!({"phone": "89161234567", "call_stage": "conversation_requested"});
    let report = r.run_hook(Hook::ProcessClientPhone, &input, "call-1").await;
    let HookOutcome::Data(data) = &report.outcome else {
        panic!(
            "expected data, got {:?} ({:?})",
            report.outcome, report.failure
        );
    };
    assert_eq!(data["phone"], "+79161234567");
    assert_eq!(data["seen"], input, "the whole input arrives on stdin");
    assert_eq!(
        data["env"],
        json!({
            "path": kolokol::hooks::runner::SCRIPT_PATH,
            "lang": "C.UTF-8",
            "hook": "process_client_phone",
            "home": ""
        }),
        "only PATH, LANG and KOLOKOL_HOOK are passed"
    );
    let cwd = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(data["cwd"], cwd.to_str().unwrap());
    let m = r.metrics().snapshot();
    assert_eq!((m.runs, m.succeeded, m.failed()), (1, 1, 0));
}

#[tokio::test]
async fn empty_data_cancels_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner(dir.path(), &[], 4);
    for (i, empty) in ["{}", "[]", "null"].iter().enumerate() {
        write_script(
            dir.path(),
            "process_lead_creation_params",
            &format!(
                "#!/bin/sh\ncat >/dev/null\necho '{{\"state\":\"success\",\"data\":{empty}}}'\n"
            ),
        );
        let out = r
            .run_hook(Hook::ProcessLeadCreationParams, &json!({}), "c")
            .await;
        assert_eq!(out.outcome, HookOutcome::Cancelled, "data {empty}");
        assert_eq!(r.metrics().snapshot().cancelled, i as u64 + 1);
    }
    // need_registration: {"result": false} and empty data both skip the call.
    write_script(
        dir.path(),
        "need_registration",
        "#!/bin/sh\necho '{\"state\":\"success\",\"data\":{\"result\":false}}'\n",
    );
    let out = r.run_hook(Hook::NeedRegistration, &json!({}), "c").await;
    assert!(!registration_wanted(&out.outcome));
    assert!(registration_wanted(&HookOutcome::Default {
        reason: "x".into()
    }));
}

#[tokio::test]
async fn every_failure_mode_falls_back_to_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = runner(d, &[("process_call_params", Duration::from_millis(300))], 4);

    let cases: Vec<(&str, Option<&str>, FailureKind, &str)> = vec![
        ("missing", None, FailureKind::NotInstalled, "not installed"),
        (
            "exit",
            Some("#!/bin/sh\necho 'line one' >&2\necho 'database is locked' >&2\nexit 3\n"),
            FailureKind::Exit,
            "exit code 3",
        ),
        (
            "invalid json",
            Some("#!/bin/sh\necho 'Warning: PHP notice'\n"),
            FailureKind::InvalidJson,
            "not valid JSON",
        ),
        (
            "no output",
            Some("#!/bin/sh\nexit 0\n"),
            FailureKind::InvalidJson,
            "printed nothing",
        ),
        (
            "state error",
            Some("#!/bin/sh\necho '{\"state\":\"error\",\"message\":\"CRM down\"}'\n"),
            FailureKind::NotSuccess,
            "CRM down",
        ),
        (
            "too large",
            Some(
                "#!/bin/sh\nprintf '{\"state\":\"success\",\"data\":\"'\nhead -c 2000000 /dev/zero | tr '\\0' a\nprintf '\"}'\n",
            ),
            FailureKind::TooLarge,
            "larger than",
        ),
        (
            "timeout",
            Some("#!/bin/sh\nsleep 30\n"),
            FailureKind::Timeout,
            "timed out after 300ms",
        ),
        (
            "bad interpreter",
            Some("#!/nonexistent/interpreter\n"),
            FailureKind::Spawn,
            "interpreter",
        ),
    ];
    for (what, body, kind, reason_part) in cases {
        let _ = std::fs::remove_file(d.join("process_call_params"));
        if let Some(body) = body {
            write_script(d, "process_call_params", body);
        }
        let report = r
            .run_hook(Hook::ProcessCallParams, &json!({"call_full": {}}), "c-7")
            .await;
        let HookOutcome::Default { reason } = &report.outcome else {
            panic!("{what}: expected the default, got {:?}", report.outcome);
        };
        assert!(reason.contains(reason_part), "{what}: reason {reason:?}");
        assert_eq!(failure_kind(&report), Some(kind), "{what}");
        assert!(r.metrics().failures(kind) > 0, "{what} counted");
        if what == "exit" {
            assert!(report.stderr_tail.contains("database is locked"));
        }
    }

    // Not executable.
    let path = d.join("process_call_params");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let report = r.run_hook(Hook::ProcessCallParams, &json!({}), "c").await;
    assert_eq!(failure_kind(&report), Some(FailureKind::NotExecutable));
    assert!(report.failure.unwrap().to_string().contains("chmod +x"));

    // Two candidates: neither runs.
    std::fs::remove_file(&path).unwrap();
    write_script(d, "process_call_params.sh", "#!/bin/sh\necho '{}'\n");
    write_script(d, "process_call_params.py", "#!/bin/sh\necho '{}'\n");
    let report = r.run_hook(Hook::ProcessCallParams, &json!({}), "c").await;
    assert_eq!(failure_kind(&report), Some(FailureKind::Ambiguous));
    let problems = r.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("keep only one"));

    let m = r.metrics().snapshot();
    assert_eq!(m.timeouts, 1);
    assert_eq!(m.succeeded, 0);
    assert_eq!(m.runs, 10);
}

#[tokio::test]
async fn sleep_forever_is_killed_with_its_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    write_script(
        dir.path(),
        "process_originate_params",
        &format!(
            "#!/bin/sh\nsleep 1000 &\necho $! > {}\nwait\n",
            pidfile.display()
        ),
    );
    let timeout = Duration::from_millis(400);
    let r = runner(dir.path(), &[("process_originate_params", timeout)], 4);
    let started = Instant::now();
    let report = r
        .run_hook(Hook::ProcessOriginateParams, &json!({}), "c")
        .await;
    let took = started.elapsed();
    assert_eq!(failure_kind(&report), Some(FailureKind::Timeout));
    assert!(
        took < timeout + Duration::from_millis(1500),
        "returned after {took:?}"
    );
    let grandchild = read_pid(&pidfile);
    assert!(
        wait_gone(grandchild, Duration::from_secs(3)),
        "the script's child {grandchild} survived the timeout"
    );
}

#[tokio::test]
async fn a_child_holding_stdout_does_not_hang_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    // The background sleep inherits stdout: EOF would never come while it lives.
    write_script(
        dir.path(),
        "post_registration",
        &format!(
            "#!/bin/sh\nsleep 1000 &\necho $! > {}\necho '{{\"state\":\"success\",\"data\":{{\"ok\":true}}}}'\n",
            pidfile.display()
        ),
    );
    let r = runner(
        dir.path(),
        &[("post_registration", Duration::from_secs(20))],
        4,
    );
    let started = Instant::now();
    let report = r.run_hook(Hook::PostRegistration, &json!({}), "c").await;
    assert_eq!(report.outcome, HookOutcome::Data(json!({"ok": true})));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?} for a pipe held by a background child",
        started.elapsed()
    );
    let bg = read_pid(&pidfile);
    assert!(
        wait_gone(bg, Duration::from_secs(3)),
        "leftover child {bg} not killed"
    );
}

#[tokio::test]
async fn a_detached_child_holding_stdout_does_not_hang_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("detached.pid");
    // setsid puts the sleep in another process group: kolokol cannot kill it, but must
    // still return soon after the script itself exits.
    write_script(
        dir.path(),
        "post_registration",
        &format!(
            "#!/bin/sh\nsetsid sleep 1000 &\necho $! > {}\necho '{{\"state\":\"success\",\"data\":{{\"ok\":1}}}}'\n",
            pidfile.display()
        ),
    );
    let r = runner(
        dir.path(),
        &[("post_registration", Duration::from_secs(20))],
        4,
    );
    let started = Instant::now();
    let report = r.run_hook(Hook::PostRegistration, &json!({}), "c").await;
    let took = started.elapsed();
    let detached = read_pid(&pidfile);
    // Clean up the process kolokol was not allowed to kill.
    unsafe {
        libc::kill(detached, libc::SIGKILL);
    }
    assert_eq!(report.outcome, HookOutcome::Data(json!({"ok": 1})));
    assert!(took < Duration::from_secs(10), "waited {took:?}");
}

#[tokio::test]
async fn dropping_the_run_kills_the_script() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    write_script(
        dir.path(),
        "process_task_creation_params",
        &format!(
            "#!/bin/sh\nsleep 1000 &\necho $! > {}\nwait\n",
            pidfile.display()
        ),
    );
    let r = runner(
        dir.path(),
        &[("process_task_creation_params", Duration::from_secs(60))],
        4,
    );
    let input = json!({});
    let run = r.run_hook(Hook::ProcessTaskCreationParams, &input, "c");
    let pidfile2 = pidfile.clone();
    let abandoned = tokio::time::timeout(Duration::from_secs(20), async move {
        tokio::select! {
            _ = run => panic!("the script should still be running"),
            _ = async {
                while !pidfile2.exists() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } => {}
        }
    })
    .await;
    assert!(abandoned.is_ok());
    let child = read_pid(&pidfile);
    assert!(wait_gone(child, Duration::from_secs(3)), "{child} survived");
    assert_eq!(r.metrics().snapshot().running, 0);
}

#[tokio::test]
async fn large_input_to_a_script_that_ignores_or_echoes_it() {
    let dir = tempfile::tempdir().unwrap();
    let big = "x".repeat(600 * 1024);
    let input = json!({"blob": big});
    write_script(
        dir.path(),
        "process_contact_update_params",
        "#!/bin/sh\necho '{\"state\":\"success\",\"data\":{\"ignored\":true}}'\n",
    );
    write_script(
        dir.path(),
        "process_lead_update_params",
        "#!/bin/sh\nprintf '{\"state\":\"success\",\"data\":'\ncat\nprintf '}'\n",
    );
    let r = runner(dir.path(), &[], 4);
    let a = r
        .run_hook(Hook::ProcessContactUpdateParams, &input, "c")
        .await;
    assert_eq!(a.outcome, HookOutcome::Data(json!({"ignored": true})));
    let b = r.run_hook(Hook::ProcessLeadUpdateParams, &input, "c").await;
    assert_eq!(b.outcome, HookOutcome::Data(input));

    // 8 MB of stderr before the answer: drained concurrently (no pipe deadlock), only
    // its end kept for the log.
    write_script(
        dir.path(),
        "process_task_creation_params",
        "#!/bin/sh
head -c 8000000 /dev/zero | tr '\\0' e >&2
echo 'the end' >&2
echo '{\"state\":\"success\",\"data\":{\"ok\":1}}'\n",
    );
    let c = r
        .run_hook(Hook::ProcessTaskCreationParams, &json!({}), "c")
        .await;
    assert_eq!(c.outcome, HookOutcome::Data(json!({"ok": 1})));
    assert!(c.stderr_tail.ends_with("the end\n"));
    assert!(c.stderr_tail.len() <= kolokol::hooks::runner::STDERR_TAIL);
}

#[tokio::test]
async fn autodistribution_drops_read_only_fields_and_cuts_the_name() {
    let dir = tempfile::tempdir().unwrap();
    // Returns its whole input, renamed: a typical careless script.
    write_script(
        dir.path(),
        "autodistribution.py",
        r#"#!/usr/bin/env python3
import json, sys
d = json.load(sys.stdin)
d["number"] = "205"
d["name"] = "VIP " + d["entity"]["name"] + " (gold customer)"
print(json.dumps({"state": "success", "data": d}))
"#,
    );
    let r = runner(dir.path(), &[], 4);
    let input = json!({
        "number": "101", "name": "Anna", "from": "89161234567", "trunk": "prov",
        "request_data": {"a": 1}, "entity": {"name": "Ivan Petrov"}, "error": ""
    });
    let report = r.run_hook(Hook::Autodistribution, &input, "c").await;
    assert_eq!(
        report.outcome,
        HookOutcome::Data(json!({"number": "205", "name": "VIP Ivan Petrov (gol"}))
    );
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
}

#[tokio::test]
async fn symlinked_script_runs_and_disabled_names_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let target = write_script(
        store.path(),
        "tag.sh",
        "#!/bin/sh\necho '{\"state\":\"success\",\"data\":{\"tags\":[\"x\"]}}'\n",
    );
    std::os::unix::fs::symlink(
        &target,
        dir.path().join("process_contact_creation_params.sh"),
    )
    .unwrap();
    write_script(
        dir.path(),
        "process_task_creation_params.sh.disabled",
        "#!/bin/sh\n",
    );
    write_script(dir.path(), ".process_call_params", "#!/bin/sh\n");
    let r = runner(dir.path(), &[], 4);
    assert!(matches!(
        r.locate(Hook::ProcessContactCreationParams),
        Installed::Found {
            executable: true,
            ..
        }
    ));
    assert_eq!(
        r.locate(Hook::ProcessTaskCreationParams),
        Installed::Missing
    );
    assert_eq!(r.locate(Hook::ProcessCallParams), Installed::Missing);
    let report = r
        .run_hook(Hook::ProcessContactCreationParams, &json!({}), "c")
        .await;
    assert_eq!(report.outcome, HookOutcome::Data(json!({"tags": ["x"]})));
}

#[tokio::test]
async fn runner_as_a_customize_trait_object() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "process_unsorted_creation_params",
        "#!/bin/sh\necho '{\"state\":\"success\",\"data\":{\"source_name\":\"office\"}}'\n",
    );
    let c: Arc<dyn Customize> = Arc::new(runner(dir.path(), &[], 2));
    let out = c
        .run("process_unsorted_creation_params", json!({}), "c")
        .await;
    assert_eq!(out, HookOutcome::Data(json!({"source_name": "office"})));
    let out = c.run("no_such_hook", json!({}), "c").await;
    assert!(matches!(out, HookOutcome::Default { reason } if reason.contains("unknown hook")));
}

#[tokio::test]
async fn no_free_slot_within_the_timeout_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "process_record_file_path",
        "#!/bin/sh\nsleep 1\necho '{\"state\":\"success\",\"data\":{\"path\":\"/x.mp3\"}}'\n",
    );
    write_script(
        dir.path(),
        "need_registration",
        "#!/bin/sh\necho '{\"state\":\"success\",\"data\":{\"result\":true}}'\n",
    );
    let r = Arc::new(runner(
        dir.path(),
        &[("need_registration", Duration::from_millis(200))],
        1,
    ));
    let slow = {
        let r = r.clone();
        tokio::spawn(async move {
            r.run_hook(Hook::ProcessRecordFilePath, &json!({}), "a")
                .await
                .outcome
        })
    };
    while r.metrics().snapshot().running == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fast = r.run_hook(Hook::NeedRegistration, &json!({}), "b").await;
    assert_eq!(failure_kind(&fast), Some(FailureKind::Busy));
    assert_eq!(
        slow.await.unwrap(),
        HookOutcome::Data(json!({"path": "/x.mp3"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_runs_respect_max_concurrent() {
    const MAX: usize = 8;
    const RUNS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    let live = dir.path().join("live");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    // Each run marks itself live, records how many runs it sees live (a lower bound
    // of true concurrency, never above it), then unmarks itself before exiting.
    write_script(
        &hooks,
        "process_call_params",
        &format!(
            r#"#!/bin/sh
live={live}
: > "$live/run.$$"
set -- "$live"/run.*
echo $# >> {observed}
n=$(cat)
rm -f "$live/run.$$"
printf '{{"state":"success","data":%s}}' "$n"
"#,
            live = live.display(),
            observed = dir.path().join("observed").display(),
        ),
    );
    let r = Arc::new(runner(
        &hooks,
        &[("process_call_params", Duration::from_secs(300))],
        MAX,
    ));
    let mut tasks = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let out = r
                .run_hook(Hook::ProcessCallParams, &json!({"n": i}), "c")
                .await;
            (i, out.outcome)
        }));
    }
    for t in tasks {
        let (i, outcome) = t.await.unwrap();
        assert_eq!(outcome, HookOutcome::Data(json!({"n": i})));
    }
    let m = r.metrics().snapshot();
    assert_eq!(
        (m.runs, m.succeeded, m.failed()),
        (RUNS as u64, RUNS as u64, 0)
    );
    assert!(m.peak_running <= MAX as u64, "peak {}", m.peak_running);
    assert!(m.peak_running >= 2, "runs were never concurrent");
    let observed = std::fs::read_to_string(dir.path().join("observed")).unwrap();
    let counts: Vec<usize> = observed
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), RUNS);
    let max_seen = counts.iter().copied().max().unwrap();
    assert!(max_seen <= MAX, "scripts saw {max_seen} live at once");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failure_is_one_log_line_with_hook_call_reason_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "process_client_phone",
        "#!/bin/sh\necho 'PHP Fatal error: x' >&2\necho 'at line 3' >&2\nexit 255\n",
    );
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let r = runner(dir.path(), &[], 2);
    r.run_hook(Hook::ProcessClientPhone, &json!({}), "1700000000.42")
        .await;
    r.run_hook(Hook::ProcessLeadCreationParams, &json!({}), "1700000000.42")
        .await; // not installed: not worth a line at INFO
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    for part in [
        "WARN",
        "process_client_phone",
        "1700000000.42",
        "exit code 255",
        "PHP Fatal error: x | at line 3",
    ] {
        assert!(line.contains(part), "{part:?} missing in {line}");
    }
}

#[test]
fn config_timeouts_are_parsed_and_unknown_hooks_rejected() {
    let ok = kolokol::config::Config::from_toml(
        "[customizations]\ndir = \"/opt/c\"\nmax_concurrent = 4\n[customizations.timeouts]\nprocess_record_file_path = \"30s\"\nneed_registration = \"500ms\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let r = Runner::new(ok.customizations);
    assert_eq!(
        r.timeout(Hook::ProcessRecordFilePath),
        Duration::from_secs(30)
    );
    assert_eq!(
        r.timeout(Hook::NeedRegistration),
        Duration::from_millis(500)
    );
    assert_eq!(r.timeout(Hook::ProcessCallParams), Duration::from_secs(3));
    let default = Runner::new(HooksConfig::default());
    assert_eq!(
        default.timeout(Hook::ProcessRecordFilePath),
        Duration::from_secs(10)
    );

    let err = kolokol::config::Config::from_toml(
        "[customizations.timeouts]\nneed_registraton = \"1s\"\n",
        Path::new("t.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("need_registraton"), "{err}");
    assert!(
        err.contains("need_registration"),
        "lists the known names: {err}"
    );
}
