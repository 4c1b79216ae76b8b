//! `kolokol originate`.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArg,
}

pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_built("originate")
}
