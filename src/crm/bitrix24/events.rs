//! Click-to-call from Bitrix24: the `ONEXTERNALCALLSTART` event.
//!
//! Bitrix24 registers the call itself before it sends the event, so the event carries
//! the `CALL_ID` to finish later; kolokol must not register the call again. Two ways in:
//!
//! * **online**: Bitrix24 POSTs the event form-encoded to `POST /bitrix24/events`
//!   ([`router`]); `auth[application_token]` must equal `[bitrix24] application_token`.
//!   Bitrix24 does not retry, and needs to reach kolokol.
//! * **offline**: bind the event with `event.bind` `event_type=offline` and kolokol polls
//!   `event.offline.get` ([`spawn_offline_poller`]); works for a PBX behind NAT.
//!
//! Either way each event becomes one [`ClickToCall`] on a channel; the daemon's
//! click-to-call path originates it (first the employee's phone, then the client) and
//! sets the channel variable [`CRM_CALL_ID_VAR`] to `crm_call_id`; the tracker exposes
//! it as `call_full.crm_call_id` (or `call_full.variables.CRM_CALL_ID`), and the
//! connector then finishes that `CALL_ID` instead of registering a new call. As a
//! fallback, an outbound call from the same extension to the same number within 5
//! minutes adopts the pending `CALL_ID`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::Client;
use super::form;
use super::users::{Directory, as_i64};

/// Channel variable the originate path sets to the Bitrix24 `CALL_ID`.
pub const CRM_CALL_ID_VAR: &str = "CRM_CALL_ID";

/// Largest accepted event body.
const MAX_EVENT_BODY: usize = 64 * 1024;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    #[default]
    Online,
    Offline,
}

/// A click-to-call request from Bitrix24, ready to originate.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct ClickToCall {
    /// The employee's internal number (the phone to ring first).
    pub extension: String,
    /// The number to call, as Bitrix24 has it.
    pub phone: String,
    /// `PHONE_NUMBER_INTERNATIONAL` when Bitrix24 sent it.
    pub phone_international: String,
    /// Bitrix24's `CALL_ID`, already registered: set it as [`CRM_CALL_ID_VAR`].
    pub crm_call_id: String,
    pub user_id: i64,
    pub crm_entity_type: Option<String>,
    pub crm_entity_id: Option<i64>,
    pub line_number: String,
    pub call_list_id: Option<i64>,
    pub is_mobile: bool,
    pub source: EventSource,
}

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("ONEXTERNALCALLSTART without {0}")]
    Missing(&'static str),
    #[error("Bitrix24 user {0} has no internal number (UF_PHONE_INNER): cannot ring them")]
    NoExtension(i64),
    #[error("click-to-call queue is closed")]
    Closed,
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Handed to the originate path.
    Queued(ClickToCall),
    /// The same event within the dedup window: dropped.
    Duplicate,
}

/// Click-to-call requests waiting for the PBX call they cause.
pub struct PendingClickToCalls {
    ttl: Duration,
    items: Mutex<Vec<(Instant, ClickToCall)>>,
}

impl PendingClickToCalls {
    pub fn new(ttl: Duration) -> Self {
        PendingClickToCalls {
            ttl,
            items: Mutex::new(Vec::new()),
        }
    }

    fn prune(&self, items: &mut Vec<(Instant, ClickToCall)>) {
        let ttl = self.ttl;
        items.retain(|(t, _)| t.elapsed() < ttl);
        if items.len() > 1000 {
            let extra = items.len() - 1000;
            items.drain(..extra);
        }
    }

    pub fn insert(&self, c: ClickToCall) {
        if let Ok(mut items) = self.items.lock() {
            self.prune(&mut items);
            items.push((Instant::now(), c));
        }
    }

    /// The request with this `CALL_ID`.
    pub fn take_by_call_id(&self, crm_call_id: &str) -> Option<ClickToCall> {
        let mut items = self.items.lock().ok()?;
        let i = items
            .iter()
            .position(|(_, c)| c.crm_call_id == crm_call_id)?;
        Some(items.remove(i).1)
    }

    /// The oldest live request from `extension` to `phone` (compared by last 10 digits).
    pub fn take_match(&self, extension: &str, phone: &str) -> Option<ClickToCall> {
        let mut items = self.items.lock().ok()?;
        self.prune(&mut items);
        let want = crate::phone::last10(phone);
        if want.is_empty() {
            return None;
        }
        let i = items.iter().position(|(_, c)| {
            c.extension == extension
                && (crate::phone::last10(&c.phone) == want
                    || crate::phone::last10(&c.phone_international) == want)
        })?;
        Some(items.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.items.lock().map(|i| i.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Accepts `ONEXTERNALCALLSTART` events from both paths.
pub struct ClickToCallIntake {
    application_token: String,
    window: Duration,
    seen: Mutex<HashMap<String, Instant>>,
    tx: mpsc::Sender<ClickToCall>,
    pending: Arc<PendingClickToCalls>,
    users: Arc<Directory>,
    /// Closes calls Bitrix24 registered for dropped double clicks.
    closer: Option<Arc<Client>>,
}

impl ClickToCallIntake {
    /// `tx` receives every accepted request. `application_token` empty refuses all
    /// online events (offline ones need no token: kolokol fetched them itself).
    pub fn new(
        application_token: String,
        dedup_window: Duration,
        tx: mpsc::Sender<ClickToCall>,
        pending: Arc<PendingClickToCalls>,
        users: Arc<Directory>,
    ) -> Arc<Self> {
        Arc::new(ClickToCallIntake {
            application_token,
            window: dedup_window,
            seen: Mutex::new(HashMap::new()),
            tx,
            pending,
            users,
            closer: None,
        })
    }

    /// Like [`ClickToCallIntake::new`], and the Bitrix24 calls of dropped double clicks
    /// are finished as cancelled (`603-S`) through `client` so no card stays open.
    pub fn with_closer(
        application_token: String,
        dedup_window: Duration,
        tx: mpsc::Sender<ClickToCall>,
        pending: Arc<PendingClickToCalls>,
        users: Arc<Directory>,
        client: Arc<Client>,
    ) -> Arc<Self> {
        Arc::new(ClickToCallIntake {
            application_token,
            window: dedup_window,
            seen: Mutex::new(HashMap::new()),
            tx,
            pending,
            users,
            closer: Some(client),
        })
    }

    /// Take one event's `data` (the `EVENT_DATA` of an offline event).
    pub async fn accept(&self, data: &Value, source: EventSource) -> Result<Accepted, EventError> {
        let s = |k: &str| -> String {
            match data.get(k) {
                Some(Value::String(s)) => s.trim().to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            }
        };
        let crm_call_id = s("CALL_ID");
        let phone = s("PHONE_NUMBER");
        if crm_call_id.is_empty() {
            return Err(EventError::Missing("CALL_ID"));
        }
        if phone.is_empty() {
            return Err(EventError::Missing("PHONE_NUMBER"));
        }
        let user_id = as_i64(data.get("USER_ID")).unwrap_or(0);
        // Repeats within the window: the same event again (Bitrix24 resends, or both
        // online and offline delivery are bound), or a double click on the same number,
        // which Bitrix24 registers as a second call.
        let key = crm_call_id.clone();
        let click_key = format!("{user_id}/{}", crate::phone::last10(&phone));
        {
            let Ok(mut seen) = self.seen.lock() else {
                return Err(EventError::Closed);
            };
            let window = self.window;
            seen.retain(|_, t| t.elapsed() < window);
            if seen.contains_key(&key) {
                info!(crm = "bitrix24", crm_call_id = %key, "repeated ONEXTERNALCALLSTART dropped");
                return Ok(Accepted::Duplicate);
            }
            if user_id > 0 && seen.contains_key(&click_key) {
                seen.insert(key, Instant::now());
                info!(crm = "bitrix24", crm_call_id = %crm_call_id, phone = %phone, "second click on the same number dropped; its call is closed as cancelled");
                if let Some(client) = &self.closer {
                    // Bitrix24 opened a card for it: close that call as cancelled.
                    let client = client.clone();
                    let params = json!({"CALL_ID": crm_call_id, "USER_ID": user_id, "DURATION": 0, "STATUS_CODE": "603-S"});
                    tokio::spawn(async move {
                        if let Err(e) = client.call("telephony.externalcall.finish", params).await {
                            warn!(crm = "bitrix24", error = %e, "cannot close the duplicate click-to-call");
                        }
                    });
                }
                return Ok(Accepted::Duplicate);
            }
            seen.insert(key, Instant::now());
            if user_id > 0 {
                seen.insert(click_key, Instant::now());
            }
        }
        let mut extension = crate::phone::digits(&s("EXTENSION"));
        if extension.is_empty()
            && user_id > 0
            && let Ok(Some(e)) = self.users.by_id(user_id).await
        {
            extension = e.extension;
        }
        if extension.is_empty() {
            warn!(
                crm = "bitrix24",
                user_id,
                "click-to-call from a Bitrix24 user without an internal number: set UF_PHONE_INNER"
            );
            return Err(EventError::NoExtension(user_id));
        }
        let c = ClickToCall {
            extension,
            phone,
            phone_international: s("PHONE_NUMBER_INTERNATIONAL"),
            crm_call_id,
            user_id,
            crm_entity_type: Some(s("CRM_ENTITY_TYPE")).filter(|x| !x.is_empty()),
            crm_entity_id: as_i64(data.get("CRM_ENTITY_ID")).filter(|i| *i > 0),
            line_number: s("LINE_NUMBER"),
            call_list_id: as_i64(data.get("CALL_LIST_ID")).filter(|i| *i > 0),
            is_mobile: matches!(s("IS_MOBILE").as_str(), "Y" | "1" | "true"),
            source,
        };
        info!(crm = "bitrix24", crm_call_id = %c.crm_call_id, extension = %c.extension, phone = %c.phone, source = ?source, "click-to-call requested");
        self.pending.insert(c.clone());
        self.tx
            .send(c.clone())
            .await
            .map_err(|_| EventError::Closed)?;
        Ok(Accepted::Queued(c))
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same_token(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn handle_event(
    State(intake): State<Arc<ClickToCallIntake>>,
    body: Bytes,
) -> (StatusCode, String) {
    if body.len() > MAX_EVENT_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, "event too large".into());
    }
    let text = String::from_utf8_lossy(&body);
    let v = form::decode(&text);
    let token = v
        .get("auth")
        .and_then(|a| a.get("application_token"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if intake.application_token.is_empty() || !same_token(token, &intake.application_token) {
        warn!(
            crm = "bitrix24",
            "Bitrix24 event with a wrong application_token refused: check [bitrix24] application_token"
        );
        return (StatusCode::UNAUTHORIZED, "bad application_token".into());
    }
    let event = v.get("event").and_then(Value::as_str).unwrap_or("");
    if !event.eq_ignore_ascii_case("ONEXTERNALCALLSTART") {
        return (StatusCode::OK, format!("ignored {event}"));
    }
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    match intake.accept(&data, EventSource::Online).await {
        Ok(Accepted::Queued(_)) => (StatusCode::OK, "queued".into()),
        Ok(Accepted::Duplicate) => (StatusCode::OK, "duplicate".into()),
        Err(e @ EventError::Closed) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

/// `POST /bitrix24/events` for online events.
pub fn router(state: Arc<ClickToCallIntake>) -> Router {
    Router::new()
        .route("/bitrix24/events", post(handle_event))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_EVENT_BODY))
        .with_state(state)
}

/// Bind `ONEXTERNALCALLSTART` as an offline event (idempotent: "already bound" is
/// fine). `event.bind` needs an application; with a webhook it fails, and the admin
/// binds the event once by hand (logged with how).
pub async fn bind_offline(client: &Client) {
    match client
        .call(
            "event.bind",
            json!({"event": "ONEXTERNALCALLSTART", "event_type": "offline"}),
        )
        .await
    {
        Ok(_) => info!(
            crm = "bitrix24",
            "ONEXTERNALCALLSTART bound as an offline event"
        ),
        Err(e) if e.description().to_lowercase().contains("already") => {}
        Err(e) => warn!(
            crm = "bitrix24",
            error = %e,
            "cannot bind ONEXTERNALCALLSTART as an offline event; bind it once with the local application (event.bind event=ONEXTERNALCALLSTART event_type=offline)"
        ),
    }
}

/// Fetch (and clear) queued offline events once; returns how many were read.
pub async fn poll_offline_once(
    client: &Client,
    intake: &ClickToCallIntake,
) -> Result<usize, super::BitrixError> {
    let r = client
        .call(
            "event.offline.get",
            json!({"filter": {"EVENT_NAME": "ONEXTERNALCALLSTART"}, "limit": 50, "clear": 1}),
        )
        .await?;
    let events = r
        .get("events")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for ev in &events {
        let name = ev.get("EVENT_NAME").and_then(Value::as_str).unwrap_or("");
        if !name.eq_ignore_ascii_case("ONEXTERNALCALLSTART") {
            continue;
        }
        let data = ev.get("EVENT_DATA").cloned().unwrap_or(Value::Null);
        if let Err(e) = intake.accept(&data, EventSource::Offline).await {
            warn!(crm = "bitrix24", error = %e, "offline click-to-call event skipped");
        }
    }
    Ok(events.len())
}

/// Poll `event.offline.get` every `interval` until `stop` is cancelled. A full page is
/// followed at once by the next poll.
pub fn spawn_offline_poller(
    client: Arc<Client>,
    intake: Arc<ClickToCallIntake>,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let wait = match poll_offline_once(&client, &intake).await {
                Ok(n) if n >= 50 => Duration::ZERO,
                Ok(_) => {
                    failures = 0;
                    interval
                }
                Err(e) => {
                    failures += 1;
                    warn!(crm = "bitrix24", error = %e, "event.offline.get failed");
                    (interval * 2u32.saturating_pow(failures.min(5))).min(Duration::from_secs(60))
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    })
}
