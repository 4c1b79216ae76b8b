//! `kolokol convert IN OUT.mp3 [--bitrate K] [--quality Q]`: convert one recording the way
//! the daemon does, for admins (and for the benchmark).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;
use crate::records::{ConvertSettings, convert_file};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// The recording to convert (wav: PCM, µ-law, A-law; any rate; mono or stereo).
    pub input: PathBuf,
    /// The mp3 to write (written to a temp file first, then renamed).
    pub output: PathBuf,
    /// mp3 bitrate in kbit/s (default: [records] bitrate_kbps, 32).
    #[arg(long, short = 'b', value_name = "K")]
    pub bitrate: Option<u32>,
    /// LAME quality 0 (best) ..= 9 (fastest) (default: [records] quality, 5).
    #[arg(long, short = 'q', value_name = "Q")]
    pub quality: Option<u8>,
    /// Keep stereo instead of mixing down to mono.
    #[arg(long)]
    pub stereo: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(args.config.config.as_deref())?;
    let mut settings = ConvertSettings::from_config(&config.records)?;
    if let Some(b) = args.bitrate {
        settings.bitrate_kbps = b;
    }
    if let Some(q) = args.quality {
        settings.quality = q;
    }
    if args.stereo {
        settings.downmix = false;
    }
    settings.validate()?;
    let (input, output) = (args.input.clone(), args.output.clone());
    let report = tokio::task::spawn_blocking(move || convert_file(&input, &output, &settings))
        .await
        .context("conversion worker")??;
    let speed = report.duration.as_secs_f64() / report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "{} -> {}: {} {} Hz {} ch, {:.2} s of audio, {} -> {} bytes, {:.0}x real time",
        report.src.display(),
        report.dst.display(),
        report.codec,
        report.sample_rate,
        report.channels,
        report.duration.as_secs_f64(),
        report.bytes_in,
        report.bytes_out,
        speed
    );
    Ok(ExitCode::SUCCESS)
}
