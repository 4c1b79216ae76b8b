//! `kolokol run`: the daemon, as systemd starts it.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_PATH};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("info", args.log_json);
    let path = args
        .config
        .config
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let config = Config::load(&path)?;
    tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "kolokol starting");
    crate::daemon::run(config, CancellationToken::new(), true, None).await?;
    Ok(ExitCode::SUCCESS)
}
