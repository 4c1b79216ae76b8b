//! `kolokol demo`: the real daemon against a simulated PBX (the recorded fixtures
//! replayed as new calls, paced like an office) and the sandbox Kommo and Bitrix24.
//! Nothing to install: a newcomer sees calls registered within seconds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sandbox::demo::{DEMO_ADMIN_PASSWORD, DemoWorld, SCENARIOS, office_pause};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo keeps its state, config and simulated spool (default: a
    /// `kolokol-demo` folder in the system temp dir, emptied at start).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Address of the admin page and recordings.
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub http: String,
    /// Replay speed: 1 = as recorded, 4 = four times faster.
    #[arg(long, default_value_t = 2.0)]
    pub speed: f64,
    /// Stop after this many calls (default: run until Ctrl-C).
    #[arg(long)]
    pub calls: Option<usize>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("info", false);
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join("kolokol-demo"));
    if dir.join("state").exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let world = Arc::new(
        DemoWorld::start(&dir)
            .await
            .context("cannot start the simulated PBX and sandbox CRMs")?,
    );
    let toml = world.config_toml(&args.http);
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &toml)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::from_toml(&toml, &config_path)?;

    println!();
    println!("  kolokol demo");
    println!(
        "  simulated PBX (AMI)  127.0.0.1:{}",
        world.ami.local_addr().port()
    );
    println!("  sandbox Kommo        {}", world.kommo.base_url());
    println!("  sandbox Bitrix24     {}", world.bitrix.webhook_url());
    println!("  config               {}", config_path.display());
    println!(
        "  admin page           http://{}/admin   (password: {DEMO_ADMIN_PASSWORD})",
        args.http
    );
    println!("  Ctrl-C to stop.");
    println!();

    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(crate::daemon::run(config, cancel.clone(), true, Some(tx)));
    if rx.await.is_err() {
        // The daemon stopped before listening: its error says why.
        return match daemon.await {
            Ok(Err(e)) => Err(e),
            _ => anyhow::bail!("the daemon stopped during start-up"),
        };
    }

    // The office: a new call every few seconds, overlapping like real traffic.
    let speed = args.speed.max(0.1);
    let office = {
        let world = world.clone();
        let cancel = cancel.clone();
        let limit = args.calls;
        tokio::spawn(async move {
            if !world.ami.wait_logged_in(1, Duration::from_secs(30)).await {
                tracing::error!("demo: kolokol did not log in to the simulated PBX");
                return;
            }
            let mut plays = tokio::task::JoinSet::new();
            let mut n = 0usize;
            for scenario in SCENARIOS.iter().cycle() {
                if cancel.is_cancelled() || limit.is_some_and(|l| n >= l) {
                    break;
                }
                n += 1;
                tracing::info!(scenario = scenario.name, "demo PBX: new call");
                let w = world.clone();
                plays.spawn(async move { w.play(scenario, speed).await });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(office_pause(speed)) => {}
                }
            }
            while plays.join_next().await.is_some() {}
        })
    };

    // A line a minute for the newcomer: what the CRMs got.
    let summary = {
        let world = world.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let k = world.kommo.snapshot();
                let b = world.bitrix.snapshot();
                let finished = b.calls.values().filter(|c| c.finish.is_some()).count();
                println!(
                    "  sandbox Kommo: {} calls, {} contacts, {} leads, {} tasks | sandbox Bitrix24: {} calls finished",
                    k.calls.len(),
                    k.contacts.len(),
                    k.leads.len(),
                    k.tasks.len(),
                    finished
                );
            }
        })
    };

    if args.calls.is_some() {
        let _ = office.await;
        // Let the last calls end and be delivered, then stop.
        tokio::time::sleep(Duration::from_secs(5)).await;
        cancel.cancel();
    }
    let result = daemon.await.context("daemon task failed")?;
    cancel.cancel();
    summary.abort();
    result?;
    Ok(ExitCode::SUCCESS)
}
