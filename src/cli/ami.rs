//! `kolokol ami tail`: print every AMI event as one JSON object per line.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::ami::{AmiClient, AmiEvent};
use crate::config::{Config, DEFAULT_PATH};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Connect with the configured credentials and print each event received as one
    /// JSON object per line (keys as sent, repeated keys as arrays), until Ctrl-C or
    /// N events. Exits 2 when the connection or the login fails.
    Tail {
        #[command(flatten)]
        config: super::ConfigArg,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Tail { config, max } => tail(config.config.as_deref(), max).await,
    }
}

/// Exit code for "could not connect or log in".
const EXIT_CONNECT: u8 = 2;

async fn tail(config_path: Option<&Path>, max: Option<u64>) -> anyhow::Result<ExitCode> {
    // Log lines go to stderr so stdout stays pure JSON lines.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let config = match config_path {
        Some(p) => Config::load(p)?,
        None if Path::new(DEFAULT_PATH).exists() => Config::load(Path::new(DEFAULT_PATH))?,
        None => Config::default(),
    };
    let ami_cfg = config.ami;
    let addr = ami_cfg.addr();
    let user = ami_cfg.username.clone();
    let (ami, mut events) = AmiClient::spawn(ami_cfg);
    match ami.wait_connected().await {
        Ok(banner) => eprintln!("kolokol: connected to {addr} ({banner}) as '{user}'"),
        Err(e) => {
            ami.shutdown().await;
            eprintln!("kolokol: {e}");
            return Ok(ExitCode::from(EXIT_CONNECT));
        }
    }
    let mut printed = 0u64;
    if max == Some(0) {
        ami.shutdown().await;
        return Ok(ExitCode::SUCCESS);
    }
    let stdout = std::io::stdout();
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(ev) = ev else { break };
        match ev {
            AmiEvent::Message(m) => {
                let mut out = stdout.lock();
                let line = m.to_json().to_string();
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    // Reader went away (e.g. `| head`): nothing left to do.
                    break;
                }
                printed += 1;
                if max.is_some_and(|n| printed >= n) {
                    break;
                }
            }
            AmiEvent::Disconnected { reason } => {
                eprintln!("kolokol: AMI link down ({reason}); reconnecting")
            }
            AmiEvent::Reconnected => {
                eprintln!("kolokol: AMI reconnected; events in between were missed")
            }
            AmiEvent::Connected { .. } => {}
        }
    }
    ami.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
