//! `kolokol hook`: see which customizations are installed, run one exactly as the
//! daemon would.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use crate::config::Config;
use crate::hooks::samples::sample_input;
use crate::hooks::{Hook, HookOutcome, HooksConfig, Installed, Runner};

/// Largest `--input` accepted.
const MAX_INPUT: u64 = 16 << 20;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Every hook: whether it is installed and executable, and its timeout.
    List(ListArgs),
    /// Run one hook as the daemon would; print its data, the time it took and, on
    /// failure, why and which default the daemon would use (exit code 1).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Look in this folder instead of `[customizations] dir`.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Hook name, e.g. need_registration.
    pub name: String,
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Look in this folder instead of `[customizations] dir` (e.g. the shipped
    /// examples folder, to try an example before enabling it).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Input JSON file, or `-` for stdin. Default: a built-in sample for the hook.
    #[arg(long, value_name = "FILE|-")]
    pub input: Option<String>,
    /// Call id shown in logs.
    #[arg(long, default_value = "cli")]
    pub call_id: String,
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(a) => list(a),
        Command::Run(a) => run_one(a).await,
    }
}

fn hooks_config(config: &super::ConfigArg, dir: Option<PathBuf>) -> anyhow::Result<HooksConfig> {
    let mut cfg = Config::load_or_default(config.config.as_deref())?.customizations;
    if let Some(dir) = dir {
        cfg.dir = dir;
    }
    Ok(cfg)
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let runner = Runner::new(hooks_config(&args.config, args.dir)?);
    let dir = &runner.config().dir;
    if !dir.is_dir() {
        println!(
            "customizations folder {} does not exist: no hook is installed",
            dir.display()
        );
    } else {
        println!("customizations folder {}", dir.display());
    }
    println!(
        "max_concurrent = {}\n\n{:<34} {:>8}  STATUS",
        runner.config().max_concurrent,
        "HOOK",
        "TIMEOUT"
    );
    for (hook, installed, timeout) in runner.inventory() {
        let status = match installed {
            Installed::Missing => "not installed".to_string(),
            Installed::Found {
                path,
                executable: true,
            } => format!("installed: {}", file_name(&path)),
            Installed::Found {
                path,
                executable: false,
            } => format!(
                "NOT EXECUTABLE: {} (run `chmod +x {}`)",
                file_name(&path),
                path.display()
            ),
            Installed::Ambiguous(a, b) => format!(
                "AMBIGUOUS: {} and {} (keep one; neither runs)",
                file_name(&a),
                file_name(&b)
            ),
        };
        let timeout = humantime::format_duration(timeout).to_string();
        println!("{:<34} {:>8}  {status}", hook.as_str(), timeout);
    }
    Ok(ExitCode::SUCCESS)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn read_input(hook: Hook, input: Option<&str>) -> anyhow::Result<Value> {
    let text = match input {
        None => return Ok(sample_input(hook)),
        Some("-") => {
            let mut buf = String::new();
            std::io::stdin()
                .take(MAX_INPUT)
                .read_to_string(&mut buf)
                .context("cannot read the input JSON from stdin")?;
            buf
        }
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open input file {path}"))?;
            let mut buf = String::new();
            file.take(MAX_INPUT)
                .read_to_string(&mut buf)
                .with_context(|| format!("cannot read input file {path}"))?;
            buf
        }
    };
    serde_json::from_str(&text).context("the input is not valid JSON")
}

async fn run_one(args: RunArgs) -> anyhow::Result<ExitCode> {
    let Some(hook) = Hook::from_name(&args.name) else {
        anyhow::bail!("unknown hook {:?}; hooks are: {}", args.name, Hook::names());
    };
    let input = read_input(hook, args.input.as_deref())?;
    let runner = Runner::new(hooks_config(&args.config, args.dir)?);
    let report = runner.run_hook(hook, &input, &args.call_id).await;
    let ms = report.elapsed.as_secs_f64() * 1000.0;
    let script = report
        .path
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(none)".into());
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    match (&report.outcome, &report.failure) {
        (HookOutcome::Data(data), _) => {
            println!("{}", serde_json::to_string_pretty(data)?);
            eprintln!("{hook}: {script} succeeded in {ms:.1} ms; the daemon uses this data");
            Ok(ExitCode::SUCCESS)
        }
        (HookOutcome::Cancelled, _) => {
            println!("null");
            eprintln!(
                "{hook}: {script} returned empty data in {ms:.1} ms: the request is cancelled by customization"
            );
            Ok(ExitCode::SUCCESS)
        }
        (HookOutcome::Default { reason }, None) => {
            println!("null");
            eprintln!(
                "{hook}: {script} {reason} in {ms:.1} ms; default: {}",
                hook.default_behaviour()
            );
            Ok(ExitCode::SUCCESS)
        }
        (HookOutcome::Default { reason }, Some(_)) => {
            eprintln!("{hook}: FAILED after {ms:.1} ms: {reason}");
            let tail = crate::hooks::runner::last_lines(&report.stderr_tail, 10);
            if !tail.is_empty() {
                eprintln!("stderr: {tail}");
            }
            eprintln!(
                "the daemon would use the default: {}",
                hook.default_behaviour()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
