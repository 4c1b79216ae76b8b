//! A stateful sandbox Bitrix24 portal: an in-process axum server implementing the REST
//! methods kolokol uses, with their documented answers and errors:
//!
//! * `telephony.externalcall.register/show/hide/finish`, `telephony.externalCall.attachRecord`
//!   (refused before `finish` with "Call is not found in the statistic table. Looks like
//!   it is not finished yet."), `telephony.externalCall.searchCrmEntities`;
//! * the 30-minute `CALL_ID` reuse: the same register parameters (including the same or
//!   a missing `EXTERNAL_CALL_ID`) within 30 minutes answer the same `CALL_ID`, even
//!   when that call is finished (whose second `finish` then fails);
//! * `user.get` (pages of 50, `UF_PHONE_INNER`), `crm.duplicate.findbycomm`,
//!   `crm.{lead,contact,company}.{get,update}`, `crm.lead.add`, `crm.activity.todo.add`,
//!   `im.notify`, `scope`, `event.bind`, `event.offline.get`, `batch`;
//! * a leaky bucket (2 req/s, 50 deep by default) answering 503 `QUERY_LIMIT_EXCEEDED`;
//! * webhook auth (`/rest/1/<secret>/method`) and OAuth (`?auth=`, `expired_token`,
//!   `/oauth/token/` refresh with rotation).
//!
//! Tests read everything that happened through [`SandboxHandle::snapshot`] and steer it
//! with knobs (forced errors, latency, clock, rate).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::crm::bitrix24::form;

/// The webhook secret of the sandbox portal.
pub const WEBHOOK_SECRET: &str = "sandboxsecret";
/// The webhook user id.
pub const WEBHOOK_USER: i64 = 1;

/// A portal user.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub last_name: String,
    pub active: bool,
    pub uf_phone_inner: String,
}

/// A lead, contact or company.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// `LEAD`, `CONTACT`, `COMPANY`.
    pub kind: String,
    pub id: i64,
    /// Lead/company title or contact name.
    pub title: String,
    pub phones: Vec<String>,
    pub assigned_by_id: i64,
    /// Leads: `NEW`, `IN_PROCESS`, `CONVERTED`, ...
    pub status_id: String,
    /// Created by a call registration.
    pub created_by_call: bool,
}

/// A registered external call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub call_id: String,
    pub external_call_id: String,
    pub user_id: i64,
    pub phone: String,
    pub call_type: i64,
    pub line_number: String,
    pub start_date: String,
    pub crm_create: bool,
    pub show: bool,
    pub crm_entity_type: String,
    pub crm_entity_id: i64,
    pub created_lead: Option<i64>,
    /// Sandbox clock (ms) at registration.
    pub registered_at_ms: u64,
    /// The parameters of the (first successful) finish.
    pub finish: Option<Value>,
    /// How many times finish was requested (successful or not).
    pub finish_requests: u32,
    /// Attached recordings: `{"RECORD_URL": ...}` or `{"FILENAME": ..., "BYTES": n}`.
    pub records: Vec<Value>,
}

/// A card shown or hidden.
#[derive(Debug, Clone, PartialEq)]
pub struct CardEvent {
    pub call_id: String,
    pub user_id: i64,
    /// `show`, `hide`, or `finish` (the finishing user's card closes with the call).
    pub action: String,
}

/// One request as received (batch commands are logged individually with `in_batch`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub params: Value,
    pub status: u16,
    pub error: Option<String>,
    pub in_batch: bool,
}

/// A forced failure for the next request(s) of a method.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub status: u16,
    pub error: String,
    pub description: String,
}

/// Everything the sandbox knows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub users: Vec<User>,
    pub entities: Vec<Entity>,
    pub calls: BTreeMap<String, Call>,
    pub cards: Vec<CardEvent>,
    pub requests: Vec<Request>,
    pub activities: Vec<Value>,
    pub notifications: Vec<Value>,
    pub offline_events: VecDeque<Value>,
    pub bound_events: Vec<Value>,
    pub scopes: Vec<String>,
    pub access_token: String,
    pub refresh_token: String,
    pub refreshes: u32,
}

impl Snapshot {
    /// Requests of one method (batch commands included).
    pub fn count(&self, method: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method))
            .count()
    }
    /// Card events of one call, in order.
    pub fn cards_of(&self, call_id: &str) -> Vec<(String, i64)> {
        self.cards
            .iter()
            .filter(|c| c.call_id == call_id)
            .map(|c| (c.action.clone(), c.user_id))
            .collect()
    }
    /// The call registered with this `EXTERNAL_CALL_ID`.
    pub fn call_by_external(&self, external: &str) -> Option<&Call> {
        self.calls.values().find(|c| c.external_call_id == external)
    }
    /// Leads created by call registrations.
    pub fn created_leads(&self) -> Vec<&Entity> {
        self.entities
            .iter()
            .filter(|e| e.kind == "LEAD" && e.created_by_call)
            .collect()
    }
}

struct Inner {
    snap: Snapshot,
    faults: HashMap<String, VecDeque<Fault>>,
    latency: Duration,
    rate: f64,
    burst: f64,
    level: f64,
    last_drain: Instant,
    clock_offset: Duration,
    started: Instant,
    expired_tokens: Vec<String>,
    next_id: i64,
    /// Told of every successful finish (see [`SandboxHandle::watch_finishes`]).
    finish_watch: Option<tokio::sync::mpsc::UnboundedSender<FinishSeen>>,
}

/// A successful `telephony.externalcall.finish`: the call's EXTERNAL_CALL_ID and when
/// the request arrived.
#[derive(Debug, Clone)]
pub struct FinishSeen {
    pub external_call_id: String,
    pub at: std::time::Instant,
}

impl Inner {
    fn now_ms(&self) -> u64 {
        (self.started.elapsed() + self.clock_offset).as_millis() as u64
    }
    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The running sandbox. Dropping it stops the server.
pub struct SandboxHandle {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Entry point.
pub struct SandboxBitrix24;

impl SandboxBitrix24 {
    /// Start on an ephemeral port of 127.0.0.1, with users 101, 102, 103 (ids 11, 12,
    /// 13), a user 14 without an internal number, and webhook user 1.
    pub async fn start() -> std::io::Result<SandboxHandle> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let users = vec![
            user(WEBHOOK_USER, "Admin", "Portal", ""),
            user(11, "Alice", "Operator", "101"),
            user(12, "Bob", "Operator", "102"),
            user(13, "Carol", "Operator", "103"),
            user(14, "Dave", "Sales", ""),
        ];
        let inner = Arc::new(Mutex::new(Inner {
            snap: Snapshot {
                users,
                entities: Vec::new(),
                calls: BTreeMap::new(),
                cards: Vec::new(),
                requests: Vec::new(),
                activities: Vec::new(),
                notifications: Vec::new(),
                offline_events: VecDeque::new(),
                bound_events: Vec::new(),
                scopes: ["telephony", "crm", "user", "im", "placement"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                access_token: "access-1".into(),
                refresh_token: "refresh-1".into(),
                refreshes: 0,
            },
            faults: HashMap::new(),
            latency: Duration::ZERO,
            rate: 2.0,
            burst: 50.0,
            level: 0.0,
            last_drain: Instant::now(),
            clock_offset: Duration::ZERO,
            started: Instant::now(),
            expired_tokens: Vec::new(),
            next_id: 100,
            finish_watch: None,
        }));
        let app = Router::new()
            .route("/rest/{*path}", any(rest))
            .route("/oauth/token/", get(oauth_token))
            .with_state(inner.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(SandboxHandle {
            addr,
            inner,
            _stop: tx,
        })
    }
}

fn user(id: i64, name: &str, last: &str, inner: &str) -> User {
    User {
        id,
        name: name.into(),
        last_name: last.into(),
        active: true,
        uf_phone_inner: inner.into(),
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SandboxHandle {
    /// `http://127.0.0.1:PORT/rest/1/sandboxsecret/`
    pub fn webhook_url(&self) -> String {
        format!("http://{}/rest/{WEBHOOK_USER}/{WEBHOOK_SECRET}/", self.addr)
    }
    /// The portal base for OAuth mode.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// The OAuth token endpoint.
    pub fn oauth_url(&self) -> String {
        format!("http://{}/oauth/token/", self.addr)
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// OAuth application credentials the sandbox accepts.
    pub fn client_credentials(&self) -> (&'static str, &'static str) {
        ("sandbox.app", "sandbox-secret")
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> Snapshot {
        lock(&self.inner).snap.clone()
    }

    /// Every successful finish from now on, as it happens (cheaper than polling
    /// [`Self::snapshot`] when there are thousands; benchmarks time deliveries with it).
    pub fn watch_finishes(&self) -> tokio::sync::mpsc::UnboundedReceiver<FinishSeen> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.inner).finish_watch = Some(tx);
        rx
    }

    /// Fail the next `count` requests of `method` (`"*"` = any) with this error.
    pub fn fail_next(
        &self,
        method: &str,
        count: usize,
        status: u16,
        error: &str,
        description: &str,
    ) {
        let mut i = lock(&self.inner);
        let q = i.faults.entry(method.to_lowercase()).or_default();
        for _ in 0..count {
            q.push_back(Fault {
                status,
                error: error.into(),
                description: description.into(),
            });
        }
    }
    /// Delay every answer.
    pub fn set_latency(&self, d: Duration) {
        lock(&self.inner).latency = d;
    }
    /// Leaky bucket: drain rate per second and depth.
    pub fn set_rate(&self, per_sec: f64, burst: u32) {
        let mut i = lock(&self.inner);
        i.rate = per_sec;
        i.burst = f64::from(burst);
        i.level = 0.0;
    }
    /// Move the sandbox clock forward (for the 30-minute CALL_ID reuse).
    pub fn advance(&self, d: Duration) {
        lock(&self.inner).clock_offset += d;
    }
    /// Make the current OAuth access token expired.
    pub fn expire_access_token(&self) {
        let mut i = lock(&self.inner);
        let t = i.snap.access_token.clone();
        i.expired_tokens.push(t);
        i.snap.access_token = format!("dead-{}", i.snap.refreshes);
    }
    pub fn set_scopes(&self, scopes: &[&str]) {
        lock(&self.inner).snap.scopes = scopes.iter().map(|s| s.to_string()).collect();
    }
    pub fn add_user(&self, u: User) {
        lock(&self.inner).snap.users.push(u);
    }
    /// Add a CRM entity; returns its id.
    pub fn add_entity(
        &self,
        kind: &str,
        title: &str,
        phones: &[&str],
        assigned_by_id: i64,
        status_id: &str,
    ) -> i64 {
        let mut i = lock(&self.inner);
        let id = i.id();
        i.snap.entities.push(Entity {
            kind: kind.to_uppercase(),
            id,
            title: title.into(),
            phones: phones.iter().map(|s| s.to_string()).collect(),
            assigned_by_id,
            status_id: status_id.into(),
            created_by_call: false,
        });
        id
    }
    /// Queue an offline event (as `event.bind` with `event_type=offline` would).
    pub fn push_offline_event(&self, name: &str, data: Value) {
        let mut i = lock(&self.inner);
        let id = i.id();
        i.snap.offline_events.push_back(json!({
            "ID": id.to_string(),
            "TIMESTAMP_X": "2026-11-21T23:50:00+03:00",
            "EVENT_NAME": name.to_uppercase(),
            "EVENT_DATA": data,
            "EVENT_ADDITIONAL": {"user_id": "1"},
            "MESSAGE_ID": format!("msg{id}"),
        }));
    }
}

type Shared = Arc<Mutex<Inner>>;

struct ApiErr {
    status: u16,
    error: String,
    description: String,
}

fn err(status: u16, error: &str, description: &str) -> ApiErr {
    ApiErr {
        status,
        error: error.into(),
        description: description.into(),
    }
}

fn reply(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn oauth_token(
    State(s): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut i = lock(&s);
    let ok = q.get("grant_type").map(String::as_str) == Some("refresh_token")
        && q.get("client_id").map(String::as_str) == Some("sandbox.app")
        && q.get("client_secret").map(String::as_str) == Some("sandbox-secret");
    if !ok {
        return reply(
            400,
            json!({"error": "invalid_client", "error_description": "invalid client credentials"}),
        );
    }
    if q.get("refresh_token") != Some(&i.snap.refresh_token) {
        return reply(
            400,
            json!({"error": "invalid_grant", "error_description": "Invalid refresh token"}),
        );
    }
    i.snap.refreshes += 1;
    let n = i.snap.refreshes + 1;
    i.snap.access_token = format!("access-{n}");
    i.snap.refresh_token = format!("refresh-{n}");
    reply(
        200,
        json!({
            "access_token": i.snap.access_token,
            "expires_in": 3600,
            "refresh_token": i.snap.refresh_token,
            "scope": "app",
            "domain": "oauth.bitrix.info",
            "status": "L",
        }),
    )
}

async fn rest(
    State(s): State<Shared>,
    Path(path): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = lock(&s).latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Auth: webhook path, or OAuth `auth` parameter.
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (method, auth_ok) = match parts.as_slice() {
        [uid, secret, method] => (
            method.to_string(),
            uid.parse::<i64>().ok() == Some(WEBHOOK_USER) && *secret == WEBHOOK_SECRET,
        ),
        [method] => (method.to_string(), true),
        _ => {
            return reply(
                404,
                json!({"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}),
            );
        }
    };
    if !auth_ok {
        return reply(
            401,
            json!({"error": "INVALID_CREDENTIALS", "error_description": "Invalid request credentials"}),
        );
    }
    let method = method.trim_end_matches(".json").to_string();
    let mut params = if body.is_empty() {
        Value::Object(Map::new())
    } else if headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("json"))
    {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return reply(
                    400,
                    json!({"error": "INVALID_REQUEST", "error_description": "Invalid JSON body"}),
                );
            }
        }
    } else {
        form::arrays_from_indexed(form::decode(&String::from_utf8_lossy(&body)))
    };
    let webhook = parts.len() == 3;
    let token = q.get("auth").cloned().or_else(|| {
        params
            .get("auth")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    if let Value::Object(m) = &mut params {
        for (k, v) in &q {
            if k != "auth" {
                m.entry(k.clone()).or_insert(Value::String(v.clone()));
            }
        }
        m.remove("auth");
    }
    let mut i = lock(&s);
    if !webhook {
        match token {
            Some(t) if t == i.snap.access_token => {}
            Some(t) if i.expired_tokens.contains(&t) => {
                return log_reply(
                    &mut i,
                    &method,
                    &params,
                    err(
                        401,
                        "expired_token",
                        "The access token provided has expired.",
                    ),
                );
            }
            _ => {
                return log_reply(
                    &mut i,
                    &method,
                    &params,
                    err(
                        401,
                        "invalid_token",
                        "The access token provided is invalid.",
                    ),
                );
            }
        }
    }
    // Leaky bucket: every request (a batch is one) fills it; it drains at `rate`.
    let now = Instant::now();
    let drained = now.duration_since(i.last_drain).as_secs_f64() * i.rate;
    i.level = (i.level - drained).max(0.0);
    i.last_drain = now;
    if i.level + 1.0 > i.burst {
        return log_reply(
            &mut i,
            &method,
            &params,
            err(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"),
        );
    }
    i.level += 1.0;
    if let Some(f) = take_fault(&mut i, &method) {
        return log_reply(
            &mut i,
            &method,
            &params,
            err(f.status, &f.error, &f.description),
        );
    }
    if method.eq_ignore_ascii_case("batch") {
        let out = batch(&mut i, &params);
        i.snap.requests.push(Request {
            method: "batch".into(),
            params: params.clone(),
            status: 200,
            error: None,
            in_batch: false,
        });
        return reply(200, json!({"result": out, "time": {"start": 0}}));
    }
    match dispatch(&mut i, &method, &params) {
        Ok(v) => {
            i.snap.requests.push(Request {
                method: method.clone(),
                params: params.clone(),
                status: 200,
                error: None,
                in_batch: false,
            });
            let mut body = json!({"result": v.0, "time": {"start": 0}});
            if let Some(next) = v.1 {
                body["next"] = json!(next);
            }
            if let Some(total) = v.2 {
                body["total"] = json!(total);
            }
            reply(200, body)
        }
        Err(e) => log_reply(&mut i, &method, &params, e),
    }
}

fn take_fault(i: &mut Inner, method: &str) -> Option<Fault> {
    for key in [method.to_lowercase(), "*".to_string()] {
        if let Some(q) = i.faults.get_mut(&key)
            && let Some(f) = q.pop_front()
        {
            return Some(f);
        }
    }
    None
}

fn log_reply(i: &mut Inner, method: &str, params: &Value, e: ApiErr) -> Response {
    i.snap.requests.push(Request {
        method: method.to_string(),
        params: params.clone(),
        status: e.status,
        error: Some(e.error.clone()),
        in_batch: false,
    });
    reply(
        e.status,
        json!({"error": e.error, "error_description": e.description}),
    )
}

fn batch(i: &mut Inner, params: &Value) -> Value {
    let halt = p_bool(params, "halt");
    let mut results = Map::new();
    let mut errors = Map::new();
    if let Some(Value::Object(cmds)) = params.get("cmd") {
        for (key, cmd) in cmds.iter().take(50) {
            let Some(cmd) = cmd.as_str() else { continue };
            let (method, query) = cmd.split_once('?').unwrap_or((cmd, ""));
            let p = form::arrays_from_indexed(form::decode(query));
            let r = match take_fault(i, method) {
                Some(f) => Err(err(f.status, &f.error, &f.description)),
                None => dispatch(i, method, &p),
            };
            i.snap.requests.push(Request {
                method: method.to_string(),
                params: p.clone(),
                status: r.as_ref().map(|_| 200).unwrap_or_else(|e| e.status),
                error: r.as_ref().err().map(|e| e.error.clone()),
                in_batch: true,
            });
            match r {
                Ok(v) => {
                    results.insert(key.clone(), v.0);
                }
                Err(e) => {
                    errors.insert(
                        key.clone(),
                        json!({"error": e.error, "error_description": e.description}),
                    );
                    if halt {
                        break;
                    }
                }
            }
        }
    }
    // PHP sends empty maps as [].
    let wrap = |m: Map<String, Value>| {
        if m.is_empty() {
            json!([])
        } else {
            Value::Object(m)
        }
    };
    json!({"result": wrap(results), "result_error": wrap(errors), "result_total": [], "result_next": [], "result_time": []})
}

fn p_str(p: &Value, k: &str) -> String {
    match p.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => {
            if *b {
                "1".into()
            } else {
                "0".into()
            }
        }
        _ => String::new(),
    }
}

fn p_i64(p: &Value, k: &str) -> Option<i64> {
    match p.get(k)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn p_bool(p: &Value, k: &str) -> bool {
    match p.get(k) {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0) != 0,
        Some(Value::String(s)) => matches!(s.as_str(), "1" | "Y" | "true"),
        _ => false,
    }
}

fn p_ids(p: &Value, k: &str) -> Vec<i64> {
    match p.get(k) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| match v {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            })
            .collect(),
        Some(_) => p_i64(p, k).into_iter().collect(),
        None => Vec::new(),
    }
}

type Out = (Value, Option<i64>, Option<i64>);

fn ok(v: Value) -> Result<Out, ApiErr> {
    Ok((v, None, None))
}

fn same_phone(a: &str, b: &str) -> bool {
    let (a, b) = (crate::phone::digits(a), crate::phone::digits(b));
    !a.is_empty() && a == b
}

fn resolve_user(i: &Inner, p: &Value) -> Result<i64, ApiErr> {
    if let Some(id) = p_i64(p, "USER_ID").filter(|id| *id > 0) {
        return i
            .snap
            .users
            .iter()
            .find(|u| u.id == id && u.active)
            .map(|u| u.id)
            .ok_or_else(|| err(400, "ERROR_NOT_FOUND", "User is not found"));
    }
    let inner = p_str(p, "USER_PHONE_INNER");
    if !inner.is_empty() {
        return i
            .snap
            .users
            .iter()
            .find(|u| u.uf_phone_inner == inner && u.active)
            .map(|u| u.id)
            .ok_or_else(|| err(400, "ERROR_NOT_FOUND", "User is not found"));
    }
    Err(err(
        400,
        "ERROR_ARGUMENT",
        "USER_ID or USER_PHONE_INNER should be set",
    ))
}

/// contact → company → lead (unconverted) by phone.
fn find_entity(i: &Inner, phone: &str) -> Option<Entity> {
    for kind in ["CONTACT", "COMPANY", "LEAD"] {
        if let Some(e) = i.snap.entities.iter().find(|e| {
            e.kind == kind
                && e.status_id != "CONVERTED"
                && e.phones.iter().any(|ph| same_phone(ph, phone))
        }) {
            return Some(e.clone());
        }
    }
    None
}

fn entity_json(e: &Entity) -> Value {
    let mut v = json!({
        "ID": e.id.to_string(),
        "ASSIGNED_BY_ID": e.assigned_by_id.to_string(),
        "PHONE": e.phones.iter().enumerate().map(|(n, p)| json!({"ID": n.to_string(), "VALUE": p, "VALUE_TYPE": "WORK", "TYPE_ID": "PHONE"})).collect::<Vec<_>>(),
    });
    match e.kind.as_str() {
        "CONTACT" => {
            v["NAME"] = json!(e.title);
            v["LAST_NAME"] = json!("");
        }
        "LEAD" => {
            v["TITLE"] = json!(e.title);
            v["STATUS_ID"] = json!(e.status_id);
            v["STATUS_SEMANTIC_ID"] = json!(if e.status_id == "CONVERTED" { "S" } else { "P" });
        }
        _ => v["TITLE"] = json!(e.title),
    }
    v
}

fn dispatch(i: &mut Inner, method: &str, p: &Value) -> Result<Out, ApiErr> {
    const REUSE_MS: u64 = 30 * 60 * 1000;
    match method.to_lowercase().as_str() {
        "scope" => ok(json!(i.snap.scopes)),
        "user.get" => {
            let start = p_i64(p, "start").unwrap_or(0).max(0) as usize;
            let filter = p
                .get("FILTER")
                .or_else(|| p.get("filter"))
                .cloned()
                .unwrap_or(Value::Null);
            let only_active = filter.get("ACTIVE").is_some_and(|v| {
                matches!(v, Value::Bool(true))
                    || v.as_str() == Some("1")
                    || v.as_str() == Some("Y")
                    || v.as_i64() == Some(1)
            });
            let inner = filter
                .get("UF_PHONE_INNER")
                .and_then(Value::as_str)
                .unwrap_or("");
            let all: Vec<&User> = i
                .snap
                .users
                .iter()
                .filter(|u| !only_active || u.active)
                .filter(|u| inner.is_empty() || u.uf_phone_inner == inner)
                .collect();
            let total = all.len();
            let page: Vec<Value> = all
                .iter()
                .skip(start)
                .take(50)
                .map(|u| json!({"ID": u.id.to_string(), "ACTIVE": u.active, "NAME": u.name, "LAST_NAME": u.last_name, "UF_PHONE_INNER": if u.uf_phone_inner.is_empty() { Value::Null } else { json!(u.uf_phone_inner) }}))
                .collect();
            let next = (start + 50 < total).then_some((start + 50) as i64);
            Ok((json!(page), next, Some(total as i64)))
        }
        "telephony.externalcall.register" => {
            let user_id = resolve_user(i, p)?;
            let phone = p_str(p, "PHONE_NUMBER");
            if phone.is_empty() {
                return Err(err(
                    400,
                    "ERROR_ARGUMENT",
                    "PHONE_NUMBER should not be empty",
                ));
            }
            let ty = p_i64(p, "TYPE").unwrap_or(0);
            if !(1..=5).contains(&ty) {
                return Err(err(400, "ERROR_ARGUMENT", "Unknown TYPE"));
            }
            let external = p_str(p, "EXTERNAL_CALL_ID");
            let now = i.now_ms();
            // The documented quirk: equal parameters within 30 minutes → the same call.
            if let Some(c) = i.snap.calls.values().find(|c| {
                c.user_id == user_id
                    && c.phone == phone
                    && c.call_type == ty
                    && c.external_call_id == external
                    && now.saturating_sub(c.registered_at_ms) < REUSE_MS
            }) {
                let c = c.clone();
                return ok(
                    json!({"CALL_ID": c.call_id, "CRM_CREATED_LEAD": c.created_lead, "CRM_ENTITY_TYPE": c.crm_entity_type, "CRM_ENTITY_ID": c.crm_entity_id, "CRM_CREATED_ENTITIES": []}),
                );
            }
            let crm_create = p_bool(p, "CRM_CREATE");
            let show = p.get("SHOW").is_none() || p_bool(p, "SHOW");
            let (mut etype, mut eid, mut created) = (String::new(), 0, None);
            if let Some(e) = find_entity(i, &phone) {
                etype = e.kind.clone();
                eid = e.id;
            } else if crm_create {
                let id = i.id();
                i.snap.entities.push(Entity {
                    kind: "LEAD".into(),
                    id,
                    title: format!("Call from {phone}"),
                    phones: vec![phone.clone()],
                    assigned_by_id: user_id,
                    status_id: "NEW".into(),
                    created_by_call: true,
                });
                etype = "LEAD".into();
                eid = id;
                created = Some(id);
            }
            let n = i.id();
            let call_id = format!("externalCall.{:032x}.{}", n as u128 * 7919, 1795304861 + n);
            i.snap.calls.insert(
                call_id.clone(),
                Call {
                    call_id: call_id.clone(),
                    external_call_id: external,
                    user_id,
                    phone,
                    call_type: ty,
                    line_number: p_str(p, "LINE_NUMBER"),
                    start_date: p_str(p, "CALL_START_DATE"),
                    crm_create,
                    show,
                    crm_entity_type: etype.clone(),
                    crm_entity_id: eid,
                    created_lead: created,
                    registered_at_ms: now,
                    finish: None,
                    finish_requests: 0,
                    records: Vec::new(),
                },
            );
            if show {
                i.snap.cards.push(CardEvent {
                    call_id: call_id.clone(),
                    user_id,
                    action: "show".into(),
                });
            }
            let created_entities = match created {
                Some(id) => json!([{"ENTITY_TYPE": "LEAD", "ENTITY_ID": id}]),
                None => json!([]),
            };
            ok(json!({
                "CALL_ID": call_id,
                "CRM_CREATED_LEAD": created,
                "CRM_ENTITY_TYPE": etype,
                "CRM_ENTITY_ID": eid,
                "CRM_CREATED_ENTITIES": created_entities,
            }))
        }
        m @ ("telephony.externalcall.show" | "telephony.externalcall.hide") => {
            let call_id = p_str(p, "CALL_ID");
            let users = p_ids(p, "USER_ID");
            if users.is_empty() {
                return Err(err(400, "ERROR_ARGUMENT", "USER_ID should be set"));
            }
            match i.snap.calls.get(&call_id) {
                None => return Err(err(400, "ERROR_NOT_FOUND", "Call is not found")),
                Some(c) if c.finish.is_some() => {
                    return Err(err(400, "ERROR_NOT_FOUND", "Call is not found"));
                }
                _ => {}
            }
            let action = if m.ends_with("show") { "show" } else { "hide" };
            for u in users {
                i.snap.cards.push(CardEvent {
                    call_id: call_id.clone(),
                    user_id: u,
                    action: action.into(),
                });
            }
            ok(json!(true))
        }
        "telephony.externalcall.finish" => {
            let call_id = p_str(p, "CALL_ID");
            let Some(c) = i.snap.calls.get_mut(&call_id) else {
                return Err(err(400, "ERROR_NOT_FOUND", "Call is not found"));
            };
            c.finish_requests += 1;
            if c.finish.is_some() {
                return Err(err(400, "ERROR_NOT_FOUND", "Call is not found"));
            }
            let user_id = resolve_user(i, p)?;
            let duration = p_i64(p, "DURATION").unwrap_or(0);
            let status = match p_str(p, "STATUS_CODE") {
                s if s.is_empty() => {
                    if duration > 0 {
                        "200".to_string()
                    } else {
                        "304".to_string()
                    }
                }
                s => s,
            };
            let activity = i.id();
            let Some(c) = i.snap.calls.get_mut(&call_id) else {
                return Err(err(400, "ERROR_NOT_FOUND", "Call is not found"));
            };
            let mut f = p.clone();
            f["USER_ID"] = json!(user_id);
            f["STATUS_CODE"] = json!(status);
            c.finish = Some(f);
            let external_call_id = c.external_call_id.clone();
            if let Some(w) = &i.finish_watch {
                let _ = w.send(FinishSeen {
                    external_call_id,
                    at: std::time::Instant::now(),
                });
            }
            if let Some(lead) = c.created_lead {
                // Auto-created entities go to whoever finished the call.
                if let Some(e) = i.snap.entities.iter_mut().find(|e| e.id == lead) {
                    e.assigned_by_id = user_id;
                }
            }
            let Some(c) = i.snap.calls.get(&call_id).cloned() else {
                return Err(err(400, "ERROR_NOT_FOUND", "Call is not found"));
            };
            i.snap.cards.push(CardEvent {
                call_id: call_id.clone(),
                user_id,
                action: "finish".into(),
            });
            ok(json!({
                "CALL_ID": call_id,
                "EXTERNAL_CALL_ID": c.external_call_id,
                "PORTAL_USER_ID": user_id.to_string(),
                "PORTAL_NUMBER": c.line_number,
                "PHONE_NUMBER": c.phone,
                "CALL_DURATION": duration.to_string(),
                "CALL_START_DATE": c.start_date,
                "CALL_FAILED_CODE": status,
                "CRM_ENTITY_TYPE": c.crm_entity_type,
                "CRM_ENTITY_ID": c.crm_entity_id.to_string(),
                "CRM_ACTIVITY_ID": activity.to_string(),
                "COST": "0.0000",
                "COST_CURRENCY": "RUB",
            }))
        }
        "telephony.externalcall.attachrecord" => {
            let call_id = p_str(p, "CALL_ID");
            let Some(c) = i.snap.calls.get_mut(&call_id) else {
                return Err(err(
                    400,
                    "ERROR_NOT_FOUND",
                    "Call is not found in the statistic table. Looks like it is not finished yet.",
                ));
            };
            if c.finish.is_none() {
                return Err(err(
                    400,
                    "ERROR_NOT_FOUND",
                    "Call is not found in the statistic table. Looks like it is not finished yet.",
                ));
            }
            let url = p_str(p, "RECORD_URL");
            let name = p_str(p, "FILENAME");
            if !url.is_empty() {
                c.records.push(json!({"RECORD_URL": url}));
                return ok(json!({"FILE_ID": null}));
            }
            if name.is_empty() {
                return Err(err(
                    400,
                    "ERROR_ARGUMENT",
                    "FILENAME or RECORD_URL should be set",
                ));
            }
            let lower = name.to_lowercase();
            if !(lower.ends_with(".mp3") || lower.ends_with(".wav")) {
                return Err(err(
                    400,
                    "ERROR_ARGUMENT",
                    "Wrong file extension. Only mp3 and wav are allowed",
                ));
            }
            let content = p_str(p, "FILE_CONTENT");
            if content.is_empty() {
                return ok(json!({"uploadUrl": format!("/upload/{call_id}")}));
            }
            use base64::Engine;
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(content.as_bytes())
            else {
                return Err(err(
                    400,
                    "ERROR_ARGUMENT",
                    "FILE_CONTENT is not valid base64",
                ));
            };
            c.records
                .push(json!({"FILENAME": name, "BYTES": bytes.len()}));
            ok(json!({"FILE_ID": 1}))
        }
        "telephony.externalcall.searchcrmentities" => {
            let phone = p_str(p, "PHONE_NUMBER");
            let users = i.snap.users.clone();
            let found: Vec<Value> = i
                .snap
                .entities
                .iter()
                .filter(|e| e.status_id != "CONVERTED" && e.phones.iter().any(|ph| same_phone(ph, &phone)))
                .map(|e| {
                    let inner = users.iter().find(|u| u.id == e.assigned_by_id).map(|u| u.uf_phone_inner.clone()).unwrap_or_default();
                    json!({"CRM_ENTITY_TYPE": e.kind, "CRM_ENTITY_ID": e.id, "ASSIGNED_BY_ID": e.assigned_by_id, "NAME": e.title, "ASSIGNED_BY": {"ID": e.assigned_by_id.to_string(), "USER_PHONE_INNER": inner}})
                })
                .collect();
            ok(json!(found))
        }
        "crm.duplicate.findbycomm" => {
            if p_str(p, "type") != "PHONE" && p_str(p, "type") != "EMAIL" {
                return Err(err(
                    400,
                    "ERROR_ARGUMENT",
                    "Communication type is not defined",
                ));
            }
            let values: Vec<String> = match p.get("values") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if values.is_empty() {
                return Err(err(
                    400,
                    "ERROR_ARGUMENT",
                    "Communication values is not defined",
                ));
            }
            if values.len() > 20 {
                return Err(err(400, "ERROR_ARGUMENT", "Too many communications"));
            }
            let only = p_str(p, "entity_type").to_uppercase();
            let mut out = Map::new();
            for e in &i.snap.entities {
                if !only.is_empty() && e.kind != only {
                    continue;
                }
                if e.phones
                    .iter()
                    .any(|ph| values.iter().any(|v| same_phone(ph, v)))
                    && let Value::Array(a) = out.entry(e.kind.clone()).or_insert(json!([]))
                {
                    a.push(json!(e.id));
                }
            }
            ok(if out.is_empty() {
                json!([])
            } else {
                Value::Object(out)
            })
        }
        m @ ("crm.lead.get" | "crm.contact.get" | "crm.company.get") => {
            let kind = m.split('.').nth(1).unwrap_or("").to_uppercase();
            let id = p_i64(p, "id").or_else(|| p_i64(p, "ID")).unwrap_or(0);
            i.snap
                .entities
                .iter()
                .find(|e| e.kind == kind && e.id == id)
                .map(|e| (entity_json(e), None, None))
                .ok_or_else(|| err(400, "ERROR_NOT_FOUND", "Not found"))
        }
        m @ ("crm.lead.update" | "crm.contact.update" | "crm.company.update") => {
            let kind = m.split('.').nth(1).unwrap_or("").to_uppercase();
            let id = p_i64(p, "id").or_else(|| p_i64(p, "ID")).unwrap_or(0);
            let assigned = p.get("fields").and_then(|f| p_i64(f, "ASSIGNED_BY_ID"));
            let Some(e) = i
                .snap
                .entities
                .iter_mut()
                .find(|e| e.kind == kind && e.id == id)
            else {
                return Err(err(400, "ERROR_NOT_FOUND", "Not found"));
            };
            if let Some(a) = assigned {
                e.assigned_by_id = a;
            }
            ok(json!(true))
        }
        "crm.lead.add" => {
            let f = p.get("fields").cloned().unwrap_or(Value::Null);
            let id = i.id();
            let phones = match f.get("PHONE") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.get("VALUE").and_then(Value::as_str).map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            i.snap.entities.push(Entity {
                kind: "LEAD".into(),
                id,
                title: p_str(&f, "TITLE"),
                phones,
                assigned_by_id: p_i64(&f, "ASSIGNED_BY_ID").unwrap_or(WEBHOOK_USER),
                status_id: "NEW".into(),
                created_by_call: false,
            });
            ok(json!(id))
        }
        "crm.activity.todo.add" => {
            for k in ["ownerTypeId", "ownerId", "deadline"] {
                if p.get(k).is_none() {
                    return Err(err(
                        400,
                        "ERROR_ARGUMENT",
                        &format!("Required parameter \"{k}\" is missing"),
                    ));
                }
            }
            let id = i.id();
            let mut a = p.clone();
            a["id"] = json!(id);
            i.snap.activities.push(a);
            ok(json!({"id": id}))
        }
        "im.notify" | "im.notify.system.add" | "im.notify.personal.add" => {
            if p_str(p, "MESSAGE").is_empty() {
                return Err(err(400, "MESSAGE_EMPTY", "Message can't be empty"));
            }
            let id = i.id();
            i.snap.notifications.push(p.clone());
            ok(json!(id))
        }
        "event.bind" => {
            i.snap.bound_events.push(p.clone());
            ok(json!(true))
        }
        "event.offline.get" => {
            let limit = p_i64(p, "limit").unwrap_or(50).clamp(1, 1000) as usize;
            let clear = p.get("clear").is_none() || p_bool(p, "clear");
            let name = p
                .get("filter")
                .map(|f| p_str(f, "EVENT_NAME").to_uppercase())
                .unwrap_or_default();
            let mut events = Vec::new();
            let mut keep = VecDeque::new();
            while let Some(e) = i.snap.offline_events.pop_front() {
                let matches = name.is_empty()
                    || e.get("EVENT_NAME").and_then(Value::as_str) == Some(name.as_str());
                if matches && events.len() < limit {
                    events.push(e.clone());
                    if !clear {
                        keep.push_back(e);
                    }
                } else {
                    keep.push_back(e);
                }
            }
            i.snap.offline_events = keep;
            ok(json!({"process_id": "sandbox-process", "events": events}))
        }
        _ => Err(err(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")),
    }
}
