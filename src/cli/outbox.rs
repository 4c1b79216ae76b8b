//! `kolokol outbox`.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// (not built yet)
    Placeholder,
}

pub async fn run(_cmd: Command) -> anyhow::Result<ExitCode> {
    super::not_built("outbox")
}
