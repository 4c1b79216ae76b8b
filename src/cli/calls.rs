//! `kolokol calls`: ended calls from the journal, with what each CRM answered.

use std::process::ExitCode;

use crate::store::{JournalEntry, now_ms};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Only calls ended since then: a duration back from now ("2h", "3days"), a date
    /// ("2026-11-21", UTC) or an RFC 3339 time ("2026-11-21T10:00:00+03:00").
    #[arg(long, value_parser = parse_since)]
    pub since: Option<i64>,
    /// At most this many calls (the most recent); 0 = all.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// One object per call and line: {"call_full": {...}, "crm": {...}}.
    #[arg(long)]
    pub json: bool,
}

/// `--since` as unix ms.
fn parse_since(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc().timestamp_millis());
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now_ms().saturating_sub(d.as_millis().min(i64::MAX as u128) as i64)),
        Err(_) => Err(format!(
            "'{s}' is not a duration (2h, 3days), a date (2026-11-21) or an RFC 3339 time"
        )),
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = super::outbox::open_store(&args.config)?;
    let limit = if args.limit == 0 {
        usize::MAX >> 1
    } else {
        args.limit
    };
    let calls = store.calls(args.since, limit).await?;
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        for c in &calls {
            let obj = serde_json::json!({"call_full": c.call_full, "crm": c.crm});
            writeln!(out, "{obj}")?;
        }
    } else if calls.is_empty() {
        writeln!(out, "no calls")?;
    } else {
        writeln!(
            out,
            "{:<19}  {:<24} {:<8} {:<16} {:<8} {:>4} {:>6}  CRM",
            "ENDED (UTC)", "CALL", "DIR", "CLIENT", "ANSWERED", "RES", "TALK"
        )?;
        for c in &calls {
            writeln!(out, "{}", row(c))?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn row(c: &JournalEntry) -> String {
    let f = &c.call_full;
    let s = |k: &str| match f.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) if !v.is_null() => v.to_string(),
        _ => String::new(),
    };
    let ended = chrono::DateTime::from_timestamp_millis(c.ended_at)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    format!(
        "{:<19}  {:<24} {:<8} {:<16} {:<8} {:>4} {:>6}  {}",
        ended,
        c.call_id,
        s("direction"),
        s("client_phone"),
        s("answered_by"),
        s("result"),
        s("talk_duration"),
        crm_summary(&c.crm)
    )
}

/// `kommo:done bitrix24:dead`: the worst outcome of each CRM's stages.
fn crm_summary(crm: &serde_json::Value) -> String {
    let Some(m) = crm.as_object() else {
        return "-".into();
    };
    let rank = |s: &str| match s {
        "dead" => 3,
        "dropped" => 2,
        "done" => 1,
        _ => 0,
    };
    let parts: Vec<String> = m
        .iter()
        .map(|(name, stages)| {
            let worst = stages
                .as_object()
                .into_iter()
                .flat_map(|s| s.values())
                .filter_map(|v| v.get("state").and_then(|s| s.as_str()))
                .max_by_key(|s| rank(s))
                .unwrap_or("pending");
            format!("{name}:{worst}")
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}
