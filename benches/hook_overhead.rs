//! Overhead of one customization run: find the script, spawn it in its own process
//! group, write the input JSON, read and check the output, reap. 1,000 sequential runs
//! of a trivial `sh` script; prints median and p99.
//!
//! Run: `cargo bench --bench hook_overhead` (add `-- 5000` for another run count).
//!
//! For scale it also times a bare `std::process::Command` spawn+wait of the same script
//! (the floor: fork/exec of `sh` itself), a script that reads its stdin with `cat`, a
//! `python3` script, and 1,000 runs through 16 slots at once.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kolokol::hooks::samples::sample_input;
use kolokol::hooks::{Hook, HookOutcome, HooksConfig, Runner};

fn write_script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

struct Stats {
    median: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    Stats {
        median: samples[n / 2],
        p99: samples[(n * 99).div_ceil(100).saturating_sub(1)],
        mean: total / n as u32,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn report(what: &str, s: &Stats) {
    println!(
        "{what:<46} median {:>10}   p99 {:>10}   mean {:>10}",
        ms(s.median),
        ms(s.p99),
        ms(s.mean)
    );
}

async fn bench_hook(runner: &Runner, hook: Hook, runs: usize) -> Stats {
    let input = sample_input(hook);
    for _ in 0..20 {
        runner.run_hook(hook, &input, "bench").await;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let report = runner.run_hook(hook, &input, "bench").await;
        samples.push(t.elapsed());
        assert!(
            matches!(report.outcome, HookOutcome::Data(_)),
            "{hook}: {:?}",
            report.outcome
        );
    }
    stats(samples)
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = r#"{"state":"success","data":{"ok":true}}"#;
    // Trivial sh: answers without reading its input (kolokol still writes it).
    write_script(
        dir.path(),
        "process_call_params.sh",
        &format!("#!/bin/sh\nprintf '%s\\n' '{ok}'\n"),
    );
    // sh that reads all of its input first.
    write_script(
        dir.path(),
        "process_lead_creation_params.sh",
        &format!("#!/bin/sh\ncat >/dev/null\nprintf '%s\\n' '{ok}'\n"),
    );
    write_script(
        dir.path(),
        "process_contact_creation_params.py",
        "#!/usr/bin/env python3\nimport json, sys\nd = json.load(sys.stdin)\nprint(json.dumps({\"state\": \"success\", \"data\": {\"ok\": True}}))\n",
    );
    let runner = Arc::new(Runner::new(HooksConfig {
        dir: dir.path().to_path_buf(),
        timeouts: Default::default(),
        max_concurrent: 16,
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "hook_overhead: {runs} sequential runs each, input {} bytes, {} CPUs",
        sample_input(Hook::ProcessCallParams).to_string().len(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Floor: spawning the same script with std, no I/O handling.
    let script = dir.path().join("process_call_params.sh");
    let mut floor = Vec::with_capacity(runs);
    for i in 0..runs + 20 {
        let t = Instant::now();
        let out = std::process::Command::new(&script)
            .output()
            .expect("spawn floor");
        if i >= 20 {
            floor.push(t.elapsed());
        }
        assert!(out.status.success());
    }
    report("bare std::process spawn+wait (floor)", &stats(floor));

    let s = rt.block_on(bench_hook(&runner, Hook::ProcessCallParams, runs));
    report("kolokol hook run: trivial sh (printf)", &s);
    let s = rt.block_on(bench_hook(&runner, Hook::ProcessLeadCreationParams, runs));
    report("kolokol hook run: sh reading stdin (cat)", &s);
    let py_runs = runs.min(300);
    let s = rt.block_on(bench_hook(
        &runner,
        Hook::ProcessContactCreationParams,
        py_runs,
    ));
    report(
        &format!("kolokol hook run: python3 json ({py_runs} runs)"),
        &s,
    );

    // Throughput: `runs` runs of the trivial script at once through 16 slots.
    let elapsed = rt.block_on(async {
        let input = Arc::new(sample_input(Hook::ProcessCallParams));
        let t = Instant::now();
        let mut tasks = Vec::with_capacity(runs);
        for _ in 0..runs {
            let runner = runner.clone();
            let input = input.clone();
            tasks.push(tokio::spawn(async move {
                runner
                    .run_hook(Hook::ProcessCallParams, &input, "bench")
                    .await
                    .outcome
            }));
        }
        for task in tasks {
            let outcome = task.await.expect("join");
            assert!(matches!(outcome, HookOutcome::Data(_)));
        }
        t.elapsed()
    });
    println!(
        "{:<46} {runs} runs in {}  = {:.0} runs/s (peak running {})",
        "concurrent, max_concurrent = 16",
        ms(elapsed),
        runs as f64 / elapsed.as_secs_f64(),
        runner.metrics().snapshot().peak_running
    );
}
