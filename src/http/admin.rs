//! The admin page: live calls, recent calls with their CRM results, the outbox and its
//! dead jobs (with retry), customization failures, AMI/CRM status.
//!
//! Server-rendered HTML, no build step, no JavaScript needed beyond a meta refresh.
//! Access: a password (its SHA-256 in config) exchanged for a random session cookie.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crm::BoxFuture;

/// One row of the live calls table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LiveCallRow {
    pub call_id: String,
    pub direction: String,
    pub client_phone: String,
    /// e.g. "ringing 101, 102" or "talking 101".
    pub state: String,
    pub since: String,
}

/// One row of the recent calls table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecentCallRow {
    pub call_id: String,
    pub ended_at: String,
    pub direction: String,
    pub client_phone: String,
    pub answered_by: String,
    pub result: u16,
    pub duration: u64,
    /// Signed link to the mp3, if the call was recorded.
    pub record_link: Option<String>,
    /// Per CRM: "registered", "pending", "dead: reason".
    pub crm: Vec<(String, String)>,
}

/// One outbox job row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRow {
    pub id: i64,
    pub connector: String,
    pub call_id: String,
    pub stage: String,
    pub state: String,
    pub attempts: u32,
    pub last_error: String,
}

/// Everything the page shows, gathered by the daemon.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdminSnapshot {
    pub ami_status: String,
    pub crm_status: Vec<(String, String)>,
    pub live_calls: Vec<LiveCallRow>,
    pub recent_calls: Vec<RecentCallRow>,
    pub jobs: Vec<JobRow>,
    /// Customization failures: (hook, reason, count).
    pub hook_failures: Vec<(String, String, u64)>,
}

/// Where the admin page gets its data and sends its actions (the daemon implements it).
pub trait AdminSource: Send + Sync + 'static {
    fn snapshot(&self) -> BoxFuture<'_, AdminSnapshot>;
    /// Put a dead or failed job back in the queue; `Err` is shown to the admin.
    fn retry_job(&self, id: i64) -> BoxFuture<'_, Result<(), String>>;
}

/// Login settings.
#[derive(Clone)]
pub struct AdminAuth {
    /// Hex SHA-256 of the admin password; `None` disables the page.
    pub password_sha256: Option<String>,
}

#[derive(Clone)]
struct AdminState {
    source: Arc<dyn AdminSource>,
    auth: AdminAuth,
    sessions: Arc<Mutex<HashSet<String>>>,
}

const COOKIE: &str = "kolokol_admin";

/// Routes under `/admin`.
pub fn router(source: Arc<dyn AdminSource>, auth: AdminAuth) -> Router {
    let state = AdminState {
        source,
        auth,
        sessions: Arc::new(Mutex::new(HashSet::new())),
    };
    Router::new()
        .route("/admin", get(page))
        .route("/admin/login", get(login_form).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/jobs/{id}/retry", post(retry))
        .route("/admin/api/snapshot", get(snapshot_json))
        .with_state(state)
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_string())
    })
}

fn logged_in(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(token) = session_of(headers) else {
        return false;
    };
    state
        .sessions
        .lock()
        .map(|s| s.contains(&token))
        .unwrap_or(false)
}

async fn page(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !logged_in(&state, &headers) {
        return Redirect::to("/admin/login").into_response();
    }
    let snap = state.source.snapshot().await;
    Html(render_page(&snap)).into_response()
}

async fn snapshot_json(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !logged_in(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(state.source.snapshot().await).into_response()
}

async fn login_form(State(state): State<AdminState>) -> Html<String> {
    Html(render_login(state.auth.password_sha256.is_none(), None))
}

#[derive(Deserialize)]
struct LoginForm {
    password: String,
}

async fn login(State(state): State<AdminState>, Form(form): Form<LoginForm>) -> Response {
    let Some(expected) = &state.auth.password_sha256 else {
        return (StatusCode::FORBIDDEN, Html(render_login(true, None))).into_response();
    };
    let got = hex::encode(Sha256::digest(form.password.as_bytes()));
    if !constant_time_eq(
        got.as_bytes(),
        expected.trim().to_ascii_lowercase().as_bytes(),
    ) {
        tracing::warn!("admin login refused: wrong password");
        return (
            StatusCode::UNAUTHORIZED,
            Html(render_login(false, Some("Wrong password."))),
        )
            .into_response();
    }
    let token = hex::encode(rand::random::<[u8; 24]>());
    if let Ok(mut s) = state.sessions.lock() {
        s.insert(token.clone());
    }
    tracing::info!("admin logged in");
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict"),
            ),
            (header::LOCATION, "/admin".to_string()),
        ],
    )
        .into_response()
}

async fn logout(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let (Some(token), Ok(mut s)) = (session_of(&headers), state.sessions.lock()) {
        s.remove(&token);
    }
    Redirect::to("/admin/login").into_response()
}

async fn retry(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    if !logged_in(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match state.source.retry_job(id).await {
        Ok(()) => {
            tracing::info!(job_id = id, "admin retried job");
            Redirect::to("/admin").into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Html(format!(
                "<p>Cannot retry job {id}: {}</p><a href=\"/admin\">back</a>",
                esc(&e)
            )),
        )
            .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HTML-escape text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f3f3f3}.ok{color:#070}.bad{color:#b00}h2{margin-top:1.2em}\
td.empty{color:#777;font-style:italic}.nowrap{white-space:nowrap}tr.dead{background:#fff0f0}\
header{display:flex;gap:1em;align-items:baseline}header form{margin-left:auto}";

/// A table row saying the table is empty, spanning `cols` columns.
fn empty_row(cols: usize, text: &str) -> String {
    format!("<tr><td class=empty colspan={cols}>{text}</td></tr>")
}

/// An AMI/CRM state, coloured: red when something needs the admin, green when done.
fn crm_state(text: &str) -> String {
    let bad = ["down", "BLOCKED", "paused", "stopped"];
    let class = if bad.iter().any(|b| text.starts_with(b)) {
        "bad"
    } else if text == "running" || text.starts_with("connected") {
        "ok"
    } else {
        ""
    };
    format!("<b class=\"{class}\">{}</b>", esc(text))
}

fn render_login(disabled: bool, error: Option<&str>) -> String {
    let mut h = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>kolokol admin</title><style>{STYLE}</style></head><body><h1>kolokol</h1>"
    );
    if disabled {
        h.push_str("<p>The admin page is disabled: set <code>[http] admin_password_sha256</code> in the config.</p>");
    } else {
        if let Some(e) = error {
            let _ = write!(h, "<p class=bad id=error>{}</p>", esc(e));
        }
        h.push_str("<form method=post action=/admin/login><label>Password <input type=password name=password id=password autofocus></label> <button type=submit id=login>Log in</button></form>");
    }
    h.push_str("</body></html>");
    h
}

/// The main page.
pub fn render_page(s: &AdminSnapshot) -> String {
    let mut h = format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=3><title>kolokol admin</title><style>{STYLE}</style></head><body><h1>kolokol</h1>"
    );
    // The page reloads every 3 s: live calls and job states update without JavaScript.
    let _ = write!(h, "<header><p id=status>AMI: {}", crm_state(&s.ami_status));
    for (crm, st) in &s.crm_status {
        let _ = write!(h, " · {}: {}", esc(crm), crm_state(st));
    }
    h.push_str(
        "</p><form method=post action=/admin/logout><button>Log out</button></form></header>",
    );

    let _ = write!(
        h,
        "<h2>Live calls ({})</h2><table id=live><tr><th>call</th><th>direction</th><th>client</th><th>state</th><th>since</th></tr>",
        s.live_calls.len()
    );
    for c in &s.live_calls {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.call_id),
            esc(&c.direction),
            esc(&c.client_phone),
            esc(&c.state),
            esc(&c.since)
        );
    }
    if s.live_calls.is_empty() {
        h.push_str(&empty_row(5, "No calls in progress."));
    }
    h.push_str("</table>");

    let _ = write!(
        h,
        "<h2>Recent calls</h2><table id=recent><tr><th>ended</th><th>call</th><th>direction</th><th>client</th><th>answered by</th><th>result</th><th>duration</th><th>recording</th><th>CRM</th></tr>"
    );
    for c in &s.recent_calls {
        let rec = c
            .record_link
            .as_deref()
            .map_or(String::new(), |l| format!("<a href=\"{}\">mp3</a>", esc(l)));
        let crm: Vec<String> = c
            .crm
            .iter()
            .map(|(k, v)| {
                let class = if v.contains("dead") { " class=bad" } else { "" };
                format!("<span{class}>{}: {}</span>", esc(k), esc(v))
            })
            .collect();
        let _ = write!(
            h,
            "<tr class=call><td class=nowrap>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} s</td><td>{}</td><td>{}</td></tr>",
            esc(&c.ended_at),
            esc(&c.call_id),
            esc(&c.direction),
            esc(&c.client_phone),
            esc(&c.answered_by),
            c.result,
            c.duration,
            rec,
            crm.join("<br>")
        );
    }
    if s.recent_calls.is_empty() {
        h.push_str(&empty_row(9, "No calls yet."));
    }
    h.push_str("</table>");

    h.push_str("<h2>Outbox</h2><table id=jobs><tr><th>id</th><th>CRM</th><th>call</th><th>stage</th><th>state</th><th>attempts</th><th>last error</th><th></th></tr>");
    for j in &s.jobs {
        let action = if j.state == "dead" || j.state == "pending" {
            format!(
                "<form method=post action=/admin/jobs/{}/retry><button class=retry>Retry</button></form>",
                j.id
            )
        } else {
            String::new()
        };
        let _ = write!(
            h,
            "<tr class=\"job {}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&j.state),
            j.id,
            esc(&j.connector),
            esc(&j.call_id),
            esc(&j.stage),
            esc(&j.state),
            j.attempts,
            esc(&j.last_error),
            action
        );
    }
    if s.jobs.is_empty() {
        h.push_str(&empty_row(8, "The outbox is empty."));
    }
    h.push_str("</table><h2>Customization failures</h2><table id=hooks><tr><th>hook</th><th>reason</th><th>count</th></tr>");
    for (hook, reason, n) in &s.hook_failures {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(hook),
            esc(reason),
            n
        );
    }
    if s.hook_failures.is_empty() {
        h.push_str(&empty_row(3, "None."));
    }
    h.push_str("</table></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes_everything_from_calls() {
        let snap = AdminSnapshot {
            ami_status: "connected".into(),
            live_calls: vec![LiveCallRow {
                call_id: "1.0".into(),
                direction: "inbound".into(),
                client_phone: "<script>".into(),
                state: "ringing 101".into(),
                since: "00:00".into(),
            }],
            ..Default::default()
        };
        let html = render_page(&snap);
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn empty_tables_say_so_and_dead_jobs_stand_out() {
        let html = render_page(&AdminSnapshot {
            ami_status: "down: cannot connect".into(),
            jobs: vec![JobRow {
                id: 7,
                connector: "kommo".into(),
                call_id: "1.0".into(),
                stage: "call_ended".into(),
                state: "dead".into(),
                attempts: 1,
                last_error: "rejected".into(),
            }],
            ..Default::default()
        });
        assert!(html.contains("No calls in progress."));
        assert!(html.contains("No calls yet."));
        assert!(!html.contains("The outbox is empty."));
        assert!(html.contains("<tr class=\"job dead\">"));
        assert!(html.contains("action=/admin/jobs/7/retry"));
        assert!(html.contains("<b class=\"bad\">down: cannot connect</b>"));
    }
}
