//! Click-to-call: ring the employee first, then dial the client.
//!
//! Every entry point (Bitrix24 `ONEXTERNALCALLSTART`, the Kommo widget's
//! `POST /click-to-call/kommo`, `kolokol originate`) builds an [`OriginateRequest`] and
//! hands it to [`ClickToCall::start`], which
//!
//! 1. fills the default parameters (`caller_id`, `channel`, `context`, `extension`,
//!    `priority`) from `[originate]`,
//! 2. runs the `process_originate_params` customization (it may change them or cancel),
//! 3. builds the AMI `Originate` action (Async, with `CRM_CALL_ID=<request id>` so the
//!    tracker can tie the resulting call to the CRM request, and
//!    `ActionID: crm-originate-<request id>`, the form of fixture 11),
//! 4. sends it through an [`Originator`] (the daemon's long-lived AMI client, or the
//!    one-shot [`ami_once::AmiSession`] of the CLI).
//!
//! The final result arrives later as an `OriginateResponse` event; [`outcome`] turns it
//! into an [`OriginateOutcome`] with a message an admin understands.

pub mod ami_once;
pub mod kommo;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::ami::Message;
use crate::crm::BoxFuture;
use crate::hooks::{Customize, HookOutcome};

/// The customization run before every click-to-call.
pub const HOOK: &str = "process_originate_params";

/// Prefix of the `ActionID` of our Originate actions (followed by the request id).
pub const ACTION_ID_PREFIX: &str = "crm-originate-";

/// `[originate]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginateConfig {
    /// The employee's channel; `{from}` is the internal number.
    pub channel: String,
    /// Dialplan context where the client's number is dialled once the employee answers
    /// (the context internal phones use for outbound calls).
    pub context: String,
    /// CallerID shown on the employee's phone; `{to}` is the client, `{from}` the employee.
    pub caller_id: String,
    /// How long the employee's phone rings.
    #[serde(with = "humantime_serde")]
    pub ring_timeout: Duration,
    /// Channel variable carrying the CRM request id to the call tracker.
    pub call_id_variable: String,
    /// Shared secret the Kommo widget sends (`X-Kolokol-Token` header or `token` field);
    /// empty disables `POST /click-to-call/kommo`.
    pub kommo_token: String,
}

impl Default for OriginateConfig {
    fn default() -> Self {
        OriginateConfig {
            channel: "PJSIP/{from}".into(),
            context: "from-internal".into(),
            caller_id: "{to}".into(),
            ring_timeout: Duration::from_secs(30),
            call_id_variable: "CRM_CALL_ID".into(),
            kommo_token: String::new(),
        }
    }
}

/// Why a click-to-call did not start.
#[derive(Debug, thiserror::Error)]
pub enum OriginateError {
    #[error("invalid click-to-call request: {0}")]
    Invalid(String),
    #[error("click-to-call cancelled by customization process_originate_params")]
    Cancelled,
    #[error(
        "Asterisk refused the Originate: {0} (check the AMI user's write=originate permission and [originate] channel/context)"
    )]
    Refused(String),
    #[error("cannot reach AMI at {addr}: {reason} (check [ami] host/port and that Asterisk runs)")]
    Unreachable { addr: String, reason: String },
    #[error(
        "AMI login refused for user '{user}': {message} (check [ami] username/secret against manager.conf)"
    )]
    LoginRefused { user: String, message: String },
    #[error("AMI did not answer within {0:?}")]
    Timeout(Duration),
    #[error("AMI connection lost: {0}")]
    Connection(String),
}

/// What the CRM (or the CLI) asked for.
#[derive(Debug, Clone, Default)]
pub struct OriginateRequest {
    /// The employee's internal number.
    pub from: String,
    /// The client's phone.
    pub to: String,
    /// Ties the call to the CRM request (Bitrix24 `CALL_ID`); generated when empty.
    pub request_id: String,
    /// The request as received, for the customization.
    pub request_data: Value,
}

/// The parameters `process_originate_params` sees and may change (one type shared with
/// the customization contract).
pub use crate::hooks::contract::OriginateParams;

/// A click-to-call that Asterisk accepted (queued).
#[derive(Debug, Clone)]
pub struct Started {
    pub action_id: String,
    pub request_id: String,
    pub params: OriginateParams,
}

/// Sends an Originate action and returns Asterisk's immediate response. The daemon
/// implements this with its AMI client; the CLI with [`ami_once::AmiSession`].
pub trait Originator: Send + Sync {
    fn originate(&self, action: Message) -> BoxFuture<'_, Result<Message, OriginateError>>;
}

/// Builds, customizes and sends click-to-calls.
pub struct ClickToCall {
    config: OriginateConfig,
    hooks: Arc<dyn Customize>,
    originator: Arc<dyn Originator>,
}

impl ClickToCall {
    pub fn new(
        config: OriginateConfig,
        hooks: Arc<dyn Customize>,
        originator: Arc<dyn Originator>,
    ) -> ClickToCall {
        ClickToCall {
            config,
            hooks,
            originator,
        }
    }

    /// The defaults for a request, before the customization.
    pub fn default_params(&self, from: &str, to: &str) -> OriginateParams {
        let fill = |t: &str| t.replace("{from}", from).replace("{to}", to);
        OriginateParams {
            caller_id: fill(&self.config.caller_id),
            channel: fill(&self.config.channel),
            context: self.config.context.clone(),
            extension: to.to_string(),
            priority: "1".into(),
        }
    }

    /// Run the whole click-to-call up to Asterisk's "queued".
    pub async fn start(&self, req: OriginateRequest) -> Result<Started, OriginateError> {
        let from = req.from.trim();
        if !is_extension(from) {
            return Err(OriginateError::Invalid(format!(
                "employee number {from:?} is not an internal number"
            )));
        }
        let to = client_number(&req.to).ok_or_else(|| {
            OriginateError::Invalid(format!("client phone {:?} has no digits", req.to))
        })?;
        let request_id = if req.request_id.is_empty() {
            new_request_id()
        } else {
            req.request_id.clone()
        };
        if request_id.len() > 128 || !request_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(OriginateError::Invalid(format!(
                "request id {request_id:?} must be up to 128 visible ASCII characters"
            )));
        }
        let defaults = self.default_params(from, &to);
        let params = self
            .customize(defaults, &req.request_data, &request_id)
            .await?;
        let action = originate_action(
            &params,
            &request_id,
            self.config.ring_timeout,
            &self.config.call_id_variable,
        )?;
        let action_id = format!("{ACTION_ID_PREFIX}{request_id}");
        let response = self.originator.originate(action).await?;
        if !response
            .response()
            .is_some_and(|r| r.eq_ignore_ascii_case("Success"))
        {
            let msg = response.get("Message").unwrap_or("no message").to_string();
            warn!(call_id = %request_id, channel = %params.channel, message = %msg, "Originate refused");
            return Err(OriginateError::Refused(msg));
        }
        info!(call_id = %request_id, channel = %params.channel, exten = %params.extension, "click-to-call queued");
        Ok(Started {
            action_id,
            request_id,
            params,
        })
    }

    async fn customize(
        &self,
        defaults: OriginateParams,
        request_data: &Value,
        call_id: &str,
    ) -> Result<OriginateParams, OriginateError> {
        let input = json!({
            "caller_id": defaults.caller_id,
            "channel": defaults.channel,
            "context": defaults.context,
            "extension": defaults.extension,
            "priority": defaults.priority,
            "request_data": request_data,
        });
        match self.hooks.run(HOOK, input, call_id).await {
            HookOutcome::Cancelled => Err(OriginateError::Cancelled),
            HookOutcome::Default { .. } => Ok(defaults),
            HookOutcome::Data(data) => {
                // request_data is read-only: whatever the script returns for it is ignored.
                let pick = |key: &str, old: String| text(data.get(key)).unwrap_or(old);
                Ok(OriginateParams {
                    caller_id: pick("caller_id", defaults.caller_id),
                    channel: pick("channel", defaults.channel),
                    context: pick("context", defaults.context),
                    extension: pick("extension", defaults.extension),
                    priority: pick("priority", defaults.priority),
                })
            }
        }
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The AMI `Originate` action, fields in the order of fixture 11:
/// `Action, ActionID, Channel, Context, Exten, Priority, Async, CallerID, Timeout, Variable`.
pub fn originate_action(
    params: &OriginateParams,
    request_id: &str,
    ring_timeout: Duration,
    call_id_variable: &str,
) -> Result<Message, OriginateError> {
    for (name, value) in [
        ("channel", &params.channel),
        ("context", &params.context),
        ("extension", &params.extension),
        ("priority", &params.priority),
    ] {
        if value.trim().is_empty() {
            return Err(OriginateError::Invalid(format!("{name} is empty")));
        }
    }
    let all = [
        &params.caller_id,
        &params.channel,
        &params.context,
        &params.extension,
        &params.priority,
    ];
    // A line break in a value would inject AMI headers (from a CRM field or a script).
    if all.iter().any(|v| v.chars().any(|c| c.is_control()))
        || request_id.chars().any(|c| c.is_control())
    {
        return Err(OriginateError::Invalid(
            "a parameter contains a control character".into(),
        ));
    }
    let action_id = format!("{ACTION_ID_PREFIX}{request_id}");
    let timeout_ms = ring_timeout.as_millis().to_string();
    let variable = format!("{call_id_variable}={request_id}");
    let mut pairs: Vec<(&str, &str)> = vec![
        ("Action", "Originate"),
        ("ActionID", &action_id),
        ("Channel", &params.channel),
        ("Context", &params.context),
        ("Exten", &params.extension),
        ("Priority", &params.priority),
        ("Async", "true"),
    ];
    if !params.caller_id.is_empty() {
        pairs.push(("CallerID", &params.caller_id));
    }
    pairs.push(("Timeout", &timeout_ms));
    pairs.push(("Variable", &variable));
    Ok(Message::from_pairs(&pairs))
}

/// How an originated call ended its first phase (the employee's leg).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginateOutcome {
    /// The employee answered; Asterisk now dials the client. `uniqueid` is the
    /// employee leg's Uniqueid (the Linkedid of the resulting call).
    Answered {
        uniqueid: String,
        channel: String,
    },
    Busy,
    NoAnswer,
    Congestion,
    HungUp,
    Failed {
        reason: String,
    },
}

impl OriginateOutcome {
    /// One sentence for the log, the CRM or the terminal.
    pub fn describe(&self) -> String {
        match self {
            OriginateOutcome::Answered { uniqueid, channel } => {
                format!("employee answered on {channel}; dialling the client (call {uniqueid})")
            }
            OriginateOutcome::Busy => "employee's phone is busy".into(),
            OriginateOutcome::NoAnswer => "employee did not answer".into(),
            OriginateOutcome::Congestion => "employee's phone is unreachable (congestion)".into(),
            OriginateOutcome::HungUp => "employee rejected the call".into(),
            OriginateOutcome::Failed { reason } => format!(
                "Asterisk could not call the employee ({reason}): check that the phone is registered and [originate] channel"
            ),
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, OriginateOutcome::Answered { .. })
    }
}

/// Read an `OriginateResponse` event: the request id it belongs to and the outcome.
/// `None` for other messages and for Originates not started by kolokol.
pub fn outcome(event: &Message) -> Option<(String, OriginateOutcome)> {
    if !event.is_event("OriginateResponse") {
        return None;
    }
    let request_id = event
        .action_id()?
        .strip_prefix(ACTION_ID_PREFIX)?
        .to_string();
    let success = event
        .get("Response")
        .is_some_and(|r| r.eq_ignore_ascii_case("Success"));
    // Reason is the last control frame seen on the channel (AST_CONTROL_*).
    let reason = event.get("Reason").unwrap_or("");
    let result = if success {
        OriginateOutcome::Answered {
            uniqueid: event.get("Uniqueid").unwrap_or("").to_string(),
            channel: event.get("Channel").unwrap_or("").to_string(),
        }
    } else {
        match reason {
            "5" => OriginateOutcome::Busy,
            "3" => OriginateOutcome::NoAnswer,
            "8" => OriginateOutcome::Congestion,
            "1" => OriginateOutcome::HungUp,
            "0" => OriginateOutcome::Failed {
                reason: "channel could not be created".into(),
            },
            other => OriginateOutcome::Failed {
                reason: format!("reason {other}"),
            },
        }
    };
    Some((request_id, result))
}

/// Internal numbers: what an employee's phone is called in the dialplan.
fn is_extension(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'#' | b'_' | b'-'))
}

/// The client's number as digits (what the outbound dialplan expects).
fn client_number(raw: &str) -> Option<String> {
    let d = crate::phone::digits(raw);
    (!d.is_empty() && d.len() <= 20).then_some(d)
}

/// A fresh id when the CRM gave none (CLI, Kommo).
fn new_request_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().r#gen();
    format!("{n:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_reads_fixture_11_and_failures() {
        let ok = Message::from_pairs(&[
            ("Event", "OriginateResponse"),
            ("ActionID", "crm-originate-abc123"),
            ("Response", "Success"),
            ("Channel", "PJSIP/101-00000018"),
            ("Reason", "4"),
            ("Uniqueid", "1795304994.26"),
        ]);
        let (id, o) = outcome(&ok).unwrap();
        assert_eq!(id, "abc123");
        assert_eq!(
            o,
            OriginateOutcome::Answered {
                uniqueid: "1795304994.26".into(),
                channel: "PJSIP/101-00000018".into()
            }
        );
        let busy = Message::from_pairs(&[
            ("Event", "OriginateResponse"),
            ("ActionID", "crm-originate-x"),
            ("Response", "Failure"),
            ("Reason", "5"),
        ]);
        assert_eq!(outcome(&busy).unwrap().1, OriginateOutcome::Busy);
        let foreign =
            Message::from_pairs(&[("Event", "OriginateResponse"), ("ActionID", "someone-else")]);
        assert!(outcome(&foreign).is_none());
    }

    #[test]
    fn control_characters_cannot_inject_headers() {
        let p = OriginateParams {
            caller_id: "x\r\nAction: Command".into(),
            channel: "PJSIP/101".into(),
            context: "from-internal".into(),
            extension: "79161234567".into(),
            priority: "1".into(),
        };
        assert!(originate_action(&p, "id", Duration::from_secs(30), "CRM_CALL_ID").is_err());
    }
}
