//! `POST /click-to-call/kommo`: the Kommo widget asks to call a client.
//!
//! Body (JSON, or form-encoded): `phone` (or `to`) and either `extension` (or `from`),
//! the employee's internal number, or `user_id`, the Kommo user (mapped through
//! `[kommo] users`). Optional `request_id`. The shared secret comes in the
//! `X-Kolokol-Token` header, `Authorization: Bearer <token>`, or a `token` field.
//!
//! Answers JSON: `202 {"status":"queued","request_id":..,"action_id":..}`; 401 bad
//! token; 403 disabled; 400 bad body; 404 unknown user; 409 cancelled by
//! customization; 502 Asterisk refused or unreachable.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use super::{ClickToCall, OriginateError, OriginateRequest};

/// Bodies are tiny; anything bigger is not the widget.
const MAX_BODY: usize = 16 * 1024;

/// What the endpoint needs.
pub struct KommoClickToCall {
    pub click_to_call: Arc<ClickToCall>,
    /// `[originate] kommo_token`; empty disables the endpoint.
    pub token: String,
    /// `[kommo] users`: internal number → Kommo user id.
    pub users: BTreeMap<String, i64>,
}

/// The route fragment; the HTTP server merges it.
pub fn router(state: Arc<KommoClickToCall>) -> Router {
    Router::new()
        .route("/click-to-call/kommo", post(click_to_call))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    reply(status, json!({"status": "error", "error": msg.into()}))
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// JSON object, or `a=1&b=2`.
fn parse_body(body: &[u8]) -> Option<Map<String, Value>> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if text.starts_with('{') {
        match serde_json::from_str::<Value>(text).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    } else {
        Some(
            crate::agi::protocol::parse_query(text)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        )
    }
}

fn field(body: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match body.get(*k)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

async fn click_to_call(
    State(state): State<Arc<KommoClickToCall>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.token.is_empty() {
        return error(
            StatusCode::FORBIDDEN,
            "Kommo click-to-call is disabled: set [originate] kommo_token",
        );
    }
    let Some(body) = parse_body(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be a JSON object or a form",
        );
    };
    let presented = headers
        .get("x-kolokol-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .or_else(|| field(&body, &["token"]));
    if !presented.is_some_and(|t| same_secret(&t, &state.token)) {
        warn!("click-to-call from Kommo with a wrong or missing token");
        return error(StatusCode::UNAUTHORIZED, "wrong or missing token");
    }
    let Some(phone) = field(&body, &["phone", "to"]) else {
        return error(StatusCode::BAD_REQUEST, "phone is required");
    };
    let from = match field(&body, &["extension", "from"]) {
        Some(ext) => ext,
        None => match field(&body, &["user_id"]) {
            Some(uid) => {
                let id: Option<i64> = uid.parse().ok();
                match state.users.iter().find(|(_, u)| Some(**u) == id) {
                    Some((ext, _)) => ext.clone(),
                    None => {
                        return error(
                            StatusCode::NOT_FOUND,
                            format!("Kommo user {uid} has no internal number in [kommo] users"),
                        );
                    }
                }
            }
            None => return error(StatusCode::BAD_REQUEST, "extension or user_id is required"),
        },
    };
    let mut request_data = body.clone();
    request_data.remove("token");
    let req = OriginateRequest {
        from,
        to: phone,
        request_id: field(&body, &["request_id"]).unwrap_or_default(),
        request_data: Value::Object(request_data),
    };
    match state.click_to_call.start(req).await {
        Ok(started) => {
            info!(crm = "kommo", call_id = %started.request_id, "click-to-call started");
            reply(
                StatusCode::ACCEPTED,
                json!({
                    "status": "queued",
                    "request_id": started.request_id,
                    "action_id": started.action_id,
                    "channel": started.params.channel,
                    "extension": started.params.extension,
                }),
            )
        }
        Err(e) => {
            let status = match &e {
                OriginateError::Invalid(_) => StatusCode::BAD_REQUEST,
                OriginateError::Cancelled => StatusCode::CONFLICT,
                _ => StatusCode::BAD_GATEWAY,
            };
            warn!(crm = "kommo", error = %e, "click-to-call failed");
            error(status, e.to_string())
        }
    }
}
