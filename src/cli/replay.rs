//! `kolokol replay [--config PATH] FILE.ami...`: feed recorded AMI byte streams through
//! the call tracker and print one JSON object per stage event.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::calls::Tracker;
use crate::calls::replay::replay;
use crate::config::Config;

/// Largest stream accepted (the whole file is read into memory).
const MAX_FILE: u64 = 1 << 30;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Ignore `FILE.timeline` even when it exists (times then come from EventTV and
    /// Uniqueid epochs only).
    #[arg(long)]
    pub no_timeline: bool,
    /// Raw AMI streams as received on the socket (the fixture format). Files are fed
    /// in order through one tracker. `FILE.timeline` next to a file gives event times.
    #[arg(required = true, value_name = "FILE.ami")]
    pub files: Vec<PathBuf>,
}

fn read_limited(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > MAX_FILE {
        anyhow::bail!(
            "{} is {} bytes; replay reads at most {} bytes per file: split the capture",
            path.display(),
            meta.len(),
            MAX_FILE
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn run_blocking(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(args.config.config.as_deref())?;
    let mut tracker =
        Tracker::new(&config.calls).context("the [calls] section of the config cannot be used")?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for path in &args.files {
        let bytes = read_limited(path)?;
        let timeline_path = path.with_extension("timeline");
        let timeline = if args.no_timeline || !timeline_path.exists() {
            None
        } else {
            let t = read_limited(&timeline_path)?;
            Some(
                String::from_utf8(t)
                    .with_context(|| format!("{} is not UTF-8 text", timeline_path.display()))?,
            )
        };
        let events = replay(&bytes, timeline.as_deref(), &mut tracker)
            .with_context(|| format!("cannot replay {}", path.display()))?;
        for ev in events {
            serde_json::to_writer(&mut out, &ev)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    let live = tracker.live_calls();
    if !live.is_empty() {
        eprintln!(
            "kolokol replay: {} call(s) still live at the end of the input: {}",
            live.len(),
            live.iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Parsing and tracking are CPU work: keep them off the async workers.
    tokio::task::spawn_blocking(move || run_blocking(args))
        .await
        .context("replay task failed")?
}
