//! A stateful sandbox Kommo account: an in-process HTTP server implementing the parts
//! of API v4 that kolokol uses, with Kommo's documented shapes and rules.
//!
//! * Successes are `application/hal+json`; errors `application/problem+json`; invalid
//!   batches answer 400 with `validation-errors` (`request_id`, `errors[{code, path,
//!   detail}]`); an unknown, expired or missing token answers 401; a contact search
//!   with no match answers 204.
//! * OAuth: `POST /oauth2/access_token` for `authorization_code` (codes registered
//!   with [`SandboxKommo::add_auth_code`]) and `refresh_token`; every refresh rotates
//!   the refresh token (the old one stops working). A long-lived token is always valid.
//! * Rate limit: a token bucket of `rate` requests/s (7 by default); above it, 429
//!   with `Retry-After: 1`.
//! * `POST /api/v4/calls` attaches each call to the entity whose phone has the same
//!   last 10 digits (the contact's single open lead, else the contact); with no such
//!   entity the item comes back in `_embedded.errors` and no call is added.
//! * Knobs for tests: forced failures ([`SandboxKommo::fail_next`]), blocked account
//!   (403), latency, token lifetime and expiry, rate.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::phone;

/// OAuth client id the sandbox accepts.
pub const CLIENT_ID: &str = "sandbox-client-id";
/// OAuth client secret the sandbox accepts.
pub const CLIENT_SECRET: &str = "sandbox-client-secret";
/// The long-lived token the sandbox accepts.
pub const LONG_LIVED_TOKEN: &str = "sandbox-long-lived-token";
/// Id of the contacts PHONE field.
pub const PHONE_FIELD_ID: i64 = 264911;
/// The account's only pipeline, its "incoming leads" (unsorted) and first statuses.
pub const PIPELINE_ID: i64 = 7001;
pub const STATUS_UNSORTED: i64 = 70011;
pub const STATUS_FIRST: i64 = 70012;
pub const STATUS_SECOND: i64 = 70013;
/// The admin who authorized the integration: default responsible of new entities.
pub const ADMIN_USER_ID: i64 = 5001;
const ACCOUNT_ID: i64 = 31000001;
const MAX_BODY: usize = 2 * 1024 * 1024;

/// A contact as the sandbox stores it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contact {
    pub id: i64,
    pub name: String,
    pub responsible_user_id: i64,
    pub phones: Vec<String>,
    pub tags: Vec<String>,
    pub lead_ids: Vec<i64>,
}

/// A lead.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lead {
    pub id: i64,
    pub name: String,
    pub pipeline_id: i64,
    pub status_id: i64,
    pub responsible_user_id: i64,
    pub contact_ids: Vec<i64>,
    pub tags: Vec<String>,
    /// The lead's sale value (`price`), 0 when not given.
    pub price: i64,
}

/// A call note added by `POST /api/v4/calls` (or an unsorted with a call event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallNote {
    pub id: i64,
    pub uniq: Option<String>,
    pub direction: String,
    pub duration: i64,
    pub source: String,
    pub link: Option<String>,
    pub phone: String,
    pub call_status: Option<i64>,
    pub call_result: Option<String>,
    pub responsible_user_id: i64,
    pub created_by: Option<i64>,
    pub created_at: Option<i64>,
    /// `lead` or `contact`.
    pub entity_type: String,
    pub entity_id: i64,
}

/// A task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub id: i64,
    pub text: String,
    pub complete_till: i64,
    pub entity_type: Option<String>,
    pub entity_id: Option<i64>,
    pub task_type_id: i64,
    pub responsible_user_id: i64,
    pub is_completed: bool,
    pub result_text: Option<String>,
}

/// An unsorted (incoming) lead from a call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unsorted {
    pub uid: String,
    pub source_uid: String,
    pub source_name: String,
    pub pipeline_id: i64,
    pub lead_id: i64,
    pub contact_id: Option<i64>,
    pub metadata: Value,
}

/// A user of the account.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
}

/// One request the sandbox answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Items in the body when it is a JSON array (a batch), else 0.
    pub items: usize,
}

/// A copy of the account's state, for assertions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub users: Vec<User>,
    pub contacts: Vec<Contact>,
    pub leads: Vec<Lead>,
    pub calls: Vec<CallNote>,
    pub tasks: Vec<Task>,
    pub unsorted: Vec<Unsorted>,
    pub requests: Vec<Logged>,
    /// Successful `refresh_token` grants.
    pub refreshes: u32,
    /// The refresh token currently valid, if any.
    pub refresh_token: Option<String>,
}

impl Snapshot {
    /// Contacts whose phone ends with the same 10 digits.
    pub fn contacts_with_phone(&self, phone: &str) -> Vec<&Contact> {
        let l = phone::last10(phone);
        self.contacts
            .iter()
            .filter(|c| c.phones.iter().any(|p| phone::last10(p) == l))
            .collect()
    }

    /// Requests to `path` (any method) that got `status`.
    pub fn count(&self, method: &str, path: &str, status: u16) -> usize {
        self.requests
            .iter()
            .filter(|r| r.method == method && r.path == path && r.status == status)
            .count()
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct St {
    snap: Snapshot,
    next_id: i64,
    phone_field: bool,
    /// access token → unix expiry.
    access: Vec<(String, i64)>,
    codes: Vec<String>,
    token_ttl: i64,
    fail: VecDeque<u16>,
    fail_paths: Vec<(String, u16)>,
    retry_after_secs: u64,
    blocked: bool,
    latency: Duration,
    rate: f64,
    bucket: Bucket,
    /// Told of every call note as it is created (see [`SandboxKommo::watch_calls`]).
    call_watch: Option<tokio::sync::mpsc::UnboundedSender<CallSeen>>,
}

/// A call note as the sandbox created it: its `uniq` and when the request arrived.
#[derive(Debug, Clone)]
pub struct CallSeen {
    pub uniq: Option<String>,
    pub at: std::time::Instant,
}

impl St {
    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }
    fn user_ok(&self, id: i64) -> bool {
        self.snap.users.iter().any(|u| u.id == id)
    }
}

struct Shared(Mutex<St>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        // A panicking test thread must not hide the state from the others.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running sandbox; stops when dropped.
pub struct SandboxKommo {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn rand_token(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().r#gen();
    format!("{prefix}-{n:032x}")
}

impl SandboxKommo {
    /// Start on an ephemeral 127.0.0.1 port with three users and the standard fields.
    pub async fn start() -> std::io::Result<SandboxKommo> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Start on `addr` (e.g. a fixed port for `kolokol demo`).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<SandboxKommo> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let users = vec![
            User {
                id: ADMIN_USER_ID,
                name: "Anna Admin".into(),
                email: "anna@example.com".into(),
            },
            User {
                id: 5002,
                name: "Boris Sales".into(),
                email: "boris@example.com".into(),
            },
            User {
                id: 5003,
                name: "Vera Sales".into(),
                email: "vera@example.com".into(),
            },
        ];
        let shared = Arc::new(Shared(Mutex::new(St {
            snap: Snapshot {
                users,
                ..Default::default()
            },
            next_id: 1000,
            phone_field: true,
            access: Vec::new(),
            codes: Vec::new(),
            token_ttl: 86400,
            fail: VecDeque::new(),
            fail_paths: Vec::new(),
            retry_after_secs: 1,
            blocked: false,
            latency: Duration::ZERO,
            rate: 7.0,
            bucket: Bucket {
                tokens: 7.0,
                last: Instant::now(),
            },
            call_watch: None,
        })));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "sandbox Kommo stopped");
            }
        });
        Ok(SandboxKommo {
            addr,
            shared,
            _stop: tx,
        })
    }

    /// `http://127.0.0.1:PORT`, for `[kommo] base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().snap.clone()
    }

    /// Every call note created from now on, as it is created (cheaper than polling
    /// [`Self::snapshot`] when there are thousands; benchmarks time deliveries with it).
    pub fn watch_calls(&self) -> tokio::sync::mpsc::UnboundedReceiver<CallSeen> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.lock().call_watch = Some(tx);
        rx
    }

    /// Accept `code` once as an authorization code.
    pub fn add_auth_code(&self, code: &str) {
        self.shared.lock().codes.push(code.to_string());
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_token_ttl(&self, secs: i64) {
        self.shared.lock().token_ttl = secs;
    }

    /// Make every issued access token expired (the next request answers 401).
    pub fn expire_access_tokens(&self) {
        for t in self.shared.lock().access.iter_mut() {
            t.1 = 0;
        }
    }

    /// Answer the next `n` API requests with `status` (503, 429, 500, ...). 429 and 503
    /// carry `Retry-After` (see [`Self::set_retry_after`]).
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut s = self.shared.lock();
        for _ in 0..n {
            s.fail.push_back(status);
        }
    }

    /// Answer the next `n` requests to `path` (e.g. `/api/v4/calls`) with `status`.
    pub fn fail_path(&self, path: &str, n: usize, status: u16) {
        let mut s = self.shared.lock();
        for _ in 0..n {
            s.fail_paths.push((path.to_string(), status));
        }
    }

    /// Seconds in `Retry-After` of 429/503 answers.
    pub fn set_retry_after(&self, secs: u64) {
        self.shared.lock().retry_after_secs = secs;
    }

    /// Block the account: every API request answers 403.
    pub fn set_blocked(&self, blocked: bool) {
        self.shared.lock().blocked = blocked;
    }

    /// Delay every answer.
    pub fn set_latency(&self, d: Duration) {
        self.shared.lock().latency = d;
    }

    /// Requests per second before 429 (7 like Kommo).
    pub fn set_rate_limit(&self, per_sec: f64) {
        let mut s = self.shared.lock();
        s.rate = per_sec.max(0.1);
        s.bucket.tokens = s.rate;
    }

    /// Remove the contacts PHONE field (as an admin who deleted it would).
    pub fn remove_phone_field(&self) {
        self.shared.lock().phone_field = false;
    }

    /// Create a contact directly (a client the CRM already knows).
    pub fn add_contact(&self, name: &str, phone: &str, responsible_user_id: i64) -> i64 {
        let mut s = self.shared.lock();
        let id = s.id();
        s.snap.contacts.push(Contact {
            id,
            name: name.into(),
            responsible_user_id,
            phones: vec![phone.into()],
            tags: vec![],
            lead_ids: vec![],
        });
        id
    }

    /// Create a lead of `contact_id` directly.
    pub fn add_lead(&self, name: &str, contact_id: i64, status_id: i64, responsible: i64) -> i64 {
        let mut s = self.shared.lock();
        let id = s.id();
        s.snap.leads.push(Lead {
            id,
            name: name.into(),
            pipeline_id: PIPELINE_ID,
            status_id,
            responsible_user_id: responsible,
            contact_ids: vec![contact_id],
            tags: vec![],
            price: 0,
        });
        if let Some(c) = s.snap.contacts.iter_mut().find(|c| c.id == contact_id) {
            c.lead_ids.push(id);
        }
        id
    }
}

// ---------------------------------------------------------------- responses

fn hal(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/hal+json"),
    );
    r
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "title": status.canonical_reason().unwrap_or(""),
        "type": format!("https://httpstatus.es/{}", status.as_u16()),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// One validation error: (index in the batch, code, path, detail).
type VErr = (usize, &'static str, String, String);

fn validation(errs: Vec<VErr>) -> Response {
    let mut items: Vec<(usize, Vec<Value>)> = Vec::new();
    for (i, code, path, detail) in errs {
        let e = json!({"code": code, "path": path, "detail": detail});
        match items.iter_mut().find(|(j, _)| *j == i) {
            Some((_, v)) => v.push(e),
            None => items.push((i, vec![e])),
        }
    }
    let body = json!({
        "validation-errors": items.into_iter().map(|(i, errors)| json!({"request_id": rid(i), "errors": errors})).collect::<Vec<_>>(),
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "Request validation failed",
    });
    let mut r = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn with_retry_after(mut r: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

// ---------------------------------------------------------------- dispatch

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return problem(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let query: Vec<(String, String)> = reqwest::Url::parse(&format!("http://x{uri}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let mut st = shared.lock();
    let resp = route(&mut st, &method, &path, &query, auth.as_deref(), &body);
    let items = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(a)) => a.len(),
        _ => 0,
    };
    st.snap.requests.push(Logged {
        method: method.to_string(),
        path,
        status: resp.status().as_u16(),
        items,
    });
    resp
}

fn route(
    st: &mut St,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    auth: Option<&str>,
    body: &[u8],
) -> Response {
    if path == "/oauth2/access_token" && method == Method::POST {
        return oauth(st, body);
    }
    if !path.starts_with("/api/v4/") {
        return problem(StatusCode::NOT_FOUND, "no such endpoint");
    }
    if st.blocked {
        return problem(StatusCode::FORBIDDEN, "Account is blocked");
    }
    let forced = match st.fail_paths.iter().position(|(p, _)| p == path) {
        Some(i) => Some(st.fail_paths.remove(i).1),
        None => st.fail.pop_front(),
    };
    if let Some(status) = forced {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let r = problem(code, "forced failure");
        return if status == 429 || status == 503 {
            with_retry_after(r, st.retry_after_secs)
        } else {
            r
        };
    }
    // Token bucket; a small tolerance absorbs network jitter of a client that
    // paces itself at exactly the same rate.
    let now = Instant::now();
    let el = now.duration_since(st.bucket.last).as_secs_f64();
    st.bucket.tokens = (st.bucket.tokens + el * st.rate).min(st.rate.max(1.0));
    st.bucket.last = now;
    if st.bucket.tokens < 0.8 {
        return with_retry_after(
            problem(StatusCode::TOO_MANY_REQUESTS, "Too many requests"),
            1,
        );
    }
    st.bucket.tokens -= 1.0;
    let authorized = match auth {
        Some(LONG_LIVED_TOKEN) => true,
        Some(t) => st.access.iter().any(|(a, exp)| a == t && *exp > now_unix()),
        None => false,
    };
    if !authorized {
        return problem(StatusCode::UNAUTHORIZED, "Token has expired or is invalid");
    }
    let json: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => Some(v),
            Err(e) => return problem(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
        }
    };
    let segs: Vec<&str> = path.trim_start_matches("/api/v4/").split('/').collect();
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["account"]) => hal(
            StatusCode::OK,
            json!({"id": ACCOUNT_ID, "name": "Sandbox", "subdomain": "sandbox"}),
        ),
        (Method::GET, ["users"]) => users(st),
        (Method::GET, ["contacts", "custom_fields"]) => custom_fields(st),
        (Method::GET, ["contacts"]) => search_contacts(st, query),
        (Method::POST, ["contacts"]) => batch(json, |a| create_contacts(st, a)),
        (Method::PATCH, ["contacts", id]) => patch_contact(st, id, json),
        (Method::GET, ["contacts", id]) => {
            let with_leads = query
                .iter()
                .any(|(k, v)| k == "with" && v.split(',').any(|w| w == "leads"));
            match parse_id(id).and_then(|id| st.snap.contacts.iter().find(|c| c.id == id)) {
                Some(c) => hal(StatusCode::OK, contact_json(c, with_leads)),
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
        (Method::GET, ["leads", id]) => get_lead(st, id),
        (Method::POST, ["leads"]) => batch(json, |a| create_leads(st, a)),
        (Method::PATCH, ["leads", id]) => patch_lead(st, id, json),
        (Method::POST, ["leads", "unsorted", "sip"]) => batch(json, |a| create_unsorted(st, a)),
        (Method::POST, ["calls"]) => batch(json, |a| create_calls(st, a)),
        (Method::GET, [etype @ ("leads" | "contacts"), id, "notes"]) => {
            call_notes(st, etype, id, query)
        }
        (Method::GET, ["tasks"]) => list_tasks(st, query),
        (Method::POST, ["tasks"]) => batch(json, |a| create_tasks(st, a)),
        (Method::PATCH, ["tasks"]) => batch(json, |a| patch_tasks(st, a)),
        _ => problem(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

thread_local! {
    /// The `request_id`s of the batch being handled (handlers run synchronously).
    static REQUEST_IDS: std::cell::RefCell<Vec<Option<String>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The `request_id` to echo for item `i`: the client's own, else the item's index
/// (as Kommo does).
fn rid(i: usize) -> String {
    REQUEST_IDS
        .with(|ids| ids.borrow().get(i).cloned().flatten())
        .unwrap_or_else(|| i.to_string())
}

fn batch(json: Option<Value>, f: impl FnOnce(&[Value]) -> Response) -> Response {
    match json {
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= 250 => {
            let ids = a
                .iter()
                .map(|v| match v.get("request_id") {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            REQUEST_IDS.with(|r| *r.borrow_mut() = ids);
            let resp = f(&a);
            REQUEST_IDS.with(|r| r.borrow_mut().clear());
            resp
        }
        Some(Value::Array(a)) if !a.is_empty() => validation(vec![(
            0,
            "TooManyItems",
            "".into(),
            "at most 250 items".into(),
        )]),
        _ => validation(vec![(
            0,
            "InvalidType",
            "".into(),
            "the body must be a non-empty array".into(),
        )]),
    }
}

fn oauth(st: &mut St, body: &[u8]) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return problem(StatusCode::BAD_REQUEST, "invalid JSON");
    };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    if s("client_id") != CLIENT_ID || s("client_secret") != CLIENT_SECRET {
        return problem(StatusCode::UNAUTHORIZED, "Client authentication failed");
    }
    if s("redirect_uri").is_empty() {
        return problem(StatusCode::BAD_REQUEST, "redirect_uri is required");
    }
    match s("grant_type").as_str() {
        "authorization_code" => {
            let code = s("code");
            let Some(pos) = st.codes.iter().position(|c| *c == code) else {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Authorization code has expired or was already used",
                );
            };
            st.codes.remove(pos);
        }
        "refresh_token" => {
            if st.snap.refresh_token.as_deref() != Some(s("refresh_token").as_str())
                || s("refresh_token").is_empty()
            {
                return problem(StatusCode::BAD_REQUEST, "Token has been revoked");
            }
            st.snap.refreshes += 1;
        }
        _ => return problem(StatusCode::BAD_REQUEST, "unsupported grant_type"),
    }
    let access = rand_token("access");
    let refresh = rand_token("refresh");
    let ttl = st.token_ttl;
    st.access.push((access.clone(), now_unix() + ttl));
    st.snap.refresh_token = Some(refresh.clone());
    let mut r = (
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": ttl, "access_token": access, "refresh_token": refresh})
            .to_string(),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

// ---------------------------------------------------------------- entities

fn users(st: &St) -> Response {
    let users: Vec<Value> = st
        .snap
        .users
        .iter()
        .map(|u| json!({"id": u.id, "name": u.name, "email": u.email, "lang": "en", "rights": {"is_admin": u.id == ADMIN_USER_ID, "is_active": true}}))
        .collect();
    hal(
        StatusCode::OK,
        json!({"_total_items": users.len(), "_page": 1, "_links": {"self": {"href": "/api/v4/users"}}, "_embedded": {"users": users}}),
    )
}

fn custom_fields(st: &St) -> Response {
    let mut fields = vec![json!({
        "id": 264913, "name": "Email", "type": "multitext", "code": "EMAIL", "sort": 6, "is_api_only": false,
        "enums": [{"id": 11, "value": "WORK", "sort": 2}, {"id": 12, "value": "PRIV", "sort": 4}, {"id": 13, "value": "OTHER", "sort": 6}],
    })];
    if st.phone_field {
        fields.insert(0, json!({
            "id": PHONE_FIELD_ID, "name": "Phone", "type": "multitext", "code": "PHONE", "sort": 4, "is_api_only": false,
            "enums": [{"id": 1, "value": "WORK", "sort": 2}, {"id": 2, "value": "WORKDD", "sort": 4}, {"id": 3, "value": "MOB", "sort": 6},
                      {"id": 4, "value": "FAX", "sort": 8}, {"id": 5, "value": "HOME", "sort": 10}, {"id": 6, "value": "OTHER", "sort": 12}],
        }));
    }
    hal(
        StatusCode::OK,
        json!({"_total_items": fields.len(), "_page": 1, "_links": {"self": {"href": "/api/v4/contacts/custom_fields"}}, "_embedded": {"custom_fields": fields}}),
    )
}

const PHONE_ENUMS: [(&str, i64); 6] = [
    ("WORK", 1),
    ("WORKDD", 2),
    ("MOB", 3),
    ("FAX", 4),
    ("HOME", 5),
    ("OTHER", 6),
];

fn contact_json(c: &Contact, with_leads: bool) -> Value {
    let mut v = json!({
        "id": c.id, "name": c.name, "responsible_user_id": c.responsible_user_id, "account_id": ACCOUNT_ID,
        "custom_fields_values": if c.phones.is_empty() { Value::Null } else { json!([{
            "field_id": PHONE_FIELD_ID, "field_name": "Phone", "field_code": "PHONE", "field_type": "multitext",
            "values": c.phones.iter().map(|p| json!({"value": p, "enum_id": 1, "enum_code": "WORK"})).collect::<Vec<_>>(),
        }]) },
        "_links": {"self": {"href": format!("/api/v4/contacts/{}", c.id)}},
        "_embedded": {"tags": c.tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>()},
    });
    if with_leads {
        v["_embedded"]["leads"] = c
            .lead_ids
            .iter()
            .map(
                |id| json!({"id": id, "_links": {"self": {"href": format!("/api/v4/leads/{id}")}}}),
            )
            .collect();
    }
    v
}

fn search_contacts(st: &St, query: &[(String, String)]) -> Response {
    let get = |k: &str| {
        query
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    };
    let q = get("query");
    let with_leads = get("with").split(',').any(|w| w == "leads");
    let qd = phone::digits(&q);
    let found: Vec<Value> = st
        .snap
        .contacts
        .iter()
        .filter(|c| {
            if q.is_empty() {
                return true;
            }
            // Kommo's query is a substring search over all fields.
            (qd.len() >= 4 && c.phones.iter().any(|p| phone::digits(p).contains(&qd)))
                || c.name.to_lowercase().contains(&q.to_lowercase())
        })
        .take(250)
        .map(|c| contact_json(c, with_leads))
        .collect();
    if found.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    hal(
        StatusCode::OK,
        json!({"_page": 1, "_links": {"self": {"href": "/api/v4/contacts"}}, "_embedded": {"contacts": found}}),
    )
}

fn tags_of(v: &Value) -> Vec<String> {
    v.pointer("/_embedded/tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Validate `custom_fields_values` of a contact: returns its phones.
fn contact_phones(i: usize, v: &Value, errs: &mut Vec<VErr>, phone_field: bool) -> Vec<String> {
    let mut phones = Vec::new();
    let Some(cfv) = v.get("custom_fields_values") else {
        return phones;
    };
    let Some(arr) = cfv.as_array() else {
        errs.push((
            i,
            "InvalidType",
            "custom_fields_values".into(),
            "This value should be of type array.".into(),
        ));
        return phones;
    };
    for (fi, f) in arr.iter().enumerate() {
        let fid = f.get("field_id").and_then(Value::as_i64);
        let fcode = f.get("field_code").and_then(Value::as_str);
        let is_phone = phone_field && (fid == Some(PHONE_FIELD_ID) || fcode == Some("PHONE"));
        if !is_phone && fid != Some(264913) && fcode != Some("EMAIL") {
            errs.push((
                i,
                "NotSupportedChoice",
                format!("custom_fields_values.{fi}.field_id"),
                "The value you selected is not a valid choice.".into(),
            ));
            continue;
        }
        for (vi, val) in f
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(code) = val.get("enum_code").and_then(Value::as_str)
                && is_phone
                && !PHONE_ENUMS.iter().any(|(c, _)| *c == code)
            {
                errs.push((
                    i,
                    "NotSupportedChoice",
                    format!("custom_fields_values.{fi}.values.{vi}.enum_code"),
                    "The value you selected is not a valid choice.".into(),
                ));
            }
            match val.get("value").and_then(Value::as_str) {
                Some(p) if !p.is_empty() => {
                    if is_phone {
                        phones.push(p.to_string())
                    }
                }
                _ => errs.push((
                    i,
                    "NotBlank",
                    format!("custom_fields_values.{fi}.values.{vi}.value"),
                    "This value should not be blank.".into(),
                )),
            }
        }
    }
    phones
}

fn check_user(st: &St, i: usize, v: &Value, key: &str, errs: &mut Vec<VErr>) -> Option<i64> {
    match v.get(key) {
        None | Some(Value::Null) => None,
        Some(u) => match u.as_i64() {
            Some(id) if st.user_ok(id) => Some(id),
            _ => {
                errs.push((
                    i,
                    "NotSupportedChoice",
                    key.into(),
                    "The value you selected is not a valid choice.".into(),
                ));
                None
            }
        },
    }
}

fn check_name(i: usize, v: &Value, errs: &mut Vec<VErr>) -> Option<String> {
    match v.get("name") {
        None => None,
        Some(Value::String(s)) if s.chars().count() <= 255 => Some(s.clone()),
        Some(_) => {
            errs.push((
                i,
                "InvalidType",
                "name".into(),
                "This value should be a string of at most 255 characters.".into(),
            ));
            None
        }
    }
}

fn created(key: &str, items: Vec<Value>) -> Response {
    hal(
        StatusCode::OK,
        json!({"_links": {"self": {"href": format!("/api/v4/{key}")}}, "_embedded": {key: items}}),
    )
}

fn create_contacts(st: &mut St, arr: &[Value]) -> Response {
    let mut errs = Vec::new();
    let mut new = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let name = check_name(i, v, &mut errs);
        let resp = check_user(st, i, v, "responsible_user_id", &mut errs);
        let phones = contact_phones(i, v, &mut errs, st.phone_field);
        new.push((name, resp, phones, tags_of(v)));
    }
    if !errs.is_empty() {
        return validation(errs);
    }
    let mut out = Vec::new();
    for (i, (name, resp, phones, tags)) in new.into_iter().enumerate() {
        let id = st.id();
        st.snap.contacts.push(Contact {
            id,
            name: name.unwrap_or_default(),
            responsible_user_id: resp.unwrap_or(ADMIN_USER_ID),
            phones,
            tags,
            lead_ids: vec![],
        });
        out.push(json!({"id": id, "request_id": rid(i), "_links": {"self": {"href": format!("/api/v4/contacts/{id}")}}}));
    }
    created("contacts", out)
}

fn parse_id(s: &str) -> Option<i64> {
    s.parse().ok()
}

fn patch_contact(st: &mut St, id: &str, json: Option<Value>) -> Response {
    let Some(v) = json.filter(Value::is_object) else {
        return validation(vec![(
            0,
            "InvalidType",
            "".into(),
            "the body must be an object".into(),
        )]);
    };
    let mut errs = Vec::new();
    let name = check_name(0, &v, &mut errs);
    let resp = check_user(st, 0, &v, "responsible_user_id", &mut errs);
    let phones = contact_phones(0, &v, &mut errs, st.phone_field);
    if !errs.is_empty() {
        return validation(errs);
    }
    let Some(c) = parse_id(id).and_then(|id| st.snap.contacts.iter_mut().find(|c| c.id == id))
    else {
        return problem(StatusCode::NOT_FOUND, "contact not found");
    };
    if let Some(n) = name {
        c.name = n;
    }
    if let Some(r) = resp {
        c.responsible_user_id = r;
    }
    if v.get("custom_fields_values").is_some() {
        c.phones = phones;
    }
    let body = contact_json(c, false);
    hal(StatusCode::OK, body)
}

fn lead_json(l: &Lead) -> Value {
    json!({
        "id": l.id, "name": l.name, "price": l.price, "pipeline_id": l.pipeline_id, "status_id": l.status_id,
        "responsible_user_id": l.responsible_user_id, "account_id": ACCOUNT_ID,
        "closed_at": if l.status_id == 142 || l.status_id == 143 { json!(now_unix()) } else { Value::Null },
        "_links": {"self": {"href": format!("/api/v4/leads/{}", l.id)}},
        "_embedded": {
            "tags": l.tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
            "contacts": l.contact_ids.iter().map(|c| json!({"id": c})).collect::<Vec<_>>(),
        },
    })
}

fn get_lead(st: &St, id: &str) -> Response {
    match parse_id(id).and_then(|id| st.snap.leads.iter().find(|l| l.id == id)) {
        Some(l) => hal(StatusCode::OK, lead_json(l)),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

fn valid_status(s: i64) -> bool {
    matches!(
        s,
        STATUS_UNSORTED | STATUS_FIRST | STATUS_SECOND | 142 | 143
    )
}

/// Validate one lead; (name, pipeline, status, responsible, contacts, tags).
#[allow(clippy::type_complexity)]
fn check_lead(
    st: &St,
    i: usize,
    v: &Value,
    errs: &mut Vec<VErr>,
) -> (Option<String>, i64, i64, Option<i64>, Vec<i64>, Vec<String>) {
    let name = check_name(i, v, errs);
    let pipeline = match v.get("pipeline_id") {
        None | Some(Value::Null) => PIPELINE_ID,
        Some(p) if p.as_i64() == Some(PIPELINE_ID) => PIPELINE_ID,
        Some(_) => {
            errs.push((
                i,
                "NotSupportedChoice",
                "pipeline_id".into(),
                "The value you selected is not a valid choice.".into(),
            ));
            PIPELINE_ID
        }
    };
    let status = match v.get("status_id") {
        None | Some(Value::Null) => STATUS_FIRST,
        Some(s) => match s.as_i64() {
            Some(s) if valid_status(s) => s,
            _ => {
                errs.push((
                    i,
                    "NotSupportedChoice",
                    "status_id".into(),
                    "The value you selected is not a valid choice.".into(),
                ));
                STATUS_FIRST
            }
        },
    };
    let resp = check_user(st, i, v, "responsible_user_id", errs);
    let mut contacts = Vec::new();
    for (ci, c) in v
        .pointer("/_embedded/contacts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        match c.get("id").and_then(Value::as_i64) {
            Some(id) if st.snap.contacts.iter().any(|x| x.id == id) => contacts.push(id),
            _ => errs.push((
                i,
                "NotFound",
                format!("_embedded.contacts.{ci}.id"),
                "Contact not found".into(),
            )),
        }
    }
    (name, pipeline, status, resp, contacts, tags_of(v))
}

/// A lead's `price`: an integer, as Kommo requires.
fn lead_price(i: usize, v: &Value, errs: &mut Vec<VErr>) -> Option<i64> {
    match v.get("price") {
        None | Some(Value::Null) => None,
        Some(p) => match p.as_i64() {
            Some(p) if p >= 0 => Some(p),
            _ => {
                errs.push((
                    i,
                    "InvalidType",
                    "price".into(),
                    "This value should be of type int.".into(),
                ));
                None
            }
        },
    }
}

fn create_leads(st: &mut St, arr: &[Value]) -> Response {
    let mut errs = Vec::new();
    let checked: Vec<_> = arr
        .iter()
        .enumerate()
        .map(|(i, v)| (check_lead(st, i, v, &mut errs), lead_price(i, v, &mut errs)))
        .collect();
    if !errs.is_empty() {
        return validation(errs);
    }
    let mut out = Vec::new();
    for (i, ((name, pipeline_id, status_id, resp, contact_ids, tags), price)) in
        checked.into_iter().enumerate()
    {
        let id = st.id();
        for c in st
            .snap
            .contacts
            .iter_mut()
            .filter(|c| contact_ids.contains(&c.id))
        {
            c.lead_ids.push(id);
        }
        st.snap.leads.push(Lead {
            id,
            name: name.unwrap_or_else(|| format!("Lead #{id}")),
            pipeline_id,
            status_id,
            responsible_user_id: resp.unwrap_or(ADMIN_USER_ID),
            contact_ids,
            tags,
            price: price.unwrap_or(0),
        });
        out.push(json!({"id": id, "request_id": rid(i), "_links": {"self": {"href": format!("/api/v4/leads/{id}")}}}));
    }
    created("leads", out)
}

fn patch_lead(st: &mut St, id: &str, json: Option<Value>) -> Response {
    let Some(v) = json.filter(Value::is_object) else {
        return validation(vec![(
            0,
            "InvalidType",
            "".into(),
            "the body must be an object".into(),
        )]);
    };
    let mut errs = Vec::new();
    let (name, _, status, resp, _, _) = check_lead(st, 0, &v, &mut errs);
    let price = lead_price(0, &v, &mut errs);
    if !errs.is_empty() {
        return validation(errs);
    }
    let Some(l) = parse_id(id).and_then(|id| st.snap.leads.iter_mut().find(|l| l.id == id)) else {
        return problem(StatusCode::NOT_FOUND, "lead not found");
    };
    if let Some(n) = name {
        l.name = n;
    }
    if v.get("status_id").is_some() {
        l.status_id = status;
    }
    if let Some(r) = resp {
        l.responsible_user_id = r;
    }
    if let Some(p) = price {
        l.price = p;
    }
    let body = lead_json(l);
    hal(StatusCode::OK, body)
}

/// The entity a call with this phone attaches to: the matching contact's single open
/// lead, else the contact.
fn call_entity(st: &St, phone: &str) -> Option<(&'static str, i64)> {
    let l = phone::last10(phone);
    if l.len() < 10 {
        return None;
    }
    let c = st
        .snap
        .contacts
        .iter()
        .find(|c| c.phones.iter().any(|p| phone::last10(p) == l))?;
    let open: Vec<i64> = st
        .snap
        .leads
        .iter()
        .filter(|x| c.lead_ids.contains(&x.id) && x.status_id != 142 && x.status_id != 143)
        .map(|x| x.id)
        .collect();
    if open.len() == 1 {
        Some(("lead", open[0]))
    } else {
        Some(("contact", c.id))
    }
}

fn create_calls(st: &mut St, arr: &[Value]) -> Response {
    let mut errs = Vec::new();
    let mut notes = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let direction = s("direction").unwrap_or_default();
        if direction != "inbound" && direction != "outbound" {
            errs.push((
                i,
                "NotSupportedChoice",
                "direction".into(),
                "The value you selected is not a valid choice.".into(),
            ));
        }
        let duration = v.get("duration").and_then(Value::as_i64);
        if duration.is_none_or(|d| d < 0) {
            errs.push((
                i,
                "InvalidType",
                "duration".into(),
                "This value should be of type int.".into(),
            ));
        }
        let source = s("source").filter(|x| !x.is_empty());
        if source.is_none() {
            errs.push((
                i,
                "NotBlank",
                "source".into(),
                "This value should not be blank.".into(),
            ));
        }
        let phone = s("phone").filter(|x| !x.is_empty());
        if phone.is_none() {
            errs.push((
                i,
                "NotBlank",
                "phone".into(),
                "This value should not be blank.".into(),
            ));
        }
        let status = v.get("call_status").and_then(Value::as_i64);
        if v.get("call_status").is_some() && !status.is_some_and(|c| (1..=7).contains(&c)) {
            errs.push((
                i,
                "NotSupportedChoice",
                "call_status".into(),
                "The value you selected is not a valid choice.".into(),
            ));
        }
        if let Some(l) = v.get("link")
            && !l
                .as_str()
                .is_some_and(|l| l.is_empty() || l.starts_with("http"))
        {
            errs.push((
                i,
                "InvalidUrl",
                "link".into(),
                "This value is not a valid URL.".into(),
            ));
        }
        let resp = check_user(st, i, v, "responsible_user_id", &mut errs);
        let created_by = check_user(st, i, v, "created_by", &mut errs);
        notes.push(CallNote {
            id: 0,
            uniq: s("uniq"),
            direction,
            duration: duration.unwrap_or(0),
            source: source.unwrap_or_default(),
            link: s("link").filter(|l| !l.is_empty()),
            phone: phone.unwrap_or_default(),
            call_status: status,
            call_result: s("call_result"),
            responsible_user_id: resp.unwrap_or(ADMIN_USER_ID),
            created_by,
            created_at: v.get("created_at").and_then(Value::as_i64),
            entity_type: String::new(),
            entity_id: 0,
        });
    }
    if !errs.is_empty() {
        return validation(errs);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, mut n) in notes.into_iter().enumerate() {
        match call_entity(st, &n.phone) {
            Some((etype, eid)) => {
                n.id = st.id();
                n.entity_type = etype.into();
                n.entity_id = eid;
                out.push(json!({"id": n.id, "entity_id": eid, "entity_type": etype, "account_id": ACCOUNT_ID, "request_id": rid(i)}));
                if let Some(w) = &st.call_watch {
                    let _ = w.send(CallSeen {
                        uniq: n.uniq.clone(),
                        at: std::time::Instant::now(),
                    });
                }
                st.snap.calls.push(n);
            }
            None => errors.push(json!({
                "request_id": rid(i), "status": 404, "title": "Not Found",
                "detail": "Entity with this phone number not found",
            })),
        }
    }
    hal(
        StatusCode::OK,
        json!({"_total_items": out.len(), "_embedded": {"calls": out, "errors": errors}}),
    )
}

/// `GET /api/v4/{leads|contacts}/{id}/notes`: the call notes of an entity
/// (`note_type` call_in / call_out, `params` as sent to `/calls`).
fn call_notes(st: &St, etype: &str, id: &str, query: &[(String, String)]) -> Response {
    let singular = etype.trim_end_matches('s');
    let types: Vec<&str> = query
        .iter()
        .filter(|(k, _)| k.starts_with("filter[note_type]"))
        .map(|(_, v)| v.as_str())
        .collect();
    let Some(id) = parse_id(id) else {
        return problem(StatusCode::NOT_FOUND, "no such entity");
    };
    let notes: Vec<Value> = st
        .snap
        .calls
        .iter()
        .filter(|c| c.entity_type == singular && c.entity_id == id)
        .map(|c| {
            let nt = if c.direction == "outbound" { "call_out" } else { "call_in" };
            (nt, c)
        })
        .filter(|(nt, _)| types.is_empty() || types.contains(nt))
        .map(|(nt, c)| {
            json!({
                "id": c.id, "entity_id": id, "note_type": nt, "responsible_user_id": c.responsible_user_id,
                "params": {"uniq": c.uniq, "duration": c.duration, "source": c.source, "link": c.link,
                           "phone": c.phone, "call_status": c.call_status, "call_result": c.call_result},
            })
        })
        .collect();
    if notes.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    hal(
        StatusCode::OK,
        json!({"_page": 1, "_links": {"self": {"href": format!("/api/v4/{etype}/{id}/notes")}}, "_embedded": {"notes": notes}}),
    )
}

fn create_unsorted(st: &mut St, arr: &[Value]) -> Response {
    let mut errs = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        for k in ["source_uid", "source_name"] {
            if v.get(k).and_then(Value::as_str).is_none_or(str::is_empty) {
                errs.push((
                    i,
                    "NotBlank",
                    k.into(),
                    "This value should not be blank.".into(),
                ));
            }
        }
        let Some(m) = v.get("metadata").filter(|m| m.is_object()) else {
            errs.push((
                i,
                "NotBlank",
                "metadata".into(),
                "This value should not be blank.".into(),
            ));
            continue;
        };
        for k in ["phone", "service_code"] {
            if m.get(k).and_then(Value::as_str).is_none_or(str::is_empty) {
                errs.push((
                    i,
                    "NotBlank",
                    format!("metadata.{k}"),
                    "This value should not be blank.".into(),
                ));
            }
        }
        for k in ["called_at", "duration"] {
            if m.get(k).and_then(Value::as_i64).is_none() {
                errs.push((
                    i,
                    "InvalidType",
                    format!("metadata.{k}"),
                    "This value should be of type int.".into(),
                ));
            }
        }
        if let Some(p) = v.get("pipeline_id")
            && p.as_i64() != Some(PIPELINE_ID)
        {
            errs.push((
                i,
                "NotSupportedChoice",
                "pipeline_id".into(),
                "The value you selected is not a valid choice.".into(),
            ));
        }
        if let Some(c) = v.pointer("/_embedded/contacts/0") {
            contact_phones(i, c, &mut errs, st.phone_field);
            check_user(st, i, c, "responsible_user_id", &mut errs);
        }
        if let Some(l) = v.pointer("/_embedded/leads/0") {
            check_user(st, i, l, "responsible_user_id", &mut errs);
        }
    }
    if !errs.is_empty() {
        return validation(errs);
    }
    let mut out = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let meta = v.get("metadata").cloned().unwrap_or(Value::Null);
        let phone = meta
            .get("phone")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let c = v
            .pointer("/_embedded/contacts/0")
            .cloned()
            .unwrap_or(json!({}));
        let mut e = Vec::new();
        let mut phones = contact_phones(i, &c, &mut e, st.phone_field);
        if phones.is_empty() {
            phones.push(phone.clone());
        }
        let cid = st.id();
        let l = v
            .pointer("/_embedded/leads/0")
            .cloned()
            .unwrap_or(json!({}));
        let lid = st.id();
        let resp_c = c
            .get("responsible_user_id")
            .and_then(Value::as_i64)
            .unwrap_or(ADMIN_USER_ID);
        let resp_l = l
            .get("responsible_user_id")
            .and_then(Value::as_i64)
            .unwrap_or(ADMIN_USER_ID);
        st.snap.contacts.push(Contact {
            id: cid,
            name: c
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| phone.clone()),
            responsible_user_id: resp_c,
            phones,
            tags: vec![],
            lead_ids: vec![lid],
        });
        st.snap.leads.push(Lead {
            id: lid,
            name: l
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("Call from {phone}")),
            pipeline_id: PIPELINE_ID,
            status_id: STATUS_UNSORTED,
            responsible_user_id: resp_l,
            contact_ids: vec![cid],
            tags: vec![],
            price: l.get("price").and_then(Value::as_i64).unwrap_or(0),
        });
        let uid = rand_token("unsorted");
        st.snap.unsorted.push(Unsorted {
            uid: uid.clone(),
            source_uid: v
                .get("source_uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            source_name: v
                .get("source_name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            pipeline_id: PIPELINE_ID,
            lead_id: lid,
            contact_id: Some(cid),
            metadata: meta.clone(),
        });
        if meta.get("is_call_event_needed") == Some(&Value::Bool(true)) {
            let id = st.id();
            let uniq = meta.get("uniq").and_then(Value::as_str).map(str::to_string);
            if let Some(w) = &st.call_watch {
                let _ = w.send(CallSeen {
                    uniq: uniq.clone(),
                    at: std::time::Instant::now(),
                });
            }
            st.snap.calls.push(CallNote {
                id,
                uniq,
                direction: "inbound".into(),
                duration: meta.get("duration").and_then(Value::as_i64).unwrap_or(0),
                source: meta
                    .get("service_code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .into(),
                link: meta.get("link").and_then(Value::as_str).map(str::to_string),
                phone: phone.clone(),
                call_status: None,
                call_result: None,
                responsible_user_id: resp_l,
                created_by: None,
                created_at: meta.get("called_at").and_then(Value::as_i64),
                entity_type: "lead".into(),
                entity_id: lid,
            });
        }
        out.push(json!({
            "uid": uid, "account_id": ACCOUNT_ID, "request_id": rid(i),
            "_embedded": {"leads": [{"id": lid}], "contacts": [{"id": cid}], "companies": []},
        }));
    }
    hal(
        StatusCode::OK,
        json!({"_total_items": out.len(), "_page": 0, "_embedded": {"unsorted": out}}),
    )
}

fn entity_exists(st: &St, etype: &str, id: i64) -> bool {
    match etype {
        "leads" => st.snap.leads.iter().any(|l| l.id == id),
        "contacts" => st.snap.contacts.iter().any(|c| c.id == id),
        _ => false,
    }
}

fn create_tasks(st: &mut St, arr: &[Value]) -> Response {
    let mut errs = Vec::new();
    let mut tasks = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let text = v.get("text").and_then(Value::as_str).unwrap_or("");
        if text.is_empty() {
            errs.push((
                i,
                "NotBlank",
                "text".into(),
                "This value should not be blank.".into(),
            ));
        }
        let till = v.get("complete_till").and_then(Value::as_i64);
        if till.is_none() {
            errs.push((
                i,
                "NotBlank",
                "complete_till".into(),
                "This value should not be blank.".into(),
            ));
        }
        let etype = v.get("entity_type").and_then(Value::as_str);
        let eid = v.get("entity_id").and_then(Value::as_i64);
        if let Some(et) = etype
            && !eid.is_some_and(|id| entity_exists(st, et, id))
        {
            errs.push((
                i,
                "NotFound",
                "entity_id".into(),
                format!("{et} entity not found"),
            ));
        }
        let ttype = v.get("task_type_id").and_then(Value::as_i64).unwrap_or(1);
        if !(1..=3).contains(&ttype) {
            errs.push((
                i,
                "NotSupportedChoice",
                "task_type_id".into(),
                "The value you selected is not a valid choice.".into(),
            ));
        }
        let resp = check_user(st, i, v, "responsible_user_id", &mut errs);
        tasks.push(Task {
            id: 0,
            text: text.into(),
            complete_till: till.unwrap_or(0),
            entity_type: etype.map(str::to_string),
            entity_id: eid,
            task_type_id: ttype,
            responsible_user_id: resp.unwrap_or(ADMIN_USER_ID),
            is_completed: v.get("is_completed") == Some(&Value::Bool(true)),
            result_text: None,
        });
    }
    if !errs.is_empty() {
        return validation(errs);
    }
    let mut out = Vec::new();
    for (i, mut t) in tasks.into_iter().enumerate() {
        t.id = st.id();
        out.push(json!({"id": t.id, "request_id": rid(i), "_links": {"self": {"href": format!("/api/v4/tasks/{}", t.id)}}}));
        st.snap.tasks.push(t);
    }
    created("tasks", out)
}

fn task_json(t: &Task) -> Value {
    json!({
        "id": t.id, "text": t.text, "complete_till": t.complete_till, "entity_type": t.entity_type,
        "entity_id": t.entity_id, "task_type_id": t.task_type_id, "responsible_user_id": t.responsible_user_id,
        "is_completed": t.is_completed, "result": t.result_text.as_ref().map(|r| json!({"text": r})).unwrap_or(json!([])),
        "account_id": ACCOUNT_ID,
    })
}

fn list_tasks(st: &St, query: &[(String, String)]) -> Response {
    let get = |k: &str| query.iter().find(|(a, _)| a == k).map(|(_, b)| b.as_str());
    let found: Vec<Value> = st
        .snap
        .tasks
        .iter()
        .filter(|t| get("filter[entity_type]").is_none_or(|e| t.entity_type.as_deref() == Some(e)))
        .filter(|t| {
            get("filter[entity_id]")
                .is_none_or(|e| t.entity_id.map(|x| x.to_string()).as_deref() == Some(e))
        })
        .filter(|t| get("filter[is_completed]").is_none_or(|c| (c == "1") == t.is_completed))
        .filter(|t| get("filter[task_type]").is_none_or(|c| c == t.task_type_id.to_string()))
        .map(task_json)
        .collect();
    if found.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    hal(
        StatusCode::OK,
        json!({"_page": 1, "_links": {"self": {"href": "/api/v4/tasks"}}, "_embedded": {"tasks": found}}),
    )
}

fn patch_tasks(st: &mut St, arr: &[Value]) -> Response {
    let mut errs = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let id = v.get("id").and_then(Value::as_i64);
        if !id.is_some_and(|id| st.snap.tasks.iter().any(|t| t.id == id)) {
            errs.push((i, "NotFound", "id".into(), "Task not found".into()));
        }
        if v.get("is_completed") == Some(&Value::Bool(true))
            && v.pointer("/result/text")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            errs.push((
                i,
                "NotBlank",
                "result.text".into(),
                "A completed task needs a result text.".into(),
            ));
        }
    }
    if !errs.is_empty() {
        return validation(errs);
    }
    let mut out = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let id = v.get("id").and_then(Value::as_i64).unwrap_or(0);
        if let Some(t) = st.snap.tasks.iter_mut().find(|t| t.id == id) {
            if let Some(c) = v.get("is_completed").and_then(Value::as_bool) {
                t.is_completed = c;
            }
            if let Some(r) = v.pointer("/result/text").and_then(Value::as_str) {
                t.result_text = Some(r.into());
            }
            if let Some(x) = v.get("text").and_then(Value::as_str) {
                t.text = x.into();
            }
            out.push(json!({"id": id, "request_id": rid(i)}));
        }
    }
    created("tasks", out)
}
