//! A synthetic office day through the real `kolokol run` binary.
//!
//! The simulated PBX (recorded fixture calls replayed with fresh ids over a real AMI TCP
//! connection), the sandbox Kommo and the sandbox Bitrix24 (real HTTP, zero latency, rate
//! limits lifted on both sides) run in this process; kolokol runs as a child process with
//! a real SQLite state file, exactly as in production. The bench pushes `CALLS` calls
//! (the fixture scenarios round-robin, each a new call), at most `CONCURRENCY` at once,
//! each replayed `SPEED` times faster than recorded, and measures:
//!
//! * wall time and calls/s until every external call is registered in both CRMs;
//! * latency from the call's last AMI event (≈ `call_ended`) to the sandbox receiving
//!   the Kommo call note (`POST /api/v4/calls` or the unsorted call) and the Bitrix24
//!   `telephony.externalcall.finish`;
//! * the daemon's peak RSS (`VmHWM`) and CPU seconds (`utime + stime`);
//!
//! and fails (exit 1) if a call is missing or registered twice.
//!
//! Run: `cargo bench --bench daemon_day` (env `CALLS` = 10000, `CONCURRENCY` = 200,
//! `SPEED` = 20, `RATE` = calls started per second (0 = as fast as CONCURRENCY
//! allows), `STORAGE_CONCURRENCY` = `[storage] concurrency` of the daemon (its default
//! unless set), `RECORDINGS` = 1 (MixMonitor files written, converted to mp3 by
//! kolokol), `DAEMON_WRAPPER` = a tool to run the daemon under (e.g. `heaptrack`),
//! `RUST_LOG` = info for the daemon, `TIMEOUT` = 900 s, `KEEP` = 1 keeps the
//! temp dir with the daemon log and state).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kolokol::sandbox::ami_server::Replay;
use kolokol::sandbox::demo::{DemoWorld, SCENARIOS, write_recordings};

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// External calls (not internal) a scenario's recording contains, from
/// `tests/fixtures/expected/<name>.json`.
fn external_calls(name: &str) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/expected")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).expect("expected fixture file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("expected fixture JSON");
    v["calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .filter(|c| c["direction"] != "internal")
                .count()
        })
        .unwrap_or(0)
}

/// `VmHWM`/`VmRSS` of a process, in kB.
fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User and system CPU seconds of a process.
fn proc_cpu(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime / tick, stime / tick))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = env_num("CALLS", 10_000);
    let concurrency: usize = env_num("CONCURRENCY", 200);
    let speed: f64 = env_num("SPEED", 20.0);
    let recordings = env_num("RECORDINGS", 1u8) == 1;
    let timeout = Duration::from_secs(env_num("TIMEOUT", 900u64));
    // Calls started per second (0 = as fast as CONCURRENCY allows).
    let rate: f64 = env_num("RATE", 0.0);
    let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());

    let dir = tempfile::tempdir().expect("temp dir");
    let world = Arc::new(DemoWorld::start(dir.path()).await.expect("demo world"));
    world.kommo.set_rate_limit(1_000_000.0);
    world.bitrix.set_rate(1_000_000.0, 1_000_000);
    let mut kommo_seen = world.kommo.watch_calls();
    let mut bitrix_seen = world.bitrix.watch_finishes();
    let http = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.toml");
    let mut toml = world
        .config_toml(&http)
        .replace("[kommo]\n", "[kommo]\nrate_limit = 1000000.0\n")
        .replace(
            "[bitrix24]\n",
            "[bitrix24]\nrate_per_sec = 1000000.0\nburst = 1000000\n",
        );
    // `[storage] concurrency` (deliveries in flight per CRM); the default unless set.
    let storage_concurrency: usize = env_num("STORAGE_CONCURRENCY", 0);
    if storage_concurrency > 0 {
        toml = toml.replace(
            "[storage]\n",
            &format!("[storage]\nconcurrency = {storage_concurrency}\n"),
        );
    }
    std::fs::write(&config, toml).expect("config written");
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let daemon = Daemon(
        // `DAEMON_WRAPPER=heaptrack` (or `valgrind`, ...) runs the daemon under a tool;
        // RSS and CPU figures are then the wrapper's.
        match std::env::var("DAEMON_WRAPPER")
            .ok()
            .filter(|w| !w.is_empty())
        {
            Some(w) => {
                let mut c = Command::new(w);
                c.arg(BIN);
                c
            }
            None => Command::new(BIN),
        }
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", &log_level)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("kolokol starts"),
    );
    let pid = daemon.0.id();
    if !world.ami.wait_logged_in(1, Duration::from_secs(60)).await {
        eprintln!(
            "kolokol did not log in to the simulated PBX; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::process::exit(1);
    }
    // Let it finish starting (CRM account checks) before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let cpu_before = proc_cpu(pid).unwrap_or((0.0, 0.0));

    let replays: Vec<(Replay, usize)> = SCENARIOS
        .iter()
        .map(|s| {
            let r = Replay::from_ami_bytes(s.ami, Some(s.timeline))
                .timed(speed > 0.0)
                .speed(speed.max(0.001))
                .fresh_ids(true);
            (r, external_calls(s.name))
        })
        .collect();
    let expected: usize = (0..calls).map(|i| replays[i % replays.len()].1).sum();

    // Every Uniqueid of a play → the play; when each play's last event was pushed.
    let owner: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let pushed: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; calls]));
    let id_re = regex::Regex::new(r"\b1\d{9}\.\d{1,9}\b").expect("constant regex");
    let spool = dir.path().join("spool");

    println!(
        "daemon_day: {calls} calls ({expected} external), concurrency {concurrency}, rate {rate}/s (0 = unpaced), speed x{speed}, [storage] concurrency {}, recordings {}, RUST_LOG={log_level}",
        if storage_concurrency > 0 {
            storage_concurrency.to_string()
        } else {
            "default".into()
        },
        if recordings { "on" } else { "off" }
    );
    let started = Instant::now();
    let player = {
        let world = world.clone();
        let owner = owner.clone();
        let pushed = pushed.clone();
        let replays = Arc::new(replays);
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let mut plays = tokio::task::JoinSet::new();
            for i in 0..calls {
                if rate > 0.0 {
                    tokio::time::sleep_until(
                        (started + Duration::from_secs_f64(i as f64 / rate)).into(),
                    )
                    .await;
                }
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                let (world, owner, pushed, replays, re, spool) = (
                    world.clone(),
                    owner.clone(),
                    pushed.clone(),
                    replays.clone(),
                    id_re.clone(),
                    spool.clone(),
                );
                plays.spawn(async move {
                    let replay = &replays[i % replays.len()].0;
                    world
                        .ami
                        .play_with(replay, |bytes| {
                            if recordings {
                                write_recordings(&spool, bytes);
                            }
                            let mut o = owner.lock().expect("owner map");
                            for m in re.find_iter(&String::from_utf8_lossy(bytes)) {
                                o.insert(m.as_str().to_string(), i);
                            }
                        })
                        .await;
                    pushed.lock().expect("push times")[i] = Some(Instant::now());
                    drop(permit);
                });
                while plays.try_join_next().is_some() {}
            }
            while plays.join_next().await.is_some() {}
        })
    };

    // Collect deliveries until every external call is in both CRMs.
    let mut kommo: Vec<(Option<String>, Instant)> = Vec::with_capacity(expected);
    let mut bitrix: Vec<(String, Instant)> = Vec::with_capacity(expected);
    let mut peak_rss_seen = 0u64;
    let mut last_report = Instant::now();
    let deadline = started + timeout;
    while (kommo.len() < expected || bitrix.len() < expected) && Instant::now() < deadline {
        tokio::select! {
            Some(c) = kommo_seen.recv() => kommo.push((c.uniq, c.at)),
            Some(f) = bitrix_seen.recv() => bitrix.push((f.external_call_id, f.at)),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            let rss = proc_status_kb(pid, "VmRSS").unwrap_or(0);
            peak_rss_seen = peak_rss_seen.max(rss);
            let mb = |k| proc_status_kb(pid, k).unwrap_or(0) as f64 / 1024.0;
            eprintln!(
                "  {:>6.1}s  kommo {:>6}/{expected}  bitrix24 {:>6}/{expected}  rss {:.1} MB (anon {:.1}, file {:.1}, shmem {:.1})",
                started.elapsed().as_secs_f64(),
                kommo.len(),
                bitrix.len(),
                rss as f64 / 1024.0,
                mb("RssAnon"),
                mb("RssFile"),
                mb("RssShmem"),
            );
        }
    }
    let wall = started.elapsed();
    let peak_rss = proc_status_kb(pid, "VmHWM").unwrap_or(0);
    let end_rss = proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let cpu_after = proc_cpu(pid).unwrap_or((0.0, 0.0));
    let _ = player.await;
    // Anything late (a duplicate would arrive now).
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(c) = kommo_seen.try_recv() {
        kommo.push((c.uniq, c.at));
    }
    while let Ok(f) = bitrix_seen.try_recv() {
        bitrix.push((f.external_call_id, f.at));
    }

    // Latencies and counts per play.
    let owner = owner.lock().expect("owner map").clone();
    let pushed = pushed.lock().expect("push times").clone();
    let mut problems = Vec::new();
    let mut latencies = |name: &str, seen: Vec<(Option<String>, Instant)>| {
        let mut per_call: HashMap<String, usize> = HashMap::new();
        let mut lat = Vec::with_capacity(seen.len());
        for (id, at) in seen {
            let Some(id) = id else {
                problems.push(format!("{name}: a call without an id"));
                continue;
            };
            *per_call.entry(id.clone()).or_insert(0) += 1;
            match owner.get(&id).and_then(|&i| pushed[i]) {
                Some(p) => lat.push(at.saturating_duration_since(p)),
                None => problems.push(format!("{name}: call {id} was never played")),
            }
        }
        let dups = per_call.values().filter(|&&n| n > 1).count();
        if dups > 0 {
            problems.push(format!("{name}: {dups} calls registered more than once"));
        }
        if per_call.len() != expected {
            problems.push(format!(
                "{name}: {} distinct calls registered, {expected} expected",
                per_call.len()
            ));
        }
        lat.sort();
        lat
    };
    let k_lat = latencies("kommo", kommo.into_iter().map(|(u, a)| (u, a)).collect());
    let b_lat = latencies(
        "bitrix24",
        bitrix.into_iter().map(|(u, a)| (Some(u), a)).collect(),
    );
    let k_snap = world.kommo.snapshot();
    let b_snap = world.bitrix.snapshot();
    let finish_requests: u32 = b_snap.calls.values().map(|c| c.finish_requests).sum();

    let cpu_user = cpu_after.0 - cpu_before.0;
    let cpu_sys = cpu_after.1 - cpu_before.1;
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let warns = log_text.lines().filter(|l| l.contains("WARN")).count();
    let errors = log_text.lines().filter(|l| l.contains("ERROR")).count();

    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!("| calls played (external) | {calls} ({expected}) |");
    println!(
        "| wall time until all registered | {:.2} s |",
        wall.as_secs_f64()
    );
    println!(
        "| throughput | {:.1} calls/s |",
        calls as f64 / wall.as_secs_f64()
    );
    println!(
        "| last event → Kommo call note p50 / p99 / max | {} / {} / {} |",
        ms(percentile(&k_lat, 0.5)),
        ms(percentile(&k_lat, 0.99)),
        ms(percentile(&k_lat, 1.0))
    );
    println!(
        "| last event → Bitrix24 finish p50 / p99 / max | {} / {} / {} |",
        ms(percentile(&b_lat, 0.5)),
        ms(percentile(&b_lat, 0.99)),
        ms(percentile(&b_lat, 1.0))
    );
    println!(
        "| daemon RSS idle / end / peak (VmHWM) | {:.1} / {:.1} / {:.1} MB |",
        idle_rss as f64 / 1024.0,
        end_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "| daemon CPU user + sys | {:.2} + {:.2} = {:.2} s ({:.2} ms/call) |",
        cpu_user,
        cpu_sys,
        cpu_user + cpu_sys,
        (cpu_user + cpu_sys) * 1000.0 / calls.max(1) as f64
    );
    println!(
        "| HTTP requests Kommo / Bitrix24 | {} / {} |",
        k_snap.requests.len(),
        b_snap.requests.len()
    );
    println!("| Bitrix24 finish requests | {finish_requests} |");
    println!("| daemon log lines WARN / ERROR | {warns} / {errors} |");

    drop(daemon);
    if std::env::var("KEEP").is_ok_and(|v| v == "1") {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    if finish_requests as usize != expected {
        problems.push(format!(
            "bitrix24: {finish_requests} finish requests for {expected} calls"
        ));
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("FAIL: {p}");
        }
        std::process::exit(1);
    }
    println!("OK: every external call registered exactly once in Kommo and Bitrix24");
}
