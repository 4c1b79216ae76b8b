//! The command line: one file per subcommand. Each turns errors into one sentence for
//! a human and an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod ami;
pub mod calls;
pub mod check_config;
pub mod convert;
pub mod demo;
pub mod hook;
pub mod kommo;
pub mod originate;
pub mod outbox;
pub mod replay;
pub mod run;

/// kolokol: Asterisk ↔ Kommo / Bitrix24 connector.
#[derive(Debug, Parser)]
#[command(name = "kolokol", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `--config PATH`, shared by the subcommands that read the config.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Config file (default /etc/kolokol/config.toml; some commands fall back to
    /// built-in defaults when it is absent).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (what systemd starts).
    Run(run::Args),
    /// Run the daemon against a simulated PBX and sandbox CRMs: no Asterisk needed.
    Demo(demo::Args),
    /// AMI tools.
    #[command(subcommand)]
    Ami(ami::Command),
    /// Replay raw AMI byte streams through the call tracker, print stage events as JSON.
    Replay(replay::Args),
    /// Customization scripts: list them, run one as the daemon would.
    #[command(subcommand)]
    Hook(hook::Command),
    /// Convert a wav recording to mp3.
    Convert(convert::Args),
    /// Inspect and manage the durable CRM job queue.
    #[command(subcommand)]
    Outbox(outbox::Command),
    /// Calls from the journal.
    Calls(calls::Args),
    /// Start a click-to-call: ring an employee, then dial the client.
    Originate(originate::Args),
    /// Validate the config and check what it points at.
    CheckConfig(check_config::Args),
    /// Kommo tools (OAuth, users).
    #[command(subcommand)]
    Kommo(kommo::Command),
}

/// Run the parsed command line.
pub async fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(a) => run::run(a).await,
        Command::Demo(a) => demo::run(a).await,
        Command::Ami(c) => ami::run(c).await,
        Command::Replay(a) => replay::run(a).await,
        Command::Hook(c) => hook::run(c).await,
        Command::Convert(a) => convert::run(a).await,
        Command::Outbox(c) => outbox::run(c).await,
        Command::Calls(a) => calls::run(a).await,
        Command::Originate(a) => originate::run(a).await,
        Command::CheckConfig(a) => check_config::run(a).await,
        Command::Kommo(c) => kommo::run(c).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kolokol: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logging for long-running commands: `RUST_LOG` overrides `default` (e.g. "info",
/// "kolokol=debug"); one line per decision, as text or JSON.
pub fn init_logging(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The error for a subcommand whose issue has not landed yet.
#[allow(dead_code)]
pub(crate) fn not_built(what: &str) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kolokol {what}` is not available in this build yet")
}
