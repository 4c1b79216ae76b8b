//! Kommo registration throughput against the sandbox over real HTTP on loopback.
//!
//! Kommo itself allows 7 requests/s per account, so what matters in production is how
//! many requests one call costs; this prints that per scenario, then the connector's
//! own ceiling with the limit lifted (CPU cost of kolokol + sandbox, not Kommo's).
//!
//! Then a backlog (calls queued during an outage) drained at the real limit of 7
//! requests/s, with and without batching: requests per call and time to drain.
//!
//! `cargo bench --bench kommo_register` (env `CALLS=N`, `BACKLOG=N` to change the counts).

use std::sync::Arc;
use std::time::Instant;

use kolokol::calls::{CallFull, Direction, Stage};
use kolokol::crm::kommo::{KommoConfig, KommoConnector};
use kolokol::crm::{Connector, Job, MemoryJobSteps, MemoryTokenStore};
use kolokol::hooks::NoCustomizations;
use kolokol::sandbox::kommo::{self as sb, SandboxKommo};
use serde_json::{Map, json};

fn call(id: usize, phone: String, answered: bool) -> Job {
    let mut extra = Map::new();
    extra.insert(
        "conversations".into(),
        json!({format!("{id}.1"): {"user": "101", "channel": {"from": phone, "to": "101"}}}),
    );
    extra.insert("record_link".into(), json!("https://pbx.example.com/r.mp3"));
    Job {
        id: id as i64,
        connector: "kommo".into(),
        stage: Stage::CallEnded,
        conversation_id: None,
        call_full: CallFull {
            id: format!("1795300000.{id}"),
            direction: Direction::Inbound,
            client_phone: phone,
            line_number: "74951234567".into(),
            answered_by: if answered {
                "101".into()
            } else {
                String::new()
            },
            result: if answered { 200 } else { 480 },
            duration: 30,
            talk_duration: if answered { 25 } else { 0 },
            extra,
            ..Default::default()
        },
        attempts: 0,
    }
}

async fn run(c: &Arc<KommoConnector>, jobs: Vec<Job>, parallel: usize) -> f64 {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut handles = Vec::new();
    for j in jobs {
        let c = c.clone();
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        handles.push(tokio::spawn(async move {
            let steps = MemoryJobSteps::default();
            let r = c.deliver(&j, &steps).await;
            drop(permit);
            r.map(|_| ()).map_err(|e| e.to_string())
        }));
    }
    for h in handles {
        if let Err(e) = h.await.expect("join") {
            eprintln!("delivery failed: {e}");
            std::process::exit(1);
        }
    }
    started.elapsed().as_secs_f64()
}

/// A fresh sandbox account limited to `rate` requests/s and a connector to it.
async fn sandbox_and_connector(
    rate: f64,
    batch_size: usize,
) -> (SandboxKommo, Arc<KommoConnector>) {
    let s = SandboxKommo::start().await.expect("sandbox");
    s.set_rate_limit(rate);
    let mut cfg = KommoConfig {
        base_url: s.base_url(),
        long_lived_token: Some(sb::LONG_LIVED_TOKEN.into()),
        rate_limit: rate,
        batch_size,
        ..Default::default()
    };
    cfg.users.insert("101".into(), 5002);
    let c = KommoConnector::new(
        cfg,
        Arc::new(MemoryTokenStore::default()),
        Arc::new(NoCustomizations),
    )
    .expect("connector");
    (s, Arc::new(c))
}

/// Drain `n` queued calls at 7 requests/s with `parallel` deliveries in flight.
async fn backlog(n: usize, batch_size: usize, parallel: usize) {
    let (s, c) = sandbox_and_connector(7.0, batch_size).await;
    let jobs: Vec<Job> = (0..n)
        .map(|i| call(20_000 + i, format!("7905{i:07}"), i % 3 != 0))
        .collect();
    let secs = run(&c, jobs, parallel).await;
    let snap = s.snapshot();
    let refused = snap.requests.iter().filter(|r| r.status == 429).count();
    println!(
        "| {batch_size} | {parallel} | {n} | {} | {:.2} | {secs:.1} s | {:.2} | {refused} |",
        snap.requests.len(),
        snap.requests.len() as f64 / n as f64,
        n as f64 / secs,
    );
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let (s, c) = sandbox_and_connector(1e9, KommoConfig::default().batch_size).await;

    // Requests per call, by scenario.
    for (label, answered, known) in [
        ("new number, answered", true, false),
        ("new number, missed", false, false),
        ("known client, answered", true, true),
        ("known client, missed", false, true),
    ] {
        let before = s.snapshot().requests.len();
        let phone = if known {
            "79160000000".to_string()
        } else {
            format!("7926{:07}", before)
        };
        if known && s.snapshot().contacts_with_phone(&phone).is_empty() {
            s.add_contact("Known", &phone, 5002);
        }
        let before = s.snapshot().requests.len();
        run(&c, vec![call(before, phone, answered)], 1).await;
        let reqs = s.snapshot().requests.len() - before;
        println!(
            "{label:<26} {reqs} requests → at Kommo's 7 req/s: {:.2} calls/s per account",
            7.0 / reqs as f64
        );
    }

    // Throughput with the limit lifted: new numbers, 16 deliveries at once.
    let jobs: Vec<Job> = (0..n)
        .map(|i| call(10_000 + i, format!("7903{i:07}"), i % 3 != 0))
        .collect();
    let before = s.snapshot().requests.len();
    let secs = run(&c, jobs, 16).await;
    let reqs = s.snapshot().requests.len() - before;
    println!(
        "unlimited: {n} calls in {secs:.2}s = {:.0} calls/s, {:.0} HTTP requests/s (connector + sandbox on loopback)",
        n as f64 / secs,
        reqs as f64 / secs
    );

    let b: usize = std::env::var("BACKLOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    println!("\nBacklog of {b} calls (new numbers, 1/3 missed) at Kommo's 7 requests/s:");
    println!(
        "| batch_size | in flight | calls | requests | requests/call | drained in | calls/s | 429s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    backlog(b, 1, 4).await;
    backlog(b, 50, 4).await;
    backlog(b, 50, 16).await;
}
