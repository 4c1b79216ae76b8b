//! Bitrix24 connector overhead: ring-group calls (2 rings, answer, 2 ends, call end)
//! through the connector against the in-process sandbox portal over real HTTP on
//! loopback, rate limits lifted on both sides so only kolokol + HTTP are measured.
//!
//! Run: `cargo bench --bench bitrix24_flow` (env `CALLS`, `CONCURRENCY` to change size).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kolokol::calls::{CallFull, Direction, Stage};
use kolokol::crm::bitrix24::{Bitrix24, Bitrix24Config, Deps, MemoryCallIdStore, PathRecords};
use kolokol::crm::{Connector, Job, MemoryJobSteps, MemoryTokenStore};
use kolokol::hooks::NoCustomizations;
use kolokol::sandbox::bitrix24::SandboxBitrix24;
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn one_call(b24: &Bitrix24, n: usize) -> Duration {
    let id = format!("1795400000.{n}");
    let mut c = CallFull {
        id: id.clone(),
        direction: Direction::Inbound,
        client_phone: format!("7916{:07}", n),
        line_number: "74951234568".into(),
        ..CallFull::default()
    };
    c.extra
        .insert("start_time".into(), json!("2026-11-21 23:47:41"));
    c.extra.insert(
        "conversations".into(),
        json!({format!("{id}-a"): {"user": "101"}, format!("{id}-b"): {"user": "102"}}),
    );
    let job = |stage, conv: Option<&str>, c: &CallFull| Job {
        id: n as i64,
        connector: "bitrix24".into(),
        stage,
        conversation_id: conv.map(str::to_string),
        call_full: c.clone(),
        attempts: 0,
    };
    let a = format!("{id}-a");
    let b = format!("{id}-b");
    for (stage, conv) in [
        (Stage::ConversationRequested, Some(a.as_str())),
        (Stage::ConversationRequested, Some(b.as_str())),
    ] {
        b24.deliver(&job(stage, conv, &c), &MemoryJobSteps::default())
            .await
            .unwrap_or_default();
    }
    c.answered_by = "102".into();
    for (stage, conv) in [
        (Stage::ConversationAccepted, Some(b.as_str())),
        (Stage::ConversationEnded, Some(a.as_str())),
        (Stage::ConversationEnded, Some(b.as_str())),
    ] {
        b24.deliver(&job(stage, conv, &c), &MemoryJobSteps::default())
            .await
            .unwrap_or_default();
    }
    c.result = 200;
    c.talk_duration = 5;
    let t = Instant::now();
    if let Err(e) = b24
        .deliver(&job(Stage::CallEnded, None, &c), &MemoryJobSteps::default())
        .await
    {
        eprintln!("call {n}: {e}");
    }
    t.elapsed()
}

fn main() {
    let calls = env("CALLS", 2000);
    let conc = env("CONCURRENCY", 50).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(async move {
        let sb = SandboxBitrix24::start()
            .await
            .unwrap_or_else(|e| panic!("sandbox: {e}"));
        sb.set_rate(1e9, u32::MAX);
        let cfg = Bitrix24Config {
            webhook_url: Some(sb.webhook_url()),
            card_debounce: Duration::ZERO,
            rate_per_sec: 1e9,
            burst: u32::MAX,
            record: kolokol::crm::bitrix24::RecordMode::None,
            ..Bitrix24Config::default()
        };
        let b24 = Bitrix24::new(
            cfg,
            Deps {
                store: Arc::new(MemoryCallIdStore::default()),
                hooks: Arc::new(NoCustomizations),
                records: Arc::new(PathRecords),
                tokens: Arc::new(MemoryTokenStore::default()),
            },
        )
        .unwrap_or_else(|e| panic!("connector: {e}"));
        let _ = b24.check_access().await;
        let sem = Arc::new(tokio::sync::Semaphore::new(conc));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(calls);
        for n in 0..calls {
            let b24 = b24.clone();
            let sem = sem.clone();
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire_owned().await;
                one_call(&b24, n).await
            }));
        }
        let mut lat = Vec::with_capacity(calls);
        for t in tasks {
            if let Ok(d) = t.await {
                lat.push(d);
            }
        }
        let wall = start.elapsed();
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
        let snap = sb.snapshot();
        let finished = snap.calls.values().filter(|c| c.finish.is_some()).count();
        let http_requests = snap.requests.iter().filter(|r| !r.in_batch).count();
        println!("bitrix24_flow: {calls} ring-group calls, {conc} concurrent, sandbox on loopback");
        println!(
            "  wall {:.2} s, {:.0} calls/s ({} jobs/call)",
            wall.as_secs_f64(),
            calls as f64 / wall.as_secs_f64(),
            6
        );
        println!(
            "  finished {finished}/{calls}; HTTP requests {http_requests} ({:.2}/call)",
            http_requests as f64 / calls as f64
        );
        println!(
            "  call_ended delivery (hide+finish+lookup-free): p50 {:?}, p99 {:?}",
            pct(0.5),
            pct(0.99)
        );
    });
}
