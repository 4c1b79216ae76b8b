//! The real `kolokol run` binary with only Kommo configured: the recorded fixtures
//! replayed by the simulated PBX over TCP, the sandbox Kommo over HTTP, a real SQLite
//! state dir and a real customizations folder of executable scripts.
//!
//! Each test looks at the Kommo account afterwards the way a manager would, call by
//! call: one contact per new client number, its lead, one call note per call with the
//! right direction / status / duration / recording link / responsible user, call-back
//! tasks only for calls nobody answered, the internal call nowhere; then the same with
//! every Kommo customization changing something visible, and with customizations that
//! fail in every way the contract names.

mod fixture_support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions, FakeUser, Replay};
use kolokol::sandbox::kommo::{self as sk, CallNote, Contact, Lead, SandboxKommo, Snapshot};

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");
const AMI_USER: &str = "kolokol";
const AMI_SECRET: &str = "kolokol-test";
/// `[kommo.users]` of every test.
const USER_101: i64 = 5002;
const USER_102: i64 = 5003;
/// Generous: a loaded 2-core CI machine runs several of these daemons at once.
const LIMIT: Duration = Duration::from_secs(90);

/// The client number of fixtures 01-13.
const CLIENT: &str = "79161234567";

use fixture_support::CALL_FIXTURES as FIXTURES;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ------------------------------------------------------------------ expected calls

/// One call of a fixture, as `tests/fixtures/expected/` describes it, with its id.
#[derive(Debug, Clone)]
struct Expected {
    fixture: &'static str,
    /// The Linkedid (our call id, Kommo's `uniq`); for the burst, found by caller.
    id: String,
    direction: String,
    client_phone: String,
    answered: bool,
    answered_by: String,
    min_conversations: u64,
    line_number: String,
    record: bool,
}

impl Expected {
    fn kommo_phone(&self) -> String {
        format!("+{}", self.client_phone)
    }
    fn busy(&self) -> bool {
        self.fixture.contains("busy")
    }
    /// Missed incoming or unanswered outgoing: a call-back task is due.
    fn wants_task(&self) -> bool {
        !self.answered && self.direction != "internal"
    }
}

/// The Linkedids a fixture's events carry, in order of first appearance.
fn linkedids(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Linkedid: ") {
            let v = v.trim().to_string();
            if !v.is_empty() && !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

/// The burst's Linkedid of each caller, from the events (the caller's trunk channel
/// is the one that starts its call).
fn burst_ids(bytes: &[u8]) -> BTreeMap<String, String> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = BTreeMap::new();
    for block in text.split("\r\n\r\n") {
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .map(|v| v.trim().to_string())
        };
        if field("Event").as_deref() != Some("Newchannel") {
            continue;
        }
        let (Some(num), Some(uid), Some(linked)) =
            (field("CallerIDNum"), field("Uniqueid"), field("Linkedid"))
        else {
            continue;
        };
        if uid == linked && num.starts_with("7916555") {
            out.entry(num).or_insert(linked);
        }
    }
    out
}

fn expected(fixture: &'static str) -> Vec<Expected> {
    let path = fixtures_dir()
        .join("expected")
        .join(format!("{fixture}.json"));
    let text = std::fs::read_to_string(&path).expect("expected file");
    let v: Value = serde_json::from_str(&text).expect("expected JSON");
    let bytes = std::fs::read(fixtures_dir().join("ami").join(format!("{fixture}.ami")))
        .expect("fixture bytes");
    let ids = linkedids(&bytes);
    let burst = burst_ids(&bytes);
    let calls = v["calls"].as_array().expect("calls").clone();
    calls
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            let client_phone = s("client_phone");
            let id = if calls.len() == 1 {
                assert_eq!(ids.len(), 1, "{fixture}: one call, one Linkedid: {ids:?}");
                ids[0].clone()
            } else {
                burst
                    .get(&client_phone)
                    .cloned()
                    .unwrap_or_else(|| panic!("{fixture}: no call of {client_phone}"))
            };
            Expected {
                fixture,
                id,
                direction: s("direction"),
                client_phone,
                answered: c["answered"].as_bool().unwrap_or(false),
                answered_by: s("answered_by"),
                min_conversations: c["min_conversations"].as_u64().unwrap_or(0),
                line_number: s("line_number"),
                record: c["record"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

fn user_of(ext: &str) -> Option<i64> {
    match ext {
        "101" => Some(USER_101),
        "102" => Some(USER_102),
        _ => None,
    }
}

// ------------------------------------------------------------------ the world

struct Env {
    dir: tempfile::TempDir,
    ami: FakeAmi,
    kommo: SandboxKommo,
    config: PathBuf,
    http: String,
    hooks: PathBuf,
}

/// A simulated PBX, a sandbox Kommo and a Kommo-only config. `kommo_extra` and
/// `customizations_extra` are TOML lines added to those sections.
async fn env(kommo_extra: &str, customizations_extra: &str) -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let spool = dir.path().join("spool");
    let state = dir.path().join("state");
    let hooks = dir.path().join("customizations");
    for d in [&spool, &state, &hooks] {
        std::fs::create_dir_all(d).expect("dirs");
    }
    let ami = FakeAmi::start(FakeAmiOptions {
        users: vec![FakeUser::new(AMI_USER, AMI_SECRET, false)],
        ..FakeAmiOptions::default()
    })
    .await
    .expect("fake AMI");
    let kommo = SandboxKommo::start().await.expect("sandbox Kommo");
    // No rate limit in the sandbox here; kolokol's own pacing matches.
    kommo.set_rate_limit(1000.0);
    let http = format!("127.0.0.1:{}", free_port());
    let toml = format!(
        r#"[ami]
host = "127.0.0.1"
port = {ami_port}
username = "{AMI_USER}"
secret = "{AMI_SECRET}"
ping_interval = "5s"

[customizations]
dir = "{hooks}"
{customizations_extra}

[records]
dir = "{spool}"
pbx_dir = "/var/spool/asterisk/monitor"

[storage]
state_dir = "{state}"
retry_min = "200ms"
retry_max = "2s"

[agi]
listen = "127.0.0.1:0"

[http]
listen = "{http}"
public_url = "http://{http}"

[kommo]
base_url = "{base}"
long_lived_token = "{token}"
default_responsible_user_id = {admin}
rate_limit = 1000.0
{kommo_extra}

[kommo.users]
"101" = {USER_101}
"102" = {USER_102}
"#,
        ami_port = ami.local_addr().port(),
        hooks = hooks.display(),
        spool = spool.display(),
        state = state.display(),
        base = kommo.base_url(),
        token = sk::LONG_LIVED_TOKEN,
        admin = sk::ADMIN_USER_ID,
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml).expect("config written");
    Env {
        dir,
        ami,
        kommo,
        config,
        http,
        hooks,
    }
}

impl Env {
    /// Install an executable customization script.
    fn hook(&self, name: &str, body: &str) {
        let path = self.hooks.join(name);
        std::fs::write(&path, body).expect("hook written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// A file in the test's folder (hooks write their logs there).
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replay a fixture as recorded (original ids), with its recordings in the spool.
    async fn play(&self, fixture: &str) {
        let replay =
            Replay::from_fixture(fixtures_dir().join("ami").join(format!("{fixture}.ami")))
                .expect("fixture")
                .timed(false);
        kolokol::sandbox::demo::write_recordings(&self.dir.path().join("spool"), replay.bytes());
        self.ami.play(&replay).await;
    }

    fn snap(&self) -> Snapshot {
        self.kommo.snapshot()
    }

    /// `/healthz` of the daemon: (live calls, pending jobs, dead jobs).
    async fn health(&self) -> Option<(u64, u64, u64)> {
        let resp = reqwest::get(format!("http://{}/healthz", self.http))
            .await
            .ok()?;
        let v: Value = resp.json().await.ok()?;
        Some((
            v["live_calls"].as_u64()?,
            v["outbox"]["pending"].as_u64()?,
            v["outbox"]["dead"].as_u64()?,
        ))
    }

    /// Wait until the daemon has no live call and no pending job. Call it after the
    /// work is known to have reached the outbox.
    async fn settled(&self, daemon: &Daemon) {
        let start = Instant::now();
        loop {
            if let Some((0, 0, _)) = self.health().await {
                return;
            }
            if start.elapsed() > LIMIT {
                panic!(
                    "the daemon did not settle: {:?}\n{}",
                    self.health().await,
                    daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{}/metrics", self.http)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

/// A counter from the Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Start `kolokol run` in a time zone far from UTC: call times are written at the
    /// configured offset (UTC by default), never at the host's zone.
    async fn start(env: &Env) -> Daemon {
        let log = env.file("daemon.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&env.config)
            .env("RUST_LOG", "info")
            .env("TZ", "Asia/Vladivostok")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("kolokol starts");
        let d = Daemon {
            child: Some(child),
            log,
        };
        assert!(
            env.ami.wait_logged_in(1, LIMIT).await,
            "the daemon logs in to AMI:\n{}",
            d.log_tail()
        );
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// SIGTERM; the exit code.
    fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait for `cond`, failing with `what` and the daemon's log after [`LIMIT`].
async fn wait_for(what: &str, daemon: &Daemon, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > LIMIT {
            panic!("timed out waiting for {what}\n{}", daemon.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lines of a JSON Lines file a hook appends to.
fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path:?}: {e}: {l}")))
        .collect()
}

/// Plain lines of a log file a hook appends to.
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// `kolokol calls --json`: each journaled call's `call_full`, by id.
fn journal(env: &Env) -> BTreeMap<String, Value> {
    let out = Command::new(BIN)
        .args(["calls", "--json", "--config"])
        .arg(&env.config)
        .output()
        .expect("kolokol calls runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("one JSON object per line");
            let cf = v["call_full"].clone();
            (cf["id"].as_str().unwrap_or("").to_string(), cf)
        })
        .collect()
}

// ------------------------------------------------------------------ snapshot helpers

fn note<'a>(snap: &'a Snapshot, id: &str) -> Vec<&'a CallNote> {
    snap.calls
        .iter()
        .filter(|c| c.uniq.as_deref() == Some(id))
        .collect()
}

fn only_contact<'a>(snap: &'a Snapshot, phone: &str) -> &'a Contact {
    let found = snap.contacts_with_phone(phone);
    assert_eq!(found.len(), 1, "one contact for {phone}: {found:#?}");
    found[0]
}

fn lead_of<'a>(snap: &'a Snapshot, contact: &Contact) -> &'a Lead {
    let leads: Vec<&Lead> = snap
        .leads
        .iter()
        .filter(|l| l.contact_ids.contains(&contact.id))
        .collect();
    assert_eq!(
        leads.len(),
        1,
        "one lead for contact {}: {leads:#?}",
        contact.id
    );
    leads[0]
}

fn all_expected() -> Vec<Expected> {
    FIXTURES.iter().flat_map(|f| expected(f)).collect()
}

// ------------------------------------------------------------------ 1. no hooks

/// Every fixture call, no customizations: the account afterwards holds exactly what a
/// manager expects, call by call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_call_lands_in_kommo_as_a_manager_expects() {
    let env = env("", "").await;
    let test_start = chrono::Utc::now().timestamp();
    let mut daemon = Daemon::start(&env).await;

    // One fixture at a time, each registered before the next, so "the call that made
    // the contact" is known (fixture 01 for the client of 01-13).
    let mut registered = 0;
    for f in FIXTURES {
        let calls = expected(f);
        registered += calls.iter().filter(|c| c.direction != "internal").count();
        env.play(f).await;
        let want = registered;
        wait_for(&format!("{f} registered"), &daemon, || {
            env.snap().calls.len() >= want
        })
        .await;
    }
    // The internal call has its journal entry but no job; everything else is done.
    env.settled(&daemon).await;
    let snap = env.snap();
    let all = all_expected();
    let external: Vec<&Expected> = all.iter().filter(|c| c.direction != "internal").collect();
    assert_eq!(external.len(), 34);

    // One call note per external call, none for the internal one, nothing else.
    assert_eq!(snap.calls.len(), external.len(), "{:#?}", snap.calls);
    let internal = all.iter().find(|c| c.direction == "internal").expect("10");
    assert!(
        note(&snap, &internal.id).is_empty(),
        "internal call registered"
    );
    assert!(snap.contacts_with_phone("102").is_empty());
    assert!(snap.unsorted.is_empty());

    // One contact (and one lead) per client number, named and tagged by default.
    let numbers: BTreeSet<&str> = external.iter().map(|c| c.client_phone.as_str()).collect();
    assert_eq!(numbers.len(), 21);
    assert_eq!(snap.contacts.len(), numbers.len(), "{:#?}", snap.contacts);
    assert_eq!(snap.leads.len(), numbers.len(), "{:#?}", snap.leads);
    for number in &numbers {
        let first = external
            .iter()
            .find(|c| c.client_phone == *number)
            .expect("a call");
        let phone = first.kommo_phone();
        let contact = only_contact(&snap, number);
        assert_eq!(contact.name, format!("Contact {phone}"));
        assert_eq!(contact.phones, vec![phone.clone()]);
        assert_eq!(contact.tags, vec!["kolokol".to_string()]);
        let lead = lead_of(&snap, contact);
        let missed = if first.answered { "" } else { "missed " };
        assert_eq!(lead.name, format!("{phone} - {missed}incoming"), "{number}");
        assert_eq!(lead.status_id, sk::STATUS_FIRST);
        assert_eq!(lead.pipeline_id, sk::PIPELINE_ID);
        assert_eq!(lead.tags, vec!["kolokol".to_string()]);
        // Responsible for a new client: who answered, else the last employee whose
        // phone rang, else the default user.
        let want = user_of(&first.answered_by).unwrap_or(if first.min_conversations == 0 {
            sk::ADMIN_USER_ID
        } else {
            contact.responsible_user_id
        });
        assert_eq!(contact.responsible_user_id, want, "{number}");
        if first.min_conversations > 0 && !first.answered {
            assert!(
                [USER_101, USER_102].contains(&contact.responsible_user_id),
                "{number}: a missed call goes to an employee whose phone rang"
            );
        }
        assert_eq!(lead.responsible_user_id, contact.responsible_user_id);
    }
    // The client of 01-13 was created by 01, answered by 101.
    assert_eq!(only_contact(&snap, CLIENT).responsible_user_id, USER_101);

    // Each call note, call by call.
    let journal = journal(&env);
    for c in &external {
        let notes = note(&snap, &c.id);
        assert_eq!(notes.len(), 1, "{} ({}) once: {notes:#?}", c.fixture, c.id);
        let n = notes[0];
        let ctx = format!("{} call {} ({})", c.fixture, c.id, c.client_phone);
        assert_eq!(n.direction, c.direction, "{ctx}");
        assert_eq!(n.phone, c.kommo_phone(), "{ctx}");
        assert_eq!(n.source, "kolokol", "{ctx}");
        let status = if c.answered {
            4
        } else if c.busy() {
            7
        } else {
            6
        };
        assert_eq!(n.call_status, Some(status), "{ctx}");
        // Talk time as the tracker measured it (the replay here is untimed, so the
        // timed test below checks the seconds themselves).
        let journaled = &journal[&c.id];
        if c.answered {
            assert_eq!(
                Some(n.duration),
                journaled["talk_duration"].as_i64(),
                "{ctx}: the talk time"
            );
        } else {
            assert_eq!(n.duration, 0, "{ctx}: nobody talked");
        }
        // A link only where a recording was made, served by this daemon.
        if c.record {
            let link = n
                .link
                .as_deref()
                .unwrap_or_else(|| panic!("{ctx}: no link"));
            assert!(
                link.starts_with(&format!("http://{}/records/", env.http)),
                "{ctx}: {link}"
            );
        } else {
            assert_eq!(n.link, None, "{ctx}: link without a recording");
        }
        // On the client's lead.
        let contact = only_contact(&snap, &c.client_phone);
        let lead = lead_of(&snap, contact);
        assert_eq!(
            (n.entity_type.as_str(), n.entity_id),
            ("lead", lead.id),
            "{ctx}"
        );
        // Responsible: who talked last; an unanswered outgoing call: who dialled
        // (101 in the fixtures); a missed incoming call: the client's manager.
        let want = if c.answered {
            user_of(&c.answered_by).expect("mapped")
        } else if c.direction == "outbound" {
            USER_101
        } else {
            lead.responsible_user_id
        };
        assert_eq!(n.responsible_user_id, want, "{ctx}");
        assert_eq!(n.created_by, Some(want), "{ctx}");
        // When the call started: the replay runs now (the tracker times events as
        // they arrive), and the daemon's zone (UTC+10) must not shift it.
        let created = n.created_at.unwrap_or_else(|| panic!("{ctx}: created_at"));
        let now = chrono::Utc::now().timestamp();
        assert!(
            (test_start - 5..=now + 5).contains(&created),
            "{ctx}: created_at {created} is not the call's start (test ran {test_start}..{now})"
        );
    }

    // Tasks: one per call nobody answered, on the client's lead, for the manager.
    let missed: Vec<&&Expected> = external.iter().filter(|c| c.wants_task()).collect();
    assert_eq!(missed.len(), 15);
    assert_eq!(snap.tasks.len(), missed.len(), "{:#?}", snap.tasks);
    for number in &numbers {
        let contact = only_contact(&snap, number);
        let lead = lead_of(&snap, contact);
        let phone = format!("+{number}");
        let calls: Vec<&&Expected> = missed
            .iter()
            .filter(|c| c.client_phone == *number)
            .copied()
            .collect();
        let tasks: Vec<_> = snap
            .tasks
            .iter()
            .filter(|t| t.entity_id == Some(lead.id))
            .collect();
        assert_eq!(tasks.len(), calls.len(), "{number}: {tasks:#?}");
        let outgoing = calls.iter().filter(|c| c.direction == "outbound").count();
        let out_text = format!(
            "Call back {}: outgoing call to {phone} was not answered",
            contact.name
        );
        let in_text = format!(
            "Call back {} on a missed call from a number {phone}",
            contact.name
        );
        assert_eq!(
            tasks.iter().filter(|t| t.text == out_text).count(),
            outgoing,
            "{number}"
        );
        assert_eq!(
            tasks.iter().filter(|t| t.text == in_text).count(),
            calls.len() - outgoing,
            "{number}: {tasks:#?}"
        );
        for t in tasks {
            assert_eq!(t.entity_type.as_deref(), Some("leads"));
            assert_eq!(t.task_type_id, 1, "a call");
            assert!(!t.is_completed);
            assert_eq!(t.responsible_user_id, lead.responsible_user_id, "{number}");
            assert!(
                t.complete_till > test_start + 3000,
                "{number}: due in an hour, not {}",
                t.complete_till
            );
        }
    }

    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_tail());
}

// ------------------------------------------------------------------ 2. hooks for new clients

/// The head of every Python hook here: the input without its context, and `out`.
const PY: &str = r#"#!/usr/bin/env python3
import json, sys
inp = json.load(sys.stdin)
cf = inp.pop("call_full", {})
stage = inp.pop("call_stage", None)
def out(data):
    print(json.dumps({"state": "success", "data": data}))
"#;

fn py(body: &str) -> String {
    format!("{PY}{body}\n")
}

/// A shell hook that appends its whole input to `log` (one JSON line) and answers `{}`.
fn sh_journal(log: &Path) -> String {
    format!(
        "#!/bin/sh\ninput=$(cat)\nprintf '%s\\n' \"$input\" >> '{}'\nprintf '{{\"state\":\"success\",\"data\":{{}}}}\\n'\n",
        log.display()
    )
}

/// Every Kommo customization changes what a new client gets: the number, whether the
/// call is registered at all, the contact, the lead, the call note, the task; and
/// `post_registration` is told what Kommo created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_shape_what_new_clients_get() {
    let env = env("", "").await;
    let asked = env.file("need_registration.log");
    let posted = env.file("post_registration.jsonl");
    env.hook(
        "need_registration.py",
        &py(&format!(
            r#"with open({asked:?}, "a") as f:
    f.write(cf["id"] + " " + str(stage) + "\n")
p = cf.get("client_phone", "")
if p.endswith("0103"):
    out({{"result": False}})
elif p.endswith("0104"):
    out({{}})  # empty data: skip, like false
else:
    out({{"result": True}})"#,
            asked = asked.display().to_string()
        )),
    );
    env.hook(
        "process_client_phone.py",
        &py(r#"p = inp["phone"]
if p.endswith("0106"):
    out({"phone": "+7 (999) 000-01-06"})  # the client's other number
elif p.endswith("0107"):
    out(None)  # cancel: not registered
else:
    out({"phone": p})"#),
    );
    env.hook(
        "process_contact_creation_params.py",
        &py(
            r#"phone = inp["custom_fields_values"][0]["values"][0]["value"]
inp["name"] = "Client %s (line %s)" % (phone, cf.get("line_number", ""))
inp["tags"] = inp.get("tags", []) + ["asterisk"]
out(inp)"#,
        ),
    );
    env.hook(
        "process_lead_creation_params.py",
        &py(r#"inp["name"] = "Call from %s on %s" % (cf["client_phone"], cf.get("line_number") or "outbound")
inp["price"] = 1500 if cf.get("answered_by") else 0
inp["status_id"] = 70013
inp["_embedded"]["tags"].append({"name": "phone-call"})
out(inp)"#),
    );
    env.hook(
        "process_call_params.py",
        &py(
            r#"inp["call_result"] = "%s status %s for %ss, manager %s" % (
    inp["direction"], inp["call_status"], inp["duration"], inp.get("responsible_user_id"))
out(inp)"#,
        ),
    );
    env.hook(
        "process_task_creation_params.py",
        &py(
            r#"inp["text"] = "Ring back %s about call %s" % (cf["client_phone"], cf["id"])
inp["complete_till"] = 2000000000
out(inp)"#,
        ),
    );
    env.hook("post_registration.sh", &sh_journal(&posted));
    let mut daemon = Daemon::start(&env).await;

    let fixtures = [
        "01-inbound-answered-recorded",
        "02-inbound-noanswer-missed",
        "08-outbound-101-answered",
        "09-outbound-101-noanswer",
        "10-internal-101-to-102",
        "15-burst-20-concurrent",
    ];
    // 01 first: its client is created by an answered incoming call.
    env.play(fixtures[0]).await;
    wait_for("01 registered", &daemon, || jsonl(&posted).len() == 1).await;
    for f in &fixtures[1..] {
        env.play(f).await;
    }
    let calls: Vec<Expected> = fixtures.iter().flat_map(|f| expected(f)).collect();
    let external: Vec<&Expected> = calls.iter().filter(|c| c.direction != "internal").collect();
    assert_eq!(external.len(), 24);
    wait_for("every call decided", &daemon, || {
        lines(&asked).len() >= external.len()
    })
    .await;
    env.settled(&daemon).await;
    let snap = env.snap();

    // need_registration: asked once per client call, at call_ended (the only stage
    // Kommo registers), never for the internal call.
    let mut asked_lines = lines(&asked);
    asked_lines.sort();
    let mut want: Vec<String> = external
        .iter()
        .map(|c| format!("{} call_ended", c.id))
        .collect();
    want.sort();
    assert_eq!(asked_lines, want);

    let skipped = ["79165550103", "79165550104", "79165550107"];
    let by_phone = |p: &str| external.iter().find(|c| c.client_phone == p).expect("call");
    for p in skipped {
        let c = by_phone(p);
        assert!(note(&snap, &c.id).is_empty(), "{p} not registered");
        assert!(snap.contacts_with_phone(p).is_empty(), "{p}: no contact");
    }
    // The rewritten number: the client's other number everywhere, not the caller id.
    let rewritten = by_phone("79165550106");
    assert!(snap.contacts_with_phone("79165550106").is_empty());
    let other = only_contact(&snap, "79990000106");
    assert_eq!(other.phones, vec!["+7 (999) 000-01-06".to_string()]);
    assert_eq!(note(&snap, &rewritten.id)[0].phone, "+7 (999) 000-01-06");

    let registered: Vec<&&Expected> = external
        .iter()
        .filter(|c| !skipped.contains(&c.client_phone.as_str()))
        .collect();
    assert_eq!(snap.calls.len(), registered.len(), "{:#?}", snap.calls);
    assert_eq!(
        snap.contacts.len(),
        18,
        "17 burst numbers and the client of 01-09"
    );
    assert_eq!(snap.leads.len(), 18);
    let posts = jsonl(&posted);
    assert_eq!(
        posts.len(),
        registered.len(),
        "post_registration once per call"
    );

    for c in &registered {
        let ctx = format!("{} {} ({})", c.fixture, c.id, c.client_phone);
        let phone = if c.client_phone.ends_with("0106") {
            "+7 (999) 000-01-06".to_string()
        } else {
            c.kommo_phone()
        };
        let contact = only_contact(&snap, &phone);
        // Made by this number's first call: 01 for the client of 01-09.
        let first = if c.client_phone == CLIENT {
            &calls[0]
        } else {
            **c
        };
        assert_eq!(
            contact.name,
            format!("Client {phone} (line {})", first.line_number),
            "{ctx}"
        );
        assert_eq!(contact.tags, vec!["kolokol", "asterisk"], "{ctx}");
        let lead = lead_of(&snap, contact);
        assert_eq!(
            lead.name,
            format!("Call from {} on {}", first.client_phone, first.line_number),
            "{ctx}"
        );
        assert_eq!(lead.price, if first.answered { 1500 } else { 0 }, "{ctx}");
        assert_eq!(lead.status_id, sk::STATUS_SECOND, "{ctx}");
        assert_eq!(lead.tags, vec!["kolokol", "phone-call"], "{ctx}");

        let n = note(&snap, &c.id);
        assert_eq!(n.len(), 1, "{ctx}");
        let n = n[0];
        let status = if c.answered { 4 } else { 6 };
        assert_eq!(n.call_status, Some(status), "{ctx}");
        assert_eq!(n.entity_id, lead.id, "{ctx}");
        assert_eq!(
            n.call_result.as_deref(),
            Some(
                format!(
                    "{} status {status} for {}s, manager {}",
                    c.direction, n.duration, n.responsible_user_id
                )
                .as_str()
            ),
            "{ctx}"
        );

        let tasks: Vec<_> = snap
            .tasks
            .iter()
            .filter(|t| t.text.ends_with(&format!("about call {}", c.id)))
            .collect();
        if c.wants_task() {
            assert_eq!(tasks.len(), 1, "{ctx}: {:#?}", snap.tasks);
            assert_eq!(
                tasks[0].text,
                format!("Ring back {} about call {}", c.client_phone, c.id)
            );
            assert_eq!(tasks[0].complete_till, 2000000000, "{ctx}");
            assert_eq!(tasks[0].entity_id, Some(lead.id), "{ctx}");
        } else {
            assert!(tasks.is_empty(), "{ctx}: {tasks:#?}");
        }

        // post_registration got the documented shape with Kommo's ids.
        let post = posts
            .iter()
            .find(|p| p["call_full"]["id"] == json!(c.id))
            .unwrap_or_else(|| panic!("{ctx}: post_registration not run"));
        assert_eq!(post["crm"], "kommo", "{ctx}");
        assert_eq!(post["call_stage"], "call_ended", "{ctx}");
        let r = &post["result"];
        assert_eq!(r["call"]["id"], json!(n.id), "{ctx}: {post}");
        assert_eq!(r["contact"]["id"], json!(contact.id), "{ctx}");
        assert_eq!(r["lead"]["id"], json!(lead.id), "{ctx}");
        match tasks.first() {
            Some(t) => assert_eq!(r["task"]["id"], json!(t.id), "{ctx}"),
            None => assert!(r["task"].is_null(), "{ctx}: {post}"),
        }
    }
    assert_eq!(
        snap.tasks.len(),
        registered.iter().filter(|c| c.wants_task()).count()
    );
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_tail());
}

// ------------------------------------------------------------------ 3. known clients, unsorted

/// Known clients are updated through `process_contact_update_params` /
/// `process_lead_update_params`; unknown numbers become "unsorted" incoming leads
/// shaped by `process_unsorted_creation_params` (`unsorted = true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_unsorted_hooks_shape_known_and_incoming_clients() {
    let env = env("unsorted = true\nupdate_responsible_on_answer = true", "").await;
    let ivan = env
        .kommo
        .add_contact("Ivan Petrov", "+7 916 123-45-67", sk::ADMIN_USER_ID);
    let deal = env
        .kommo
        .add_lead("Old deal", ivan, sk::STATUS_FIRST, sk::ADMIN_USER_ID);
    // A known client with no deal: the call goes on the contact.
    let olga = env
        .kommo
        .add_contact("Olga", "89165550100", sk::ADMIN_USER_ID);
    let contact_inputs = env.file("contact_update.jsonl");
    let lead_inputs = env.file("lead_update.jsonl");
    env.hook(
        "process_contact_update_params.py",
        &py(&format!(
            r#"with open({log:?}, "a") as f:
    f.write(json.dumps(inp) + "\n")
inp["name"] = "Known client, last call " + cf["id"]
out(inp)"#,
            log = contact_inputs.display().to_string()
        )),
    );
    env.hook(
        "process_lead_update_params.py",
        &py(&format!(
            r#"with open({log:?}, "a") as f:
    f.write(json.dumps(inp) + "\n")
inp["status_id"] = 70013
inp["price"] = 900
out(inp)"#,
            log = lead_inputs.display().to_string()
        )),
    );
    env.hook(
        "process_unsorted_creation_params.py",
        &py(r#"phone = inp["metadata"]["phone"]
if phone.endswith("0105"):
    out({})  # cancel: nothing created for this number
else:
    inp["source_name"] = "PBX line " + cf.get("line_number", "")
    inp["_embedded"]["leads"][0]["name"] = "Incoming call from " + phone
    inp["_embedded"]["contacts"][0]["name"] = "Caller " + phone
    out(inp)"#),
    );
    let mut daemon = Daemon::start(&env).await;

    // Ivan calls three times, one after the other: 101 answers, then 102, then nobody.
    let ivan_calls = [
        "01-inbound-answered-recorded",
        "04-inbound-ringgroup-102-answers",
        "02-inbound-noanswer-missed",
    ];
    for (i, f) in ivan_calls.iter().enumerate() {
        env.play(f).await;
        wait_for(&format!("{f} registered"), &daemon, || {
            env.snap().calls.len() > i
        })
        .await;
    }
    env.play("15-burst-20-concurrent").await;
    let burst = expected("15-burst-20-concurrent");
    // 0105's unsorted was cancelled: Kommo has nothing to put its call on.
    wait_for("the burst registered", &daemon, || {
        env.snap().calls.len() >= 3 + burst.len() - 1
    })
    .await;
    env.settled(&daemon).await;
    let snap = env.snap();
    assert_eq!(snap.calls.len(), 3 + burst.len() - 1, "{:#?}", snap.calls);

    // Ivan: still one contact and one deal, updated by the hooks after each call.
    let ivan_c = only_contact(&snap, CLIENT);
    assert_eq!(ivan_c.id, ivan);
    assert_eq!(ivan_c.name, "Known client, last call 1795304872.2");
    assert_eq!(ivan_c.responsible_user_id, USER_102, "102 answered last");
    let deal_l = lead_of(&snap, ivan_c);
    assert_eq!(deal_l.id, deal);
    assert_eq!(deal_l.name, "Old deal");
    assert_eq!(deal_l.status_id, sk::STATUS_SECOND);
    assert_eq!(deal_l.price, 900);
    assert_eq!(deal_l.responsible_user_id, USER_102);
    for f in ivan_calls {
        let c = &expected(f)[0];
        let n = note(&snap, &c.id);
        assert_eq!(n.len(), 1, "{f}");
        assert_eq!(
            (n[0].entity_type.as_str(), n[0].entity_id),
            ("lead", deal),
            "{f}"
        );
    }
    let missed_task: Vec<_> = snap
        .tasks
        .iter()
        .filter(|t| t.entity_id == Some(deal))
        .collect();
    assert_eq!(missed_task.len(), 1, "the missed call 02: {missed_task:#?}");
    assert_eq!(
        missed_task[0].responsible_user_id, USER_102,
        "the deal's manager"
    );
    // What the hooks were given: the entity id, and the new responsible only when
    // someone answered and it changes.
    let ids = |path: &Path| -> Vec<Value> { jsonl(path) };
    let contact_seen: Vec<Value> = ids(&contact_inputs)
        .into_iter()
        .filter(|v| v["id"] == json!(ivan))
        .collect();
    assert_eq!(
        contact_seen,
        vec![
            json!({"id": ivan, "responsible_user_id": USER_101}),
            json!({"id": ivan, "responsible_user_id": USER_102}),
            json!({"id": ivan}),
        ]
    );
    assert_eq!(
        jsonl(&lead_inputs),
        vec![
            json!({"id": deal, "responsible_user_id": USER_101}),
            json!({"id": deal, "responsible_user_id": USER_102}),
            json!({"id": deal}),
        ],
        "only Ivan has a deal to update"
    );

    // Olga (the burst's first caller, answered by 101): her contact, no new lead.
    let olga_call = &burst[0];
    assert_eq!(olga_call.client_phone, "79165550100");
    let olga_c = only_contact(&snap, "79165550100");
    assert_eq!(olga_c.id, olga);
    assert_eq!(
        olga_c.name,
        format!("Known client, last call {}", olga_call.id)
    );
    assert_eq!(olga_c.responsible_user_id, USER_101);
    assert!(olga_c.lead_ids.is_empty());
    let n = note(&snap, &olga_call.id);
    assert_eq!(
        (n[0].entity_type.as_str(), n[0].entity_id),
        ("contact", olga)
    );

    // Everyone else in the burst is new: one unsorted incoming lead each, shaped by
    // the hook; 0105's was cancelled, so Kommo has nothing for it.
    let cancelled = burst
        .iter()
        .find(|c| c.client_phone == "79165550105")
        .expect("0105");
    assert!(note(&snap, &cancelled.id).is_empty());
    assert!(snap.contacts_with_phone("79165550105").is_empty());
    assert_eq!(snap.unsorted.len(), burst.len() - 2, "{:#?}", snap.unsorted);
    for c in burst.iter().skip(1).filter(|c| c.id != cancelled.id) {
        let phone = c.kommo_phone();
        let ctx = format!("{} ({})", c.id, c.client_phone);
        let u: Vec<_> = snap
            .unsorted
            .iter()
            .filter(|u| u.source_uid == c.id)
            .collect();
        assert_eq!(u.len(), 1, "{ctx}");
        let u = u[0];
        assert_eq!(
            u.source_name,
            format!("PBX line {}", c.line_number),
            "{ctx}"
        );
        assert_eq!(u.metadata["uniq"], json!(c.id), "{ctx}");
        assert_eq!(u.metadata["phone"], json!(phone), "{ctx}");
        let contact = only_contact(&snap, &c.client_phone);
        assert_eq!(Some(contact.id), u.contact_id, "{ctx}");
        assert_eq!(contact.name, format!("Caller {phone}"), "{ctx}");
        let lead = lead_of(&snap, contact);
        assert_eq!(lead.id, u.lead_id, "{ctx}");
        assert_eq!(lead.name, format!("Incoming call from {phone}"), "{ctx}");
        assert_eq!(lead.status_id, sk::STATUS_UNSORTED, "{ctx}");
        let n = note(&snap, &c.id);
        assert_eq!(n.len(), 1, "{ctx}: one call note, not two");
        assert_eq!(
            (n[0].entity_type.as_str(), n[0].entity_id),
            ("lead", lead.id),
            "{ctx}"
        );
        assert_eq!(
            n[0].call_status,
            Some(if c.answered { 4 } else { 6 }),
            "{ctx}"
        );
        let tasks = snap
            .tasks
            .iter()
            .filter(|t| t.entity_id == Some(lead.id))
            .count();
        assert_eq!(tasks, usize::from(c.wants_task()), "{ctx}");
    }
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_tail());
}

// ------------------------------------------------------------------ 4. failing hooks

/// A shell hook that notes its run in `log`, then does `then`.
fn sh_failing(log: &Path, then: &str) -> String {
    format!(
        "#!/bin/sh\ninput=$(cat)\necho ran >> '{}'\n{then}\n",
        log.display()
    )
}

/// Customizations that fail every way the contract names (non-zero exit, a signal,
/// garbage and non-JSON output, state "error", a hang past the configured timeout) and
/// ones that cancel: every call is still registered exactly once with kolokol's
/// defaults (or without the cancelled request), and the daemon keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_hooks_fall_back_to_defaults_and_lose_nothing() {
    let env = env(
        "update_responsible_on_answer = true",
        "[customizations.timeouts]\nprocess_lead_creation_params = \"300ms\"\nprocess_contact_update_params = \"300ms\"",
    )
    .await;
    let log = |name: &str| env.file(&format!("{name}.ran"));
    env.hook(
        "need_registration",
        &sh_failing(&log("need_registration"), "echo 'this is not JSON {'"),
    );
    env.hook(
        "process_client_phone",
        &sh_failing(
            &log("process_client_phone"),
            r#"echo '{"state":"error","message":"phone book unavailable"}'"#,
        ),
    );
    env.hook(
        "process_contact_creation_params",
        &sh_failing(
            &log("process_contact_creation_params"),
            "echo 'Fatal error: boom' >&2\nexit 3",
        ),
    );
    env.hook(
        "process_lead_creation_params",
        &sh_failing(&log("process_lead_creation_params"), "sleep 30"),
    );
    env.hook(
        "process_call_params",
        &sh_failing(
            &log("process_call_params"),
            r#"echo '{"state":"success","data":"garbage"}'"#,
        ),
    );
    // Burst callers: cancelled (no task); everyone else: killed by a signal (default).
    env.hook(
        "process_task_creation_params",
        &sh_failing(
            &log("process_task_creation_params"),
            r#"case "$input" in
  *'"client_phone":"7916555'*) echo '{"state":"success","data":null}' ;;
  *) kill -9 $$ ;;
esac"#,
        ),
    );
    env.hook(
        "post_registration",
        &sh_failing(&log("post_registration"), "exit 1"),
    );
    env.hook(
        "process_contact_update_params",
        &sh_failing(&log("process_contact_update_params"), "sleep 30"),
    );
    env.hook(
        "process_lead_update_params",
        &sh_failing(
            &log("process_lead_update_params"),
            r#"echo '{"state":"success","data":[]}'"#,
        ),
    );
    let mut daemon = Daemon::start(&env).await;

    // 01 makes the client (101 answered), 04 updates it (102 answered), then the rest.
    let first = [
        "01-inbound-answered-recorded",
        "04-inbound-ringgroup-102-answers",
    ];
    for (i, f) in first.iter().enumerate() {
        env.play(f).await;
        wait_for(&format!("{f} registered"), &daemon, || {
            env.snap().calls.len() > i
        })
        .await;
    }
    let rest = [
        "02-inbound-noanswer-missed",
        "03-inbound-busy",
        "09-outbound-101-noanswer",
        "13-inbound-abandoned-while-ringing",
        "15-burst-20-concurrent",
    ];
    for f in rest {
        env.play(f).await;
    }
    let mut calls: Vec<Expected> = first
        .iter()
        .chain(&rest)
        .flat_map(|f| expected(f))
        .collect();
    wait_for("every call registered", &daemon, || {
        env.snap().calls.len() >= calls.len()
    })
    .await;
    env.settled(&daemon).await;
    // Still going: one more call after all those failures.
    env.play("17-inbound-queue-local-members-102-answers").await;
    calls.extend(expected("17-inbound-queue-local-members-102-answers"));
    wait_for("the call after the failures", &daemon, || {
        env.snap().calls.len() >= calls.len()
    })
    .await;
    env.settled(&daemon).await;
    let snap = env.snap();
    assert_eq!(calls.len(), 27);

    // The scripts really ran, once per call (or per request).
    let ran = |name: &str| lines(&log(name)).len();
    let new_numbers = 21;
    let client_calls = calls.iter().filter(|c| c.client_phone == CLIENT).count();
    assert_eq!(ran("need_registration"), calls.len());
    assert_eq!(ran("process_client_phone"), calls.len());
    assert_eq!(ran("process_contact_creation_params"), new_numbers);
    assert_eq!(ran("process_lead_creation_params"), new_numbers);
    assert_eq!(ran("process_call_params"), calls.len());
    assert_eq!(ran("post_registration"), calls.len());
    let missed = calls.iter().filter(|c| c.wants_task()).count();
    assert_eq!(ran("process_task_creation_params"), missed);
    // Updates: every call of a client who existed before it.
    assert_eq!(ran("process_contact_update_params"), client_calls - 1);
    assert_eq!(ran("process_lead_update_params"), client_calls - 1);

    // Every call once, with kolokol's own parameters.
    assert_eq!(snap.calls.len(), calls.len(), "{:#?}", snap.calls);
    for c in &calls {
        let ctx = format!("{} {} ({})", c.fixture, c.id, c.client_phone);
        let n = note(&snap, &c.id);
        assert_eq!(n.len(), 1, "{ctx}");
        let n = n[0];
        assert_eq!(n.phone, c.kommo_phone(), "{ctx}: the default normalisation");
        let (status, result) = if c.answered {
            (4, "Answered")
        } else if c.busy() {
            (7, "Busy")
        } else {
            (6, "")
        };
        assert_eq!(n.call_status, Some(status), "{ctx}");
        if !result.is_empty() {
            assert_eq!(n.call_result.as_deref(), Some(result), "{ctx}");
        }
        let contact = only_contact(&snap, &c.client_phone);
        assert_eq!(
            contact.name,
            format!("Contact {}", c.kommo_phone()),
            "{ctx}"
        );
        let lead = lead_of(&snap, contact);
        assert_eq!(n.entity_id, lead.id, "{ctx}");
    }
    assert_eq!(snap.contacts.len(), new_numbers);
    assert_eq!(snap.leads.len(), new_numbers);
    for l in &snap.leads {
        assert!(
            l.name.ends_with(" - incoming") || l.name.ends_with(" - missed incoming"),
            "default lead name: {}",
            l.name
        );
    }
    // The contact update timed out: the default update made 102 (who answered 04)
    // responsible; the lead update was cancelled: the lead kept 101.
    let client = only_contact(&snap, CLIENT);
    assert_eq!(client.responsible_user_id, USER_102);
    assert_eq!(lead_of(&snap, client).responsible_user_id, USER_101);
    // Tasks: the client's missed calls got kolokol's task (the script was killed);
    // the burst's were cancelled.
    let client_lead = lead_of(&snap, client).id;
    assert_eq!(snap.tasks.len(), 4, "{:#?}", snap.tasks);
    assert!(snap.tasks.iter().all(|t| t.entity_id == Some(client_lead)));
    assert_eq!(
        snap.tasks
            .iter()
            .filter(|t| t.text
                == format!(
                    "Call back {} on a missed call from a number +{CLIENT}",
                    client.name
                ))
            .count(),
        3,
        "02, 03, 13: {:#?}",
        snap.tasks
    );

    // Counted and logged as what they were.
    let m = env.metrics().await;
    let fail = |reason: &str| {
        metric(
            &m,
            &format!("kolokol_hook_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(fail("invalid_json") >= calls.len() as u64, "{m}");
    assert!(fail("not_success") >= calls.len() as u64, "{m}");
    assert!(
        fail("timeout") >= (new_numbers + client_calls - 1) as u64,
        "{m}"
    );
    assert!(
        fail("exit") >= (new_numbers + calls.len() + 4) as u64,
        "contact creation, post_registration, killed task scripts: {m}"
    );
    assert!(
        metric(&m, "kolokol_hook_cancelled_total") >= (missed - 4 + client_calls - 1) as u64,
        "{m}"
    );
    let text = daemon.log_text();
    assert!(text.contains("Fatal error: boom"), "stderr tail in the log");
    assert!(text.contains("phone book unavailable"));
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_tail());
}

// ------------------------------------------------------------------ 5. durations

/// Replayed at the recorded pace, the call notes carry the talk time (not the whole
/// call's length), and the recording link of the outgoing call serves its mp3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_pace_gives_talk_durations_and_playable_links() {
    let env = env("", "").await;
    let mut daemon = Daemon::start(&env).await;
    // (fixture, talk seconds from the recording notes)
    let talks = [
        ("01-inbound-answered-recorded", 4),
        ("08-outbound-101-answered", 3),
    ];
    for (i, (f, _)) in talks.iter().enumerate() {
        let replay = Replay::from_fixture(fixtures_dir().join("ami").join(format!("{f}.ami")))
            .expect("fixture")
            .timed(true);
        kolokol::sandbox::demo::write_recordings(&env.dir.path().join("spool"), replay.bytes());
        env.ami.play(&replay).await;
        wait_for(&format!("{f} registered"), &daemon, || {
            env.snap().calls.len() > i
        })
        .await;
    }
    env.settled(&daemon).await;
    let snap = env.snap();
    let journal = journal(&env);
    for (f, talk) in talks {
        let c = &expected(f)[0];
        let n = note(&snap, &c.id);
        assert_eq!(n.len(), 1, "{f}");
        let d = n[0].duration;
        // The replay keeps the recorded pauses; a busy machine may add a second.
        assert!(
            (talk - 1..=talk + 1).contains(&d),
            "{f}: talk {talk} s, note says {d}"
        );
        assert_eq!(Some(d), journal[&c.id]["talk_duration"].as_i64(), "{f}");
        let whole = journal[&c.id]["duration"].as_i64().unwrap_or(0);
        assert!(
            whole > d,
            "{f}: the call ({whole} s) is longer than the talk ({d} s)"
        );
    }
    let out = note(&snap, &expected(talks[1].0)[0].id)[0]
        .link
        .clone()
        .expect("08 recorded");
    let mut served = false;
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        if let Ok(r) = reqwest::get(&out).await
            && r.status() == 200
            && r.headers()["content-type"] == "audio/mpeg"
        {
            served = r.bytes().await.map(|b| b.len() > 1000).unwrap_or(false);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the outgoing call's mp3 is served at {out}");
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_tail());
}
