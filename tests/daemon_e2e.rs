//! The real `kolokol run` binary against the simulated PBX (recorded fixtures over real
//! TCP) and the sandbox Kommo and Bitrix24 (real HTTP), with a real SQLite state file.
//! Each test checks what a manager would see in the CRMs: every call exactly once.

mod fixture_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kolokol::sandbox::ami_server::Replay;
use kolokol::sandbox::demo::{DemoWorld, SCENARIOS};

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ami")
        .join(format!("{name}.ami"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Daemon {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    starts: usize,
}

impl Daemon {
    fn start(config: &Path, log: &Path) -> Daemon {
        let mut d = Daemon {
            child: None,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            starts: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kolokol starts");
        self.child = Some(child);
        self.starts += 1;
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit time and status.
    fn terminate(&mut self) -> (Duration, Option<i32>) {
        let Some(mut c) = self.child.take() else {
            return (Duration::ZERO, None);
        };
        let start = Instant::now();
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return (start.elapsed(), status.code());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                let _ = c.wait();
                return (start.elapsed(), None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct World {
    world: DemoWorld,
    dir: tempfile::TempDir,
    config: PathBuf,
    http: String,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let world = DemoWorld::start(dir.path()).await.expect("demo world");
    world.kommo.set_rate_limit(1000.0);
    world.bitrix.set_rate(1000.0, 1000);
    let http = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.toml");
    // The sandboxes run without their rate limits here; so does kolokol's client side.
    let toml = world
        .config_toml(&http)
        .replace("[kommo]\n", "[kommo]\nrate_limit = 1000.0\n")
        .replace(
            "[bitrix24]\n",
            "[bitrix24]\nrate_per_sec = 1000.0\nburst = 1000\n",
        );
    std::fs::write(&config, toml).expect("config written");
    World {
        world,
        dir,
        config,
        http,
    }
}

/// Wait for `cond` up to `limit`; the assertions that follow say what is missing.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            eprintln!("timed out waiting for {what}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kommo call notes by `uniq` (our call id) and Bitrix24 finishes by EXTERNAL_CALL_ID.
fn registrations(w: &World) -> (BTreeMap<String, usize>, BTreeMap<String, u32>) {
    let mut kommo = BTreeMap::new();
    for c in w.world.kommo.snapshot().calls {
        *kommo.entry(c.uniq.unwrap_or_default()).or_insert(0) += 1;
    }
    // Per call: how many Bitrix24 calls were registered AND finished for it. A finish
    // repeated after a kill mid-request is refused by Bitrix24 (the card stays one
    // call), so it is not a duplicate; a second registered call would be.
    let mut bitrix = BTreeMap::new();
    for c in w.world.bitrix.snapshot().calls.values() {
        if c.finish.is_some() {
            *bitrix.entry(c.external_call_id.clone()).or_insert(0u32) += 1;
        }
    }
    (kommo, bitrix)
}

fn journal_calls(w: &World) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["calls", "--json", "--config"])
        .arg(&w.config)
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
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Every call of every recorded scenario, played as recorded: registered exactly once
/// in both CRMs (internal calls in neither), journaled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_call_is_registered_exactly_once() {
    let w = world().await;
    let log = w.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&w.config, &log);
    assert!(
        w.world.ami.wait_logged_in(1, Duration::from_secs(20)).await,
        "daemon logs in: {}",
        daemon.log_text()
    );

    let names = fixture_support::CALL_FIXTURES;
    for n in names {
        let replay = Replay::from_fixture(fixture(n))
            .expect("fixture")
            .timed(false);
        kolokol::sandbox::demo::write_recordings(&w.dir.path().join("spool"), replay.bytes());
        w.world.ami.play(&replay).await;
    }
    // 35 calls, one of them internal.
    let external = 34;
    wait_until("all calls registered", Duration::from_secs(60), || {
        let (k, b) = registrations(&w);
        k.len() >= external && b.len() >= external
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (kommo, bitrix) = registrations(&w);
    assert_eq!(kommo.len(), external, "kommo calls: {kommo:?}");
    assert!(
        kommo.values().all(|n| *n == 1),
        "a call registered twice in Kommo: {kommo:?}"
    );
    assert_eq!(bitrix.len(), external, "bitrix finishes: {bitrix:?}");
    assert!(
        bitrix.values().all(|n| *n == 1),
        "a call finished twice in Bitrix24: {bitrix:?}"
    );
    assert_eq!(
        kommo.keys().collect::<BTreeSet<_>>(),
        bitrix.keys().collect::<BTreeSet<_>>()
    );

    // Bitrix24 cards: every card shown is hidden again or closed by the finish, and
    // the recorded call has its recording attached (after its finish).
    let b24 = w.world.bitrix.snapshot();
    for call in b24.calls.values() {
        let mut open = BTreeSet::new();
        for (action, user) in b24.cards_of(&call.call_id) {
            match action.as_str() {
                "show" => {
                    open.insert(user);
                }
                "hide" | "finish" => {
                    open.remove(&user);
                }
                _ => {}
            }
        }
        assert!(
            open.is_empty(),
            "cards left open for {}: {open:?}",
            call.external_call_id
        );
    }
    let b24_recorded = b24
        .call_by_external("1795304861.0")
        .expect("fixture 01 registered in Bitrix24");
    assert!(
        !b24_recorded.records.is_empty(),
        "recording attached in Bitrix24"
    );
    assert_eq!(
        b24_recorded
            .finish
            .as_ref()
            .and_then(|f| f["STATUS_CODE"].as_str()),
        Some("200")
    );
    let missed = b24
        .call_by_external("1795304872.2")
        .expect("fixture 02 registered in Bitrix24");
    assert_eq!(
        missed
            .finish
            .as_ref()
            .and_then(|f| f["STATUS_CODE"].as_str()),
        Some("304"),
        "missed call finished as missed"
    );

    // The recorded call carries a signed link that serves the converted mp3.
    let snap = w.world.kommo.snapshot();
    let recorded = snap
        .calls
        .iter()
        .find(|c| c.uniq.as_deref() == Some("1795304861.0"))
        .expect("fixture 01 registered");
    assert_eq!(recorded.call_status, Some(4), "answered = talked");
    let status_of = |id: &str| {
        snap.calls
            .iter()
            .find(|c| c.uniq.as_deref() == Some(id))
            .and_then(|c| c.call_status)
    };
    assert_eq!(status_of("1795304872.2"), Some(6), "fixture 02: no answer");
    assert_eq!(status_of("1795304895.4"), Some(7), "fixture 03: busy");
    // One contact for the one client number of fixtures 01-13; tasks only for calls
    // nobody answered (missed incoming, unanswered outgoing).
    assert_eq!(snap.contacts_with_phone("79161234567").len(), 1);
    let unanswered = snap
        .calls
        .iter()
        .filter(|c| c.call_status != Some(4))
        .count();
    assert!(
        !snap.tasks.is_empty() && snap.tasks.len() <= unanswered,
        "tasks {} for {unanswered} unanswered calls",
        snap.tasks.len()
    );
    let link = recorded.link.clone().expect("recording link");
    assert!(
        link.starts_with(&format!("http://{}/records/", w.http)),
        "{link}"
    );
    let mut body = Vec::new();
    for _ in 0..100 {
        let resp = reqwest::get(&link).await.expect("link answers");
        if resp.status() == 200 {
            assert_eq!(resp.headers()["content-type"], "audio/mpeg");
            body = resp.bytes().await.expect("body").to_vec();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.len() > 1000, "mp3 served");

    let (took, code) = daemon.terminate();
    assert_eq!(code, Some(0), "clean exit; log:\n{}", daemon.log_text());
    assert!(took < Duration::from_secs(10), "SIGTERM exit took {took:?}");

    let journal = journal_calls(&w);
    let ids: BTreeSet<String> = journal
        .iter()
        .map(|c| c["call_full"]["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(journal.len(), 35, "every call journaled once");
    assert_eq!(ids.len(), 35);
    let internal: Vec<_> = journal
        .iter()
        .filter(|c| c["call_full"]["direction"] == "internal")
        .collect();
    assert_eq!(internal.len(), 1);
}

/// `kill -9` at random points of a long replay, restarted each time: every call still
/// registered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_and_duplicates_nothing() {
    let w = world().await;
    w.world.ami.hold_when_alone(true);
    let log = w.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&w.config, &log);
    assert!(w.world.ami.wait_logged_in(1, Duration::from_secs(20)).await);

    // Two rounds of every scenario as new calls, overlapping, 8x speed.
    let scenarios: Vec<_> = SCENARIOS.iter().chain(SCENARIOS.iter()).collect();
    let external = scenarios
        .iter()
        .filter(|s| !s.name.contains("internal"))
        .count();
    let world = std::sync::Arc::new(w);
    let player = {
        let world = world.clone();
        tokio::spawn(async move {
            let mut plays = tokio::task::JoinSet::new();
            for s in scenarios {
                let world = world.clone();
                plays.spawn(async move { world.world.play(s, 8.0).await });
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            while plays.join_next().await.is_some() {}
        })
    };
    // Kill at random moments of the replay. Bytes already in the socket of a killed
    // process are gone for good (as with a real Asterisk), which no design can recover;
    // so the PBX goes quiet for a moment before each kill and the test is about what
    // kolokol itself must not lose: its call state, its queue and its CRM deliveries,
    // killed in the middle of their work.
    let mut kills = 0;
    while !player.is_finished() {
        let pause = Duration::from_millis(rand::random::<u64>() % 900 + 200);
        tokio::time::sleep(pause).await;
        world.world.ami.pause(true);
        tokio::time::sleep(Duration::from_millis(150)).await;
        daemon.kill9();
        kills += 1;
        daemon.spawn();
        world.world.ami.pause(false);
    }
    assert!(kills >= 3, "only {kills} kills");
    let w = &*world;
    wait_until(
        "all calls registered after the kills",
        Duration::from_secs(90),
        || {
            let (k, b) = registrations(w);
            k.len() >= external && b.len() >= external
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (kommo, bitrix) = registrations(w);
    if kommo.len() != external {
        let log = daemon.log_text();
        let interesting: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("resync")
                    || l.contains("call_ended")
                    || l.contains("demo PBX")
                    || l.contains("outbound")
                    || l.contains("not registered")
                    || l.contains("kill")
            })
            .collect();
        eprintln!("{}", interesting.join("\n"));
    }
    assert_eq!(kommo.len(), external, "after {kills} kills: {kommo:?}");
    assert!(
        kommo.values().all(|n| *n == 1),
        "duplicate in Kommo: {kommo:?}"
    );
    assert_eq!(bitrix.len(), external, "after {kills} kills: {bitrix:?}");
    assert!(
        bitrix.values().all(|n| *n == 1),
        "duplicate finish in Bitrix24: {bitrix:?}"
    );
}

/// The CRMs answer 503 and 429 (Retry-After) for a while: everything arrives afterwards,
/// each call's Bitrix24 steps in order (register before finish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_outage_then_everything_is_delivered() {
    let w = world().await;
    w.world.kommo.fail_next(12, 503);
    w.world.kommo.set_retry_after(1);
    w.world.bitrix.fail_next(
        "telephony.externalcall.register",
        6,
        503,
        "QUERY_LIMIT_EXCEEDED",
        "Too many requests",
    );
    let log = w.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&w.config, &log);
    assert!(w.world.ami.wait_logged_in(1, Duration::from_secs(20)).await);
    for n in [
        "01-inbound-answered-recorded",
        "02-inbound-noanswer-missed",
        "08-outbound-101-answered",
    ] {
        let replay = Replay::from_fixture(fixture(n))
            .expect("fixture")
            .timed(false);
        w.world.ami.play(&replay).await;
    }
    wait_until("delivery after the outage", Duration::from_secs(60), || {
        let (k, b) = registrations(&w);
        k.len() >= 3 && b.len() >= 3
    })
    .await;
    let (kommo, bitrix) = registrations(&w);
    assert!(
        kommo.values().all(|n| *n == 1) && kommo.len() == 3,
        "{kommo:?}"
    );
    assert!(
        bitrix.values().all(|n| *n == 1) && bitrix.len() == 3,
        "{bitrix:?}"
    );
    let snap = w.world.kommo.snapshot();
    let failed = snap.requests.iter().filter(|r| r.status == 503).count();
    assert!(failed >= 12, "the sandbox really failed requests: {failed}");
    let (_, code) = daemon.terminate();
    assert_eq!(code, Some(0));
}

/// The AMI server drops the connection in the middle of a call and comes back: the call
/// is still registered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ami_drop_mid_call_still_registers_the_call() {
    let w = world().await;
    w.world.ami.hold_when_alone(true);
    let log = w.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&w.config, &log);
    assert!(w.world.ami.wait_logged_in(1, Duration::from_secs(20)).await);
    let scenario = SCENARIOS
        .iter()
        .find(|s| s.name.starts_with("01-"))
        .expect("scenario 01");
    let play = {
        let ami = w.world.ami.clone();
        let replay = Replay::from_ami_bytes(scenario.ami, Some(scenario.timeline))
            .timed(true)
            .speed(2.0)
            .fresh_ids(true);
        tokio::spawn(async move { ami.play(&replay).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.world.ami.drop_connections();
    play.await.expect("replay finished");
    wait_until(
        "the call registered after the reconnect",
        Duration::from_secs(40),
        || {
            let (k, b) = registrations(&w);
            k.len() >= 1 && b.len() >= 1
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (kommo, bitrix) = registrations(&w);
    assert_eq!(kommo.len(), 1, "{kommo:?}");
    assert_eq!(bitrix.len(), 1, "{bitrix:?}");
    assert!(daemon.log_text().contains("resync"), "the tracker resynced");
    daemon.terminate();
}

/// SIGTERM in the middle of the burst: exits within 10 s; after a restart every call of
/// the burst is registered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_burst_then_restart_resumes() {
    let w = world().await;
    w.world.ami.hold_when_alone(true);
    w.world.kommo.set_latency(Duration::from_millis(30));
    let log = w.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&w.config, &log);
    assert!(w.world.ami.wait_logged_in(1, Duration::from_secs(20)).await);
    let replay = Replay::from_fixture(fixture("15-burst-20-concurrent"))
        .expect("burst")
        .timed(true)
        .speed(4.0);
    let play = {
        let ami = w.world.ami.clone();
        tokio::spawn(async move { ami.play(&replay).await })
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (took, code) = daemon.terminate();
    assert_eq!(code, Some(0), "{}", daemon.log_text());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    daemon.spawn();
    play.await.expect("replay finished");
    wait_until("the burst registered", Duration::from_secs(60), || {
        let (k, b) = registrations(&w);
        k.len() >= 20 && b.len() >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (kommo, bitrix) = registrations(&w);
    if kommo.len() != 20 {
        let log = daemon.log_text();
        let interesting: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("resync")
                    || l.contains("call_ended")
            })
            .collect();
        eprintln!("{}", interesting.join("\n"));
    }
    assert_eq!(kommo.len(), 20, "{kommo:?}");
    assert!(kommo.values().all(|n| *n == 1));
    assert_eq!(bitrix.len(), 20, "{bitrix:?}");
    assert!(bitrix.values().all(|n| *n == 1));
    daemon.terminate();
}

/// A slow `process_record_file_path` customization holds up only its own call: a call
/// that ends after the recorded one is registered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_recording_hook_does_not_hold_up_other_calls() {
    use std::os::unix::fs::PermissionsExt;
    let w = world().await;
    let hooks = w.dir.path().join("customizations");
    std::fs::create_dir_all(&hooks).expect("hooks dir");
    let script = hooks.join("process_record_file_path");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat >/dev/null\nsleep 3\necho '{\"state\":\"success\",\"data\":{}}'\n",
    )
    .expect("hook written");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let log = w.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&w.config, &log);
    assert!(w.world.ami.wait_logged_in(1, Duration::from_secs(20)).await);
    for n in ["01-inbound-answered-recorded", "02-inbound-noanswer-missed"] {
        let replay = Replay::from_fixture(fixture(n))
            .expect("fixture")
            .timed(false);
        kolokol::sandbox::demo::write_recordings(&w.dir.path().join("spool"), replay.bytes());
        w.world.ami.play(&replay).await;
    }
    wait_until("both calls registered", Duration::from_secs(30), || {
        registrations(&w).0.len() >= 2
    })
    .await;
    let order: Vec<String> = w
        .world
        .kommo
        .snapshot()
        .calls
        .iter()
        .filter_map(|c| c.uniq.clone())
        .collect();
    assert_eq!(
        order,
        vec!["1795304872.2".to_string(), "1795304861.0".to_string()],
        "the unrecorded call 02 went first; log:\n{}",
        daemon.log_text()
    );
    daemon.terminate();
}
