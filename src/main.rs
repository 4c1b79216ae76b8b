use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = kolokol::cli::Cli::parse();
    kolokol::cli::dispatch(cli).await
}
