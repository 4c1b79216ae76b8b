//! What can go wrong talking to Bitrix24, and what the outbox should do about it.

use std::time::Duration;

use serde_json::Value;

use crate::crm::CrmError;

/// One failed Bitrix24 request. Every variant names the REST method, and API errors also
/// carry a short form of the parameters, so an admin reading the log or the dead-letter
/// entry sees exactly which request was refused.
#[derive(Debug, thiserror::Error)]
pub enum BitrixError {
    /// Bitrix24 answered `{"error": CODE, "error_description": TEXT}`.
    #[error("Bitrix24 {method} {params}: {}{description} (HTTP {status})", if code.is_empty() { String::new() } else { format!("{code}: ") })]
    Api {
        method: String,
        params: String,
        status: u16,
        code: String,
        description: String,
    },
    /// The request did not complete (connection refused, timeout, reset).
    #[error("Bitrix24 {method}: request failed: {reason}")]
    Transport { method: String, reason: String },
    /// The answer was not the JSON Bitrix24 sends.
    #[error("Bitrix24 {method}: unreadable answer (HTTP {status}): {snippet}")]
    BadResponse {
        method: String,
        status: u16,
        snippet: String,
    },
    /// OAuth could not produce an access token.
    #[error(
        "Bitrix24 OAuth: {reason}. Reinstall the local application or put a fresh refresh token in [bitrix24] refresh_token"
    )]
    Auth { reason: String },
    /// The connector is not usable with this configuration.
    #[error("Bitrix24 config: {0}")]
    Config(String),
}

/// Codes that mean "slow down", answered with HTTP 503.
pub const QUERY_LIMIT_EXCEEDED: &str = "QUERY_LIMIT_EXCEEDED";
/// The OAuth access token is too old: refresh and retry.
pub const EXPIRED_TOKEN: &str = "expired_token";

impl BitrixError {
    /// The Bitrix24 error code, if Bitrix24 sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            BitrixError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The human description Bitrix24 sent.
    pub fn description(&self) -> &str {
        match self {
            BitrixError::Api { description, .. } => description,
            _ => "",
        }
    }

    /// Worth retrying later: rate limit, server trouble, network.
    pub fn is_retryable(&self) -> bool {
        match self {
            BitrixError::Api { status, code, .. } => {
                code == QUERY_LIMIT_EXCEEDED
                    || *status >= 500
                    || *status == 429
                    || code == "INTERNAL_SERVER_ERROR"
                    || code == "OVERLOAD_LIMIT"
            }
            BitrixError::Transport { .. } => true,
            BitrixError::BadResponse { status, .. } => *status >= 500 || *status == 0,
            BitrixError::Auth { .. } | BitrixError::Config(_) => false,
        }
    }

    /// Access is refused as a whole (bad webhook, revoked app, missing scope).
    pub fn is_blocking(&self) -> bool {
        match self {
            BitrixError::Api { status, code, .. } => {
                matches!(
                    code.as_str(),
                    "invalid_token"
                        | "NO_AUTH_FOUND"
                        | "insufficient_scope"
                        | "ACCESS_DENIED"
                        | "WRONG_AUTH_TYPE"
                        | "INVALID_CREDENTIALS"
                        | "authorization_error"
                        | "PAYMENT_REQUIRED"
                        | "ACCOUNT_BLOCKED"
                ) || (*status == 401 && code != EXPIRED_TOKEN)
            }
            BitrixError::Auth { .. } => true,
            _ => false,
        }
    }

    /// What the outbox worker should do with the job.
    pub fn into_crm(self) -> CrmError {
        if self.is_retryable() {
            let retry_after = match self.code() {
                Some(QUERY_LIMIT_EXCEEDED) => Some(Duration::from_secs(2)),
                _ => None,
            };
            CrmError::Retryable {
                message: self.to_string(),
                retry_after,
            }
        } else if self.is_blocking() {
            CrmError::Blocked {
                message: self.to_string(),
            }
        } else {
            CrmError::Rejected {
                message: self.to_string(),
            }
        }
    }
}

/// A short, log-safe rendering of request parameters: long strings (file contents,
/// tokens) are cut so one error line stays readable.
pub fn summarize_params(params: &Value) -> String {
    fn cut(v: &Value) -> Value {
        match v {
            Value::String(s) if s.chars().count() > 80 => {
                let head: String = s.chars().take(40).collect();
                Value::String(format!("{head}…({} chars)", s.chars().count()))
            }
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        if k == "auth" || k == "client_secret" || k == "refresh_token" {
                            (k.clone(), Value::String("***".into()))
                        } else {
                            (k.clone(), cut(v))
                        }
                    })
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(cut).collect()),
            other => other.clone(),
        }
    }
    let mut s = cut(params).to_string();
    if s.len() > 600 {
        let mut end = 600;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn api_error_names_method_and_params() {
        let e = BitrixError::Api {
            method: "telephony.externalcall.finish".into(),
            params: summarize_params(&json!({"CALL_ID": "x", "FILE_CONTENT": "A".repeat(500)})),
            status: 400,
            code: "ERROR_ARGUMENT".into(),
            description: "USER_ID is not set".into(),
        };
        let text = e.to_string();
        assert!(text.contains("telephony.externalcall.finish"), "{text}");
        assert!(text.contains("CALL_ID"), "{text}");
        assert!(
            text.contains("ERROR_ARGUMENT: USER_ID is not set"),
            "{text}"
        );
        assert!(text.len() < 400, "{text}");
        assert!(matches!(e.into_crm(), CrmError::Rejected { .. }));
    }

    #[test]
    fn classification() {
        let api = |status, code: &str| BitrixError::Api {
            method: "m".into(),
            params: "{}".into(),
            status,
            code: code.into(),
            description: String::new(),
        };
        assert!(matches!(
            api(503, QUERY_LIMIT_EXCEEDED).into_crm(),
            CrmError::Retryable { .. }
        ));
        assert!(matches!(
            api(401, "invalid_token").into_crm(),
            CrmError::Blocked { .. }
        ));
        assert!(matches!(
            api(403, "insufficient_scope").into_crm(),
            CrmError::Blocked { .. }
        ));
        assert!(matches!(api(400, "").into_crm(), CrmError::Rejected { .. }));
    }
}
