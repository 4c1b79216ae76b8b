//! `kolokol outbox`: look at and manage the durable CRM job queue. Safe to use while
//! the daemon runs (the database is in WAL mode; writes wait for the daemon's lock).

use std::process::ExitCode;

use crate::config::Config;
use crate::store::{JobState, ListFilter, OutboxJob, Store, now_ms};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Jobs waiting or dead (or of one --state), oldest first.
    List(ListArgs),
    /// Dead jobs only: what the CRMs rejected or what ran out of attempts.
    Dead(DeadArgs),
    /// Send a dead job again now, with a fresh attempt count.
    Retry(IdArgs),
    /// Take a job out of delivery for good (later jobs of its call are released).
    Drop(IdArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// pending, done, dead or dropped (default: pending and dead).
    #[arg(long)]
    pub state: Option<JobState>,
    /// Only this CRM (kommo, bitrix24).
    #[arg(long)]
    pub crm: Option<String>,
    /// Only this call id.
    #[arg(long)]
    pub call: Option<String>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeadArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// The job id (first column of `kolokol outbox list`).
    pub id: i64,
}

pub(crate) fn open_store(config: &super::ConfigArg) -> anyhow::Result<Store> {
    let cfg = Config::load_or_default(config.config.as_deref())?;
    Ok(Store::open_existing(&cfg.storage)?)
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(a) => {
            let store = open_store(&a.config)?;
            let jobs = store
                .list(ListFilter {
                    state: a.state,
                    connector: a.crm,
                    call_id: a.call,
                    limit: a.limit.max(1),
                })
                .await?;
            print_jobs(&jobs, a.json)?;
        }
        Command::Dead(a) => {
            let store = open_store(&a.config)?;
            let jobs = store
                .list(ListFilter {
                    state: Some(JobState::Dead),
                    limit: 100_000,
                    ..Default::default()
                })
                .await?;
            print_jobs(&jobs, a.json)?;
        }
        Command::Retry(a) => {
            let store = open_store(&a.config)?;
            let job = store.retry(a.id).await?;
            println!(
                "job {} ({} {} of call {}) will be sent again; a running daemon picks it up within its poll interval",
                job.id, job.connector, job.stage, job.call_id
            );
        }
        Command::Drop(a) => {
            let store = open_store(&a.config)?;
            let job = store.drop_job(a.id).await?;
            println!(
                "job {} ({} {} of call {}) dropped: it will not be sent",
                job.id, job.connector, job.stage, job.call_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_jobs(jobs: &[OutboxJob], json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        for j in jobs {
            writeln!(out, "{}", serde_json::to_string(j)?)?;
        }
        out.flush()?;
        return Ok(());
    }
    if jobs.is_empty() {
        writeln!(out, "no jobs")?;
        out.flush()?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<9} {:<8} {:>4}  {:<24} {:<32} {:<18} ERROR",
        "ID", "CRM", "STATE", "TRY", "CALL", "STAGE", "WHEN"
    )?;
    let now = now_ms();
    for j in jobs {
        let stage = match &j.conversation_id {
            Some(c) => format!("{}:{c}", j.stage),
            None => j.stage.clone(),
        };
        let when = match (j.state, j.waiting_for) {
            (JobState::Pending, Some(prev)) => format!("after job {prev}"),
            (JobState::Pending, None) if j.next_attempt_at <= now => "now".into(),
            (JobState::Pending, None) => format!("in {}", human_ms(j.next_attempt_at - now)),
            _ => format!("{} ago", human_ms(now - j.updated_at)),
        };
        let line = format!(
            "{:>8}  {:<9} {:<8} {:>4}  {:<24} {:<32} {:<18} {}",
            j.id,
            j.connector,
            j.state.as_str(),
            j.attempts,
            j.call_id,
            stage,
            when,
            j.last_error.as_deref().unwrap_or("")
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    out.flush()?;
    Ok(())
}

fn human_ms(ms: i64) -> String {
    let secs = (ms.max(0) / 1000) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}
