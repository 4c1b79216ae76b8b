//! `kolokol originate --from 101 --to 79161234567`: ring the employee, then dial the
//! client, over a short AMI session of its own (the daemon need not run). Waits for the
//! `OriginateResponse` and says how it went; exit code 0 when the employee answered.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::config::Config;
use crate::hooks::Runner;
use crate::originate::ami_once::{AmiSession, SessionOriginator};
use crate::originate::{ClickToCall, OriginateRequest, Originator, outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The employee's internal number (rung first).
    #[arg(long, value_name = "EXTENSION")]
    pub from: String,
    /// The client's phone (dialled once the employee answers).
    #[arg(long, value_name = "PHONE")]
    pub to: String,
    /// Request id put in CRM_CALL_ID and the ActionID (random when absent).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Return once Asterisk queued the call instead of waiting for the employee.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub config: super::ConfigArg,
}

/// How long each AMI step (connect, login, a response) may take.
const AMI_STEP: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(args.config.config.as_deref())?;
    let session = AmiSession::login(&config.ami, AMI_STEP).await?;
    let originator = Arc::new(SessionOriginator(Mutex::new(session)));
    let ring = config.originate.ring_timeout;
    // process_originate_params runs exactly as in the daemon.
    let c2c = ClickToCall::new(
        config.originate.clone(),
        Arc::new(Runner::new(config.customizations.clone())),
        originator.clone() as Arc<dyn Originator>,
    );
    let req = OriginateRequest {
        from: args.from.clone(),
        to: args.to.clone(),
        request_id: args.id.clone().unwrap_or_default(),
        request_data: serde_json::json!({"source": "cli", "from": args.from, "to": args.to}),
    };
    let started = c2c.start(req).await;
    drop(c2c);
    let code = match started {
        Err(e) => {
            eprintln!("kolokol: {e}");
            ExitCode::FAILURE
        }
        Ok(started) if args.no_wait => {
            println!(
                "queued: ringing {} then dialling {} (CRM_CALL_ID={})",
                started.params.channel, started.params.extension, started.request_id
            );
            ExitCode::SUCCESS
        }
        Ok(started) => {
            println!(
                "queued: ringing {} (CRM_CALL_ID={})",
                started.params.channel, started.request_id
            );
            let id = started.request_id.clone();
            let waited = originator
                .0
                .lock()
                .await
                .wait_event(ring + Duration::from_secs(15), |m| {
                    outcome(m).is_some_and(|(rid, _)| rid == id)
                })
                .await;
            match waited.ok().as_ref().and_then(outcome) {
                Some((_, o)) if o.is_success() => {
                    println!("{}", o.describe());
                    ExitCode::SUCCESS
                }
                Some((_, o)) => {
                    eprintln!("kolokol: click-to-call failed: {}", o.describe());
                    ExitCode::FAILURE
                }
                None => {
                    eprintln!(
                        "kolokol: no OriginateResponse from Asterisk in time; the call may still be ringing"
                    );
                    ExitCode::FAILURE
                }
            }
        }
    };
    if let Ok(o) = Arc::try_unwrap(originator) {
        o.0.into_inner().logoff().await;
    }
    Ok(code)
}
