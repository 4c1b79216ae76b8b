//! Registration of a finished call in Kommo, step by step.
//!
//! On `call_ended` (the only stage this connector asks for) a job runs these steps;
//! each stores its result through [`JobSteps`] before the next one starts, so a job
//! redelivered after a crash resumes where it stopped instead of creating a second
//! contact, lead, call note or task:
//!
//! 1. `decision`: internal calls, black/white lists and `need_registration`.
//! 2. `phone`: normalised international digits, then `process_client_phone`.
//! 3. `contact`: `GET /api/v4/contacts?query=` matched on the last 10 digits; for an
//!    unknown number either `POST /api/v4/leads/unsorted/sip` (config `unsorted`,
//!    incoming calls) or `POST /api/v4/contacts` (`process_contact_creation_params`).
//! 4. `lead`: for a contact created here, `POST /api/v4/leads`
//!    (`process_lead_creation_params`). `contact_update` / `lead_update`: for known
//!    clients, `PATCH` with `process_contact_update_params` / `process_lead_update_params`.
//! 5. `call`: `POST /api/v4/calls` once, `uniq` = call id (`process_call_params`).
//! 6. `task`: missed incoming / unanswered outgoing → `POST /api/v4/tasks`
//!    (`process_task_creation_params`); `complete_tasks`: answered → open call-back
//!    tasks of the client completed (config `complete_tasks_on_answer`).
//! 7. `post_registration` with everything Kommo returned.
//!
//! Before each create request a `<step>_sent` marker is stored. A crash after Kommo
//! accepted the request but before its result was recorded leaves the marker without
//! the result; the next attempt then looks the entity up first (the contact by phone,
//! the contact's newest lead, an open task with the same text, the call note whose
//! `params.uniq` is our call id) instead of creating it again.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::batch::{Batcher, ItemAnswer};
use super::client::{KommoClient, KommoError};
use super::{KommoConfig, NAME};
use crate::calls::{CallFull, Direction, Stage};
use crate::crm::{
    BoxFuture, Connector, CrmError, DeliveryReport, Job, JobSteps, LearnedResponsible, Responsible,
};
use crate::hooks::{Customize, HookOutcome};
use crate::phone;

/// Gives the recording link to put in the call note (the records module's signed mp3
/// URL). The default takes `record_link` / `record_url` / `link` from `call_full`.
pub type LinkFor = Arc<dyn Fn(&CallFull) -> Option<String> + Send + Sync>;

/// The result of [`KommoConnector::check_account`].
#[derive(Debug, Clone, PartialEq)]
pub struct AccountCheck {
    /// Id of the contacts custom field with `code` PHONE.
    pub phone_field_id: i64,
    /// All users of the account.
    pub users: Vec<KommoUser>,
    /// Mapped `[kommo.users]` entries whose user id does not exist in the account.
    pub unknown_mapped: Vec<(String, i64)>,
}

/// A Kommo user, as `kolokol kommo users` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KommoUser {
    pub id: i64,
    pub name: String,
    pub email: String,
}

/// A contact found by phone.
#[derive(Debug, Clone)]
struct FoundContact {
    id: i64,
    name: String,
    responsible_user_id: Option<i64>,
    lead_ids: Vec<i64>,
    raw: Value,
}

/// The Kommo connector: plug into the outbox as `Arc<dyn Connector>`.
pub struct KommoConnector {
    cfg: KommoConfig,
    client: Arc<KommoClient>,
    /// One batcher per array endpoint we create things with.
    batches: Batches,
    hooks: Arc<dyn Customize>,
    link_for: LinkFor,
    phone_field: OnceCell<i64>,
    /// One find-or-create at a time per client number: two calls from a new number
    /// delivered at once must not both create a contact.
    client_locks: ClientLocks,
}

/// Async locks keyed by a client's last 10 digits, dropped when nobody holds them.
#[derive(Default)]
struct ClientLocks(
    std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
);

impl ClientLocks {
    async fn lock(&self, phone: &str) -> ClientGuard<'_> {
        let key = crate::phone::last10(phone);
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = m.clone().lock_owned().await;
        ClientGuard {
            locks: self,
            key,
            _guard: Some(guard),
            lock: m,
        }
    }
}

struct ClientGuard<'a> {
    locks: &'a ClientLocks,
    key: String,
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self._guard = None;
        let mut map = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        // The map's copy and ours: nobody else waits for this number.
        if Arc::strong_count(&self.lock) <= 2 {
            map.remove(&self.key);
        }
    }
}

fn default_link(call: &CallFull) -> Option<String> {
    if call.record.is_empty() && !call.extra.contains_key("record_link") {
        return None;
    }
    ["record_link", "record_url", "link"].iter().find_map(|k| {
        call.extra
            .get(*k)
            .and_then(Value::as_str)
            .filter(|s| s.starts_with("http://") || s.starts_with("https://"))
            .map(str::to_string)
    })
}

/// What the customization decided for one request.
enum Params {
    Send(Value),
    Cancelled,
}

fn step_err(step: &str, e: String) -> CrmError {
    CrmError::Retryable {
        message: format!("cannot record Kommo step {step}: {e}"),
        retry_after: None,
    }
}

fn record(steps: &dyn JobSteps, step: &str, v: Value) -> Result<Value, CrmError> {
    steps.put(step, &v).map_err(|e| step_err(step, e))?;
    Ok(v)
}

/// A client's name as the dialplan's CallerID name gets it: Asterisk keeps 20 characters.
pub(super) fn caller_id_name(name: &str) -> String {
    name.chars().take(20).collect()
}

/// A Kommo id, sent as a number or (by some customizations) as a string.
pub(super) fn as_id(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Internal numbers in `call_full`'s conversations, in the order they rang.
fn internal_numbers(call: &CallFull) -> Vec<String> {
    let view = crate::crm::call_view(call);
    let mut out: Vec<String> = Vec::new();
    let mut push = |v: Option<&Value>| {
        let s = match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return,
        };
        if !s.is_empty() && s != call.client_phone && s != call.line_number {
            out.retain(|x| x != &s);
            out.push(s);
        }
    };
    if call.direction == Direction::Outbound
        && let Some(ch) = view.get("channel").and_then(Value::as_object)
    {
        push(ch.get("from"));
    }
    if let Some(convs) = view.get("conversations").and_then(Value::as_object) {
        for conv in convs.values() {
            if call.direction == Direction::Outbound
                && let Some(ch) = conv.get("channel").and_then(Value::as_object)
            {
                push(ch.get("from"));
            }
            push(conv.get("user"));
        }
    }
    if !call.answered_by.is_empty() {
        push(Some(&Value::String(call.answered_by.clone())));
    }
    out
}

/// Trunks / lines the call went through.
fn trunks(call: &CallFull) -> Vec<String> {
    let view = crate::crm::call_view(call);
    let mut out = Vec::new();
    if !call.line_number.is_empty() {
        out.push(call.line_number.clone());
    }
    let mut add = |v: Option<&Value>| {
        if let Some(s) = v.and_then(Value::as_str)
            && !s.is_empty()
            && !out.iter().any(|x| x == s)
        {
            out.push(s.to_string());
        }
    };
    add(view.get("trunk"));
    if let Some(ch) = view.get("channel") {
        add(ch.get("trunk"));
    }
    if let Some(convs) = view.get("conversations").and_then(Value::as_object) {
        for conv in convs.values() {
            if let Some(ch) = conv.get("channel") {
                add(ch.get("trunk"));
            }
        }
    }
    out
}

fn answered(call: &CallFull) -> bool {
    !call.answered_by.is_empty() || call.result == 200
}

/// Kommo `call_status` and a human `call_result` for a call.
fn call_status(call: &CallFull) -> (i64, &'static str) {
    if answered(call) {
        (4, "Answered")
    } else {
        match call.result {
            486 | 600 => (7, "Busy"),
            404 | 484 => (3, "Not available"),
            487 => (6, "Cancelled by caller"),
            _ => (6, "No answer"),
        }
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// When the call started (unix seconds): `call_full.created_at` if a customization set
/// it, else [`CallFull::started_at`] (the daemon stamps `start_timestamp` from the
/// tracker's times at `[calls] time_offset`; unstamped times are read as UTC, the
/// tracker's default), else the end of the call minus its duration.
fn started_at(call: &CallFull) -> i64 {
    use chrono::Offset;
    call.extra
        .get("created_at")
        .and_then(Value::as_i64)
        .or_else(|| call.started_at(chrono::Utc.fix()))
        .unwrap_or_else(|| now_unix() - call.duration as i64)
}

/// Contacts' `_embedded.contacts` whose PHONE values end with the same 10 digits.
fn matching_contacts(body: &Value, last10: &str) -> Vec<FoundContact> {
    let mut out = Vec::new();
    for c in body
        .pointer("/_embedded/contacts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let phones = c
            .get("custom_fields_values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|f| f.get("field_code").and_then(Value::as_str) == Some("PHONE"))
            .flat_map(|f| {
                f.get("values")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .filter_map(|v| v.get("value").and_then(Value::as_str));
        let mut hit = false;
        for p in phones {
            if phone::last10(p) == last10 {
                hit = true;
            }
        }
        let Some(id) = as_id(c.get("id")) else {
            continue;
        };
        if hit {
            out.push(FoundContact {
                id,
                name: c
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                responsible_user_id: as_id(c.get("responsible_user_id")),
                lead_ids: c
                    .pointer("/_embedded/leads")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|l| as_id(l.get("id")))
                    .collect(),
                raw: c.clone(),
            });
        }
    }
    out
}

/// Move Itgrix-style `tags: ["a", ...]` into the API's `_embedded.tags: [{name}]`.
fn tags_to_embedded(mut p: Value) -> Value {
    if let Value::Object(m) = &mut p
        && let Some(Value::Array(tags)) = m.remove("tags")
    {
        let tags: Vec<Value> = tags
            .into_iter()
            .map(|t| match t {
                Value::String(name) => json!({ "name": name }),
                other => other,
            })
            .collect();
        let emb = m.entry("_embedded").or_insert_with(|| json!({}));
        if let Value::Object(e) = emb {
            e.insert("tags".into(), Value::Array(tags));
        }
    }
    p
}

/// The batchers of the endpoints registration creates things with.
struct Batches {
    contacts: Arc<Batcher>,
    leads: Arc<Batcher>,
    unsorted: Arc<Batcher>,
    calls: Arc<Batcher>,
    tasks: Arc<Batcher>,
}

impl Batches {
    fn new(client: &Arc<KommoClient>, cfg: &KommoConfig) -> Batches {
        let b =
            |path, key| Batcher::new(client.clone(), path, key, cfg.batch_size, cfg.batch_window);
        Batches {
            contacts: b("/api/v4/contacts", "contacts"),
            leads: b("/api/v4/leads", "leads"),
            unsorted: b("/api/v4/leads/unsorted/sip", "unsorted"),
            calls: b("/api/v4/calls", "calls"),
            tasks: b("/api/v4/tasks", "tasks"),
        }
    }
}

impl KommoConnector {
    /// A connector for `cfg`, with OAuth tokens in `store` (unused with a long-lived
    /// token) and customizations run by `hooks`.
    pub fn new(
        cfg: KommoConfig,
        store: Arc<dyn crate::crm::TokenStore>,
        hooks: Arc<dyn Customize>,
    ) -> Result<Self, KommoError> {
        let client = Arc::new(KommoClient::new(&cfg, store)?);
        let batches = Batches::new(&client, &cfg);
        Ok(KommoConnector {
            cfg,
            client,
            batches,
            hooks,
            link_for: Arc::new(default_link),
            phone_field: OnceCell::new(),
            client_locks: ClientLocks::default(),
        })
    }

    /// Use `f` to get the recording link of a call (e.g. the records module's signed URL).
    pub fn with_link_for(mut self, f: LinkFor) -> Self {
        self.link_for = f;
        self
    }

    /// The HTTP client (for `kolokol kommo auth`).
    pub fn client(&self) -> &KommoClient {
        &self.client
    }

    /// The config in use.
    pub fn config(&self) -> &KommoConfig {
        &self.cfg
    }

    /// Every user of the account (`GET /api/v4/users`, all pages).
    pub async fn users(&self) -> Result<Vec<KommoUser>, KommoError> {
        let mut users = Vec::new();
        for page in 1..=40 {
            let body = self
                .client
                .get(
                    "/api/v4/users",
                    &[("limit", "250".into()), ("page", page.to_string())],
                )
                .await?;
            let Some(body) = body else { break };
            let list = body
                .pointer("/_embedded/users")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for u in &list {
                if let Some(id) = as_id(u.get("id")) {
                    let s = |k: &str| u.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    users.push(KommoUser {
                        id,
                        name: s("name"),
                        email: s("email"),
                    });
                }
            }
            if list.is_empty() || body.pointer("/_links/next").is_none() {
                break;
            }
        }
        Ok(users)
    }

    /// The id of the contacts field `code` PHONE that has the enum WORK.
    async fn find_phone_field(&self) -> Result<i64, KommoError> {
        let mut page = 1;
        loop {
            let body = self
                .client
                .get(
                    "/api/v4/contacts/custom_fields",
                    &[("limit", "250".into()), ("page", page.to_string())],
                )
                .await?;
            let Some(body) = body else { break };
            let fields = body
                .pointer("/_embedded/custom_fields")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for f in &fields {
                if f.get("code").and_then(Value::as_str) != Some("PHONE") {
                    continue;
                }
                let has_work = f
                    .get("enums")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .any(|e| e.get("value").and_then(Value::as_str) == Some("WORK"));
                if !has_work {
                    return Err(KommoError::Account(
                        "the contacts field with code PHONE has no WORK value: restore the standard \"Phone\" field's WORK option in Kommo (Settings → Contacts → fields)".into(),
                    ));
                }
                if let Some(id) = as_id(f.get("id")) {
                    return Ok(id);
                }
            }
            if fields.is_empty() || body.pointer("/_links/next").is_none() || page >= 20 {
                break;
            }
            page += 1;
        }
        Err(KommoError::Account(
            "contacts have no custom field with code PHONE: restore the standard \"Phone\" contact field (with the WORK option) in Kommo".into(),
        ))
    }

    async fn phone_field_id(&self) -> Result<i64, KommoError> {
        self.phone_field
            .get_or_try_init(|| self.find_phone_field())
            .await
            .copied()
    }

    /// Start-up check: the PHONE/WORK contact field exists and users are readable (the
    /// token belongs to an admin). Logs mapped user ids that do not exist.
    pub async fn check_account(&self) -> Result<AccountCheck, KommoError> {
        let phone_field_id = self.phone_field_id().await?;
        let users = self.users().await.map_err(|e| match e {
            KommoError::Forbidden { detail, .. } => KommoError::Account(format!(
                "users are not readable ({detail}): authorize the integration as an account administrator"
            )),
            other => other,
        })?;
        if users.is_empty() {
            return Err(KommoError::Account(
                "the account returned no users: authorize the integration as an account administrator".into(),
            ));
        }
        let unknown_mapped: Vec<(String, i64)> = self
            .cfg
            .users
            .iter()
            .filter(|(_, id)| !users.iter().any(|u| u.id == **id))
            .map(|(e, id)| (e.clone(), *id))
            .collect();
        for (ext, id) in &unknown_mapped {
            tracing::warn!(crm = NAME, extension = %ext, user_id = id, "[kommo.users] maps an internal number to a user id that does not exist in Kommo: see `kolokol kommo users`");
        }
        Ok(AccountCheck {
            phone_field_id,
            users,
            unknown_mapped,
        })
    }

    /// Run a customization. Its data replaces the default params; `Default` (not
    /// installed or failed) keeps them; `Cancelled` cancels the request.
    async fn customize(&self, hook: &str, defaults: Value, call: &CallFull) -> Params {
        let mut input = defaults.clone();
        if let Value::Object(m) = &mut input {
            m.insert(
                "call_full".into(),
                serde_json::to_value(call).unwrap_or(Value::Null),
            );
        }
        match self.hooks.run(hook, input, &call.id).await {
            HookOutcome::Data(Value::Object(mut m)) => {
                m.remove("call_full");
                tracing::debug!(crm = NAME, call_id = %call.id, hook, "customization changed the params");
                Params::Send(Value::Object(m))
            }
            HookOutcome::Data(other) => {
                tracing::warn!(crm = NAME, call_id = %call.id, hook, data = %other, "customization returned data that is not an object: using the defaults");
                Params::Send(defaults)
            }
            HookOutcome::Cancelled => {
                tracing::info!(crm = NAME, call_id = %call.id, hook, "request cancelled by customization");
                Params::Cancelled
            }
            HookOutcome::Default { reason } => {
                tracing::trace!(crm = NAME, call_id = %call.id, hook, %reason, "customization not applied");
                Params::Send(defaults)
            }
        }
    }

    fn user_of(&self, ext: &str) -> Option<i64> {
        self.cfg.users.get(ext).copied()
    }

    /// The last employee (mapped to a Kommo user) whose phone rang.
    fn last_employee(&self, call: &CallFull) -> Option<i64> {
        internal_numbers(call)
            .iter()
            .rev()
            .find_map(|n| self.user_of(n))
    }

    fn phone_for_kommo(&self, raw: &str) -> String {
        let d = phone::normalize(raw, &self.cfg.phone);
        if self.cfg.phone_plus && d.len() > 6 {
            format!("+{d}")
        } else {
            d
        }
    }

    fn tags(&self) -> Value {
        Value::Array(self.cfg.tags.iter().map(|t| json!({ "name": t })).collect())
    }

    /// Black/white lists from config. `Some(reason)` when the call must be skipped.
    fn filtered_out(&self, call: &CallFull) -> Option<String> {
        let nums = internal_numbers(call);
        let c = &self.cfg;
        if !c.only_internal_numbers.is_empty()
            && !nums.iter().any(|n| c.only_internal_numbers.contains(n))
        {
            return Some("no internal number of only_internal_numbers took part".into());
        }
        if let Some(n) = nums.iter().find(|n| c.ignore_internal_numbers.contains(n)) {
            return Some(format!("internal number {n} is in ignore_internal_numbers"));
        }
        let tr = trunks(call);
        if !c.only_trunks.is_empty() && !tr.iter().any(|t| c.only_trunks.contains(t)) {
            return Some("trunk not in only_trunks".into());
        }
        if let Some(t) = tr.iter().find(|t| c.ignore_trunks.contains(t)) {
            return Some(format!("trunk {t} is in ignore_trunks"));
        }
        None
    }

    async fn decide(&self, call: &CallFull, stage: Stage) -> Result<Value, CrmError> {
        if call.direction == Direction::Internal {
            return Ok(json!({"register": false, "reason": "internal call"}));
        }
        if call.client_phone.trim().is_empty() {
            return Ok(json!({"register": false, "reason": "no client phone"}));
        }
        if let Some(reason) = self.filtered_out(call) {
            return Ok(json!({"register": false, "reason": reason}));
        }
        let input = json!({
            "call_full": serde_json::to_value(call).unwrap_or(Value::Null),
            "call_stage": stage.as_str(),
        });
        let v = match self.hooks.run("need_registration", input, &call.id).await {
            HookOutcome::Cancelled => {
                json!({"register": false, "reason": "need_registration returned no data"})
            }
            HookOutcome::Data(Value::Bool(b)) => {
                json!({"register": b, "reason": "need_registration"})
            }
            HookOutcome::Data(d) => {
                let b = ["need_registration", "register", "result"]
                    .iter()
                    .find_map(|k| d.get(*k).and_then(Value::as_bool))
                    .unwrap_or(true);
                json!({"register": b, "reason": "need_registration"})
            }
            HookOutcome::Default { .. } => json!({"register": true}),
        };
        Ok(v)
    }

    async fn client_phone(&self, call: &CallFull, stage: Stage) -> Option<String> {
        let default = self.phone_for_kommo(&call.client_phone);
        let input = json!({"phone": default, "call_stage": stage.as_str()});
        match self.customize("process_client_phone", input, call).await {
            Params::Cancelled => None,
            Params::Send(v) => match v.get("phone") {
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => Some(default),
            },
        }
    }

    /// Contacts with this phone (last 10 digits), best first.
    async fn search_contacts(&self, phone: &str) -> Result<Vec<FoundContact>, KommoError> {
        let l10 = phone::last10(phone);
        if l10.is_empty() {
            return Ok(Vec::new());
        }
        let body = self
            .client
            .get(
                "/api/v4/contacts",
                &[("query", l10.clone()), ("with", "leads".into())],
            )
            .await?;
        Ok(body
            .map(|b| matching_contacts(&b, &l10))
            .unwrap_or_default())
    }

    /// The most recent open lead among `ids` (closed: status 142 won, 143 lost).
    async fn open_lead(&self, ids: &[i64]) -> Result<Option<(i64, Option<i64>)>, KommoError> {
        let Some(&id) = ids.iter().max() else {
            return Ok(None);
        };
        let body = self.client.get(&format!("/api/v4/leads/{id}"), &[]).await;
        let body = match body {
            Ok(b) => b,
            Err(KommoError::Rejected { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(body.and_then(|b| {
            let status = as_id(b.get("status_id"));
            if matches!(status, Some(142) | Some(143)) {
                None
            } else {
                Some((id, as_id(b.get("responsible_user_id"))))
            }
        }))
    }

    async fn contact_step(
        &self,
        call: &CallFull,
        phone: &str,
        steps: &dyn JobSteps,
    ) -> Result<Value, CrmError> {
        if let Some(v) = steps.get("contact") {
            return Ok(v);
        }
        let found = self.search_contacts(phone).await?;
        if let Some(c) = found.into_iter().next() {
            // Found, but created by an earlier attempt of this job that died before
            // recording it: still "created here" (so its lead gets made).
            let created = steps.get("contact_sent").is_some();
            let lead = self.open_lead(&c.lead_ids).await?;
            return record(
                steps,
                "contact",
                json!({
                    "id": c.id, "name": c.name, "responsible_user_id": c.responsible_user_id,
                    "created": created, "lead_id": lead.map(|l| l.0),
                    "lead_responsible_user_id": lead.and_then(|l| l.1),
                    "found": c.raw,
                }),
            );
        }
        let responsible = self
            .user_of(&call.answered_by)
            .or_else(|| self.last_employee(call))
            .or(self.cfg.default_responsible_user_id);
        let field_id = self.phone_field_id().await?;
        let contact_name = format!("Contact {phone}");
        let phone_values = json!([{
            "field_id": field_id,
            "values": [{"enum_code": "WORK", "value": phone}],
        }]);

        if self.cfg.unsorted && call.direction == Direction::Inbound {
            let mut contact = json!({"name": contact_name, "custom_fields_values": phone_values});
            let mut lead = json!({"name": self.lead_name(call, phone)});
            if let Some(r) = responsible {
                contact["responsible_user_id"] = json!(r);
                lead["responsible_user_id"] = json!(r);
            }
            let mut params = json!({
                "source_uid": call.id,
                "source_name": self.cfg.source,
                "created_at": started_at(call),
                "metadata": {
                    "is_call_event_needed": false,
                    "uniq": call.id,
                    "duration": call.talk_duration,
                    "service_code": self.cfg.source,
                    "link": (self.link_for)(call).unwrap_or_default(),
                    "phone": phone,
                    "called_at": started_at(call),
                    "from": phone,
                },
                "_embedded": {"leads": [lead], "contacts": [contact]},
            });
            if let Some(p) = self.cfg.unsorted_pipeline_id {
                params["pipeline_id"] = json!(p);
            }
            let params = match self
                .customize("process_unsorted_creation_params", params, call)
                .await
            {
                Params::Cancelled => {
                    return record(
                        steps,
                        "contact",
                        json!({"id": null, "created": false, "cancelled": "process_unsorted_creation_params"}),
                    );
                }
                Params::Send(p) => p,
            };
            record(steps, "contact_sent", json!({"unsorted": true}))?;
            let ItemAnswer { item, errors } = self.batches.unsorted.submit(params).await?;
            let item = item.ok_or_else(|| CrmError::Rejected {
                message: format!("Kommo did not create the unsorted lead: {errors:?}"),
            })?;
            let contact_id = as_id(item.pointer("/_embedded/contacts/0/id"));
            let lead_id = as_id(item.pointer("/_embedded/leads/0/id"));
            return record(
                steps,
                "contact",
                json!({
                    "id": contact_id, "name": contact_name, "responsible_user_id": responsible,
                    "created": true, "unsorted_uid": item.get("uid"), "lead_id": lead_id,
                    "lead_responsible_user_id": responsible,
                }),
            );
        }

        if !self.cfg.create_contact {
            return record(
                steps,
                "contact",
                json!({"id": null, "created": false, "reason": "create_contact is off"}),
            );
        }
        let mut params = json!({
            "name": contact_name,
            "custom_fields_values": phone_values,
            // Itgrix's shape: names; moved to the API's `_embedded.tags` below.
            "tags": self.cfg.tags,
        });
        if let Some(r) = responsible {
            params["responsible_user_id"] = json!(r);
        }
        let params = match self
            .customize("process_contact_creation_params", params, call)
            .await
        {
            Params::Cancelled => {
                return record(
                    steps,
                    "contact",
                    json!({"id": null, "created": false, "cancelled": "process_contact_creation_params"}),
                );
            }
            Params::Send(p) => tags_to_embedded(p),
        };
        record(steps, "contact_sent", json!({}))?;
        let ItemAnswer { item, errors } = self.batches.contacts.submit(params.clone()).await?;
        let id = item.as_ref().and_then(|i| as_id(i.get("id")));
        let Some(id) = id else {
            return Err(CrmError::Rejected {
                message: format!("Kommo did not create the contact: {errors:?}"),
            });
        };
        record(
            steps,
            "contact",
            json!({
                "id": id,
                "name": params.get("name").cloned().unwrap_or(json!(contact_name)),
                "responsible_user_id": as_id(params.get("responsible_user_id")),
                "created": true, "lead_id": null,
            }),
        )
    }

    fn lead_name(&self, call: &CallFull, phone: &str) -> String {
        let missed = if answered(call) { "" } else { "missed " };
        let dir = match call.direction {
            Direction::Outbound => "outgoing",
            _ => "incoming",
        };
        format!("{phone} - {missed}{dir}")
    }

    async fn lead_step(
        &self,
        call: &CallFull,
        phone: &str,
        contact: &Value,
        steps: &dyn JobSteps,
    ) -> Result<Value, CrmError> {
        if let Some(v) = steps.get("lead") {
            return Ok(v);
        }
        let contact_id = as_id(contact.get("id"));
        let created_contact = contact.get("created") == Some(&Value::Bool(true));
        if let Some(id) = as_id(contact.get("lead_id")) {
            return record(
                steps,
                "lead",
                json!({"id": id, "created": created_contact && contact.get("unsorted_uid").is_some(),
                       "responsible_user_id": contact.get("lead_responsible_user_id")}),
            );
        }
        let Some(contact_id) = contact_id.filter(|_| created_contact && self.cfg.create_lead)
        else {
            return record(steps, "lead", json!({"id": null, "created": false}));
        };
        if steps.get("lead_sent").is_some()
            && let Some(found) = self.lead_of_contact(contact_id).await?
        {
            return record(steps, "lead", found);
        }
        let mut params = json!({
            "name": self.lead_name(call, phone),
            "_embedded": {"contacts": [{"id": contact_id}], "tags": self.tags()},
        });
        if let Some(r) = as_id(contact.get("responsible_user_id")) {
            params["responsible_user_id"] = json!(r);
        }
        if let Some(p) = self.cfg.lead_pipeline_id {
            params["pipeline_id"] = json!(p);
        }
        if let Some(s) = self.cfg.lead_status_id {
            params["status_id"] = json!(s);
        }
        let params = match self
            .customize("process_lead_creation_params", params, call)
            .await
        {
            Params::Cancelled => {
                return record(
                    steps,
                    "lead",
                    json!({"id": null, "created": false, "cancelled": "process_lead_creation_params"}),
                );
            }
            Params::Send(p) => p,
        };
        record(steps, "lead_sent", json!({}))?;
        let ItemAnswer { item, errors } = self.batches.leads.submit(params.clone()).await?;
        let Some(id) = item.as_ref().and_then(|i| as_id(i.get("id"))) else {
            return Err(CrmError::Rejected {
                message: format!("Kommo did not create the lead: {errors:?}"),
            });
        };
        record(
            steps,
            "lead",
            json!({"id": id, "created": true,
                   "responsible_user_id": as_id(params.get("responsible_user_id"))}),
        )
    }

    /// The newest lead of a contact (a lead an interrupted attempt already created).
    async fn lead_of_contact(&self, contact_id: i64) -> Result<Option<Value>, CrmError> {
        let body = self
            .client
            .get(
                &format!("/api/v4/contacts/{contact_id}"),
                &[("with", "leads".into())],
            )
            .await?;
        let id = body
            .as_ref()
            .and_then(|b| b.pointer("/_embedded/leads"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|l| as_id(l.get("id")))
            .max();
        Ok(id.map(|id| {
            json!({"id": id, "created": true, "recovered": true,
            "responsible_user_id": body.as_ref().and_then(|b| as_id(b.get("responsible_user_id")))})
        }))
    }

    /// `process_contact_update_params` / `process_lead_update_params` for a client
    /// that existed before the call.
    #[allow(clippy::too_many_arguments)]
    async fn update_step(
        &self,
        call: &CallFull,
        step: &str,
        hook: &str,
        path: &str,
        id: i64,
        current_responsible: Option<i64>,
        steps: &dyn JobSteps,
    ) -> Result<Value, CrmError> {
        if let Some(v) = steps.get(step) {
            return Ok(v);
        }
        let mut defaults = json!({"id": id});
        if self.cfg.update_responsible_on_answer
            && let Some(u) = self.user_of(&call.answered_by)
            && current_responsible != Some(u)
        {
            defaults["responsible_user_id"] = json!(u);
        }
        let params = match self.customize(hook, defaults, call).await {
            Params::Cancelled => return record(steps, step, json!({"updated": false})),
            Params::Send(mut p) => {
                if let Value::Object(m) = &mut p {
                    m.remove("id");
                }
                p
            }
        };
        if params.as_object().is_none_or(|m| m.is_empty()) {
            return record(steps, step, json!({"updated": false}));
        }
        self.client.patch(&format!("{path}/{id}"), &params).await?;
        record(steps, step, json!({"updated": true, "params": params}))
    }

    async fn call_step(
        &self,
        call: &CallFull,
        phone: &str,
        contact: &Value,
        lead: &Value,
        steps: &dyn JobSteps,
    ) -> Result<Value, CrmError> {
        if let Some(v) = steps.get("call") {
            return Ok(v);
        }
        if steps.get("call_sent").is_some() {
            // A previous attempt sent the call and died before recording the answer:
            // Kommo keeps `uniq` in the call note, so look before sending again.
            if let Some(found) = self.find_call_note(&call.id, contact, lead).await? {
                tracing::info!(crm = NAME, call_id = %call.id, "call note already in Kommo: not sent again");
                return record(steps, "call", found);
            }
        }
        let (status, result) = call_status(call);
        let entity_responsible = as_id(lead.get("responsible_user_id"))
            .or_else(|| as_id(contact.get("responsible_user_id")));
        let responsible = self
            .user_of(&call.answered_by)
            .or_else(|| {
                if call.direction == Direction::Outbound {
                    self.last_employee(call)
                } else {
                    None
                }
            })
            .or(entity_responsible)
            .or_else(|| self.last_employee(call))
            .or(self.cfg.default_responsible_user_id);
        let mut params = json!({
            "direction": if call.direction == Direction::Outbound { "outbound" } else { "inbound" },
            "uniq": call.id,
            "duration": if answered(call) { call.talk_duration } else { 0 },
            "source": self.cfg.source,
            "phone": phone,
            "call_status": status,
            "call_result": result,
            "created_at": started_at(call),
        });
        if let Some(link) = (self.link_for)(call) {
            params["link"] = json!(link);
        }
        if let Some(r) = responsible {
            params["responsible_user_id"] = json!(r);
            params["created_by"] = json!(r);
        }
        let params = match self.customize("process_call_params", params, call).await {
            Params::Cancelled => {
                return record(
                    steps,
                    "call",
                    json!({"added": false, "cancelled": "process_call_params"}),
                );
            }
            Params::Send(p) => p,
        };
        record(steps, "call_sent", json!({"uniq": params.get("uniq")}))?;
        let ItemAnswer { item, errors } = self.batches.calls.submit(params.clone()).await?;
        let v = match item {
            Some(i) => json!({
                "added": true, "id": i.get("id"), "entity_id": i.get("entity_id"),
                "entity_type": i.get("entity_type"), "responsible_user_id": params.get("responsible_user_id"),
            }),
            None => {
                let errs = Value::Array(errors.clone());
                tracing::warn!(crm = NAME, call_id = %call.id, errors = %errs, "Kommo did not add the call: no contact or lead with this phone");
                json!({"added": false, "errors": errors})
            }
        };
        record(steps, "call", v)
    }

    /// The call note with `params.uniq == uniq` on the lead or contact, as a `call` step.
    async fn find_call_note(
        &self,
        uniq: &str,
        contact: &Value,
        lead: &Value,
    ) -> Result<Option<Value>, CrmError> {
        for (etype, singular, ent) in [("leads", "lead", lead), ("contacts", "contact", contact)] {
            let Some(id) = as_id(ent.get("id")) else {
                continue;
            };
            let body = self
                .client
                .get(
                    &format!("/api/v4/{etype}/{id}/notes"),
                    &[
                        ("filter[note_type][0]", "call_in".into()),
                        ("filter[note_type][1]", "call_out".into()),
                        ("limit", "250".into()),
                    ],
                )
                .await?;
            let hit = body
                .as_ref()
                .and_then(|b| b.pointer("/_embedded/notes"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|n| n.pointer("/params/uniq").and_then(Value::as_str) == Some(uniq));
            if let Some(n) = hit {
                return Ok(Some(json!({
                    "added": true, "id": n.get("id"), "entity_id": id, "entity_type": singular,
                    "responsible_user_id": n.get("responsible_user_id"), "recovered": true,
                })));
            }
        }
        Ok(None)
    }

    async fn task_step(
        &self,
        call: &CallFull,
        phone: &str,
        contact: &Value,
        lead: &Value,
        call_res: &Value,
        steps: &dyn JobSteps,
    ) -> Result<Value, CrmError> {
        if let Some(v) = steps.get("task") {
            return Ok(v);
        }
        let (entity_type, entity_id, entity_responsible) = if let Some(id) = as_id(lead.get("id")) {
            (
                "leads",
                Some(id),
                as_id(lead.get("responsible_user_id"))
                    .or_else(|| as_id(contact.get("responsible_user_id"))),
            )
        } else if let Some(id) = as_id(contact.get("id")) {
            (
                "contacts",
                Some(id),
                as_id(contact.get("responsible_user_id")),
            )
        } else {
            match (
                call_res.get("entity_type").and_then(Value::as_str),
                as_id(call_res.get("entity_id")),
            ) {
                (Some("lead"), Some(id)) => ("leads", Some(id), None),
                (Some("contact"), Some(id)) => ("contacts", Some(id), None),
                (Some("company"), Some(id)) => ("companies", Some(id), None),
                _ => ("contacts", None, None),
            }
        };
        let responsible = entity_responsible
            .or_else(|| self.last_employee(call))
            .or(self.cfg.default_responsible_user_id);
        let name = contact
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("the client")
            .to_string();
        let text = match call.direction {
            Direction::Outbound => {
                format!("Call back {name}: outgoing call to {phone} was not answered")
            }
            _ => format!("Call back {name} on a missed call from a number {phone}"),
        };
        let mut params = json!({
            "task_type": self.cfg.task_type_id,
            "text": text,
            "complete_till": now_unix() + self.cfg.task_deadline.as_secs() as i64,
            "is_completed": false,
        });
        if let Some(id) = entity_id {
            params["entity_type"] = json!(entity_type);
            params["entity_id"] = json!(id);
        }
        if let Some(r) = responsible {
            params["responsible_user_id"] = json!(r);
            params["created_by"] = json!(r);
        }
        let mut params = match self
            .customize("process_task_creation_params", params, call)
            .await
        {
            Params::Cancelled => {
                return record(
                    steps,
                    "task",
                    json!({"created": false, "cancelled": "process_task_creation_params"}),
                );
            }
            Params::Send(p) => p,
        };
        // Itgrix's hook speaks `task_type`; the API wants `task_type_id`.
        if let Value::Object(m) = &mut params
            && let Some(t) = m.remove("task_type")
        {
            m.entry("task_type_id").or_insert(t);
        }
        if steps.get("task_sent").is_some()
            && let Some(found) = self.open_task_like(&params).await?
        {
            return record(steps, "task", found);
        }
        record(steps, "task_sent", json!({}))?;
        let ItemAnswer { item, errors } = self.batches.tasks.submit(params.clone()).await?;
        let Some(id) = item.as_ref().and_then(|i| as_id(i.get("id"))) else {
            return Err(CrmError::Rejected {
                message: format!("Kommo did not create the task: {errors:?}"),
            });
        };
        record(
            steps,
            "task",
            json!({"created": true, "id": id, "responsible_user_id": params.get("responsible_user_id"),
                   "entity_type": params.get("entity_type"), "entity_id": params.get("entity_id")}),
        )
    }

    /// An open task on the same entity with the same text (sent by an interrupted
    /// attempt of this job).
    async fn open_task_like(&self, params: &Value) -> Result<Option<Value>, CrmError> {
        let (Some(etype), Some(eid)) = (
            params.get("entity_type").and_then(Value::as_str),
            as_id(params.get("entity_id")),
        ) else {
            return Ok(None);
        };
        let body = self
            .client
            .get(
                "/api/v4/tasks",
                &[
                    ("filter[entity_type]", etype.into()),
                    ("filter[entity_id]", eid.to_string()),
                    ("filter[is_completed]", "0".into()),
                ],
            )
            .await?;
        let hit = body
            .as_ref()
            .and_then(|b| b.pointer("/_embedded/tasks"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|t| t.get("text") == params.get("text"))
            .cloned();
        Ok(hit.map(|t| {
            json!({"created": true, "recovered": true, "id": t.get("id"),
            "responsible_user_id": t.get("responsible_user_id"),
            "entity_type": etype, "entity_id": eid})
        }))
    }

    /// Answered call: complete the client's open call-back tasks.
    async fn complete_tasks_step(
        &self,
        contact: &Value,
        lead: &Value,
        steps: &dyn JobSteps,
    ) -> Result<Value, CrmError> {
        if let Some(v) = steps.get("complete_tasks") {
            return Ok(v);
        }
        let mut done = Vec::new();
        for (etype, ent) in [("contacts", contact), ("leads", lead)] {
            let Some(id) = as_id(ent.get("id")) else {
                continue;
            };
            let body = self
                .client
                .get(
                    "/api/v4/tasks",
                    &[
                        ("filter[entity_type]", etype.into()),
                        ("filter[entity_id]", id.to_string()),
                        ("filter[is_completed]", "0".into()),
                        ("filter[task_type]", self.cfg.task_type_id.to_string()),
                    ],
                )
                .await?;
            let ids: Vec<i64> = body
                .as_ref()
                .and_then(|b| b.pointer("/_embedded/tasks"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|t| t.get("is_completed") != Some(&Value::Bool(true)))
                .filter_map(|t| as_id(t.get("id")))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let patch: Vec<Value> = ids
                .iter()
                .map(|id| json!({"id": id, "is_completed": true, "result": {"text": "Client reached"}}))
                .collect();
            self.client
                .patch("/api/v4/tasks", &Value::Array(patch))
                .await?;
            done.extend(ids);
        }
        record(steps, "complete_tasks", json!({"completed": done}))
    }

    async fn register(&self, job: &Job, steps: &dyn JobSteps) -> Result<Value, CrmError> {
        let call = &job.call_full;
        let stage = job.stage;
        let decision = match steps.get("decision") {
            Some(v) => v,
            None => record(steps, "decision", self.decide(call, stage).await?)?,
        };
        if decision.get("register") != Some(&Value::Bool(true)) {
            tracing::info!(crm = NAME, call_id = %call.id, reason = %decision["reason"], "call not registered in Kommo");
            return Ok(json!({"registered": false, "reason": decision.get("reason")}));
        }
        let phone = match steps.get("phone") {
            Some(v) => v,
            None => {
                let p = self.client_phone(call, stage).await;
                record(steps, "phone", json!(p))?
            }
        };
        let Some(phone) = phone.as_str().map(str::to_string) else {
            return Ok(json!({"registered": false, "reason": "process_client_phone cancelled"}));
        };

        let client_lock = self.client_locks.lock(&phone).await;
        let contact = self.contact_step(call, &phone, steps).await?;
        let lead = self.lead_step(call, &phone, &contact, steps).await?;
        drop(client_lock);
        if contact.get("created") == Some(&Value::Bool(false))
            && let Some(id) = as_id(contact.get("id"))
        {
            self.update_step(
                call,
                "contact_update",
                "process_contact_update_params",
                "/api/v4/contacts",
                id,
                as_id(contact.get("responsible_user_id")),
                steps,
            )
            .await?;
            if let Some(lid) = as_id(lead.get("id")) {
                self.update_step(
                    call,
                    "lead_update",
                    "process_lead_update_params",
                    "/api/v4/leads",
                    lid,
                    as_id(lead.get("responsible_user_id")),
                    steps,
                )
                .await?;
            }
        }
        let call_res = self.call_step(call, &phone, &contact, &lead, steps).await?;
        let missed = !answered(call);
        let task = if missed && self.cfg.create_tasks {
            self.task_step(call, &phone, &contact, &lead, &call_res, steps)
                .await?
        } else {
            Value::Null
        };
        let completed = if !missed && self.cfg.complete_tasks_on_answer {
            self.complete_tasks_step(&contact, &lead, steps).await?
        } else {
            Value::Null
        };
        // A changed responsible user is what the autodistribution cache needs (see `warm`).
        let contact_update = steps.get("contact_update").unwrap_or(Value::Null);
        let report = json!({
            "registered": true, "phone": phone, "contact": contact, "lead": lead,
            "contact_update": contact_update,
            "call": call_res, "task": task, "completed_tasks": completed,
        });
        if steps.get("post_registration").is_none() {
            // The documented input: {"call_full", "call_stage", "crm", "result"}.
            let input = crate::hooks::contract::post_registration_input(call, stage, NAME, &report);
            // The outcome is informational: nothing follows this hook.
            let _ = self.hooks.run("post_registration", input, &call.id).await;
            record(steps, "post_registration", json!({"done": true}))?;
        }
        tracing::info!(crm = NAME, call_id = %call.id, contact = %report["contact"]["id"], call_added = %report["call"]["added"], "call registered in Kommo");
        Ok(report)
    }

    async fn responsible_for(&self, raw_phone: &str) -> Result<Option<Responsible>, CrmError> {
        let phone = self.phone_for_kommo(raw_phone);
        let found = self.search_contacts(&phone).await?;
        for c in found {
            let Some(uid) = c.responsible_user_id else {
                continue;
            };
            if let Some(ext) = self.cfg.extension_of(uid) {
                return Ok(Some(Responsible {
                    extension: ext.to_string(),
                    // Asterisk's CallerID name holds 20 characters.
                    name: caller_id_name(&c.name),
                    entity: c.raw,
                }));
            }
        }
        Ok(None)
    }
}

impl Connector for KommoConnector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn wants(&self, stage: Stage) -> bool {
        stage == Stage::CallEnded
    }

    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        steps: &'a dyn JobSteps,
    ) -> BoxFuture<'a, Result<DeliveryReport, CrmError>> {
        Box::pin(async move {
            if job.stage != Stage::CallEnded {
                return Ok(json!({"registered": false, "reason": "stage not used by Kommo"}));
            }
            let r = self.register(job, steps).await;
            let call_id = job.call_full.id.as_str();
            match &r {
                Err(CrmError::Blocked { message }) => {
                    tracing::error!(crm = NAME, call_id, job = job.id, error = %message, "Kommo access blocked: jobs are kept until it is fixed")
                }
                Err(CrmError::Rejected { message }) => {
                    tracing::error!(crm = NAME, call_id, job = job.id, error = %message, "Kommo rejected the call: job goes to dead letters")
                }
                Err(CrmError::Retryable {
                    message,
                    retry_after,
                }) => {
                    tracing::warn!(crm = NAME, call_id, job = job.id, error = %message, ?retry_after, "Kommo delivery will be retried")
                }
                Ok(_) => {}
            }
            r
        })
    }

    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmError>> {
        Box::pin(self.responsible_for(phone))
    }

    fn responsible_from_report<'a>(
        &'a self,
        _job: &'a Job,
        report: &'a DeliveryReport,
    ) -> BoxFuture<'a, Option<LearnedResponsible>> {
        let learned = super::warm::responsible_from_report(&self.cfg, report);
        Box::pin(async move { learned })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn call(direction: Direction) -> CallFull {
        let mut extra = Map::new();
        extra.insert(
            "conversations".into(),
            json!({
                "1.1": {"user": "101", "channel": {"from": "101", "to": "79161234567", "trunk": "trunk"}},
                "1.2": {"user": "102", "channel": {"from": "101", "to": "79161234567"}},
            }),
        );
        CallFull {
            id: "1.0".into(),
            direction,
            client_phone: "79161234567".into(),
            line_number: "74951234567".into(),
            extra,
            ..Default::default()
        }
    }

    #[test]
    fn employees_in_ring_order() {
        let c = call(Direction::Inbound);
        assert_eq!(internal_numbers(&c), vec!["101", "102"]);
        let mut o = call(Direction::Outbound);
        o.answered_by = "101".into();
        assert_eq!(internal_numbers(&o), vec!["102", "101"]);
        assert_eq!(trunks(&c), vec!["74951234567", "trunk"]);
    }

    #[test]
    fn start_time_from_the_daemons_stamp_or_the_channels() {
        let mut c = call(Direction::Inbound);
        c.channel.start_time = "2026-11-21 23:47:41".into();
        // Unstamped (outside the daemon): the tracker's default offset, UTC.
        assert_eq!(started_at(&c), 1795304861);
        // The daemon's stamp carries `[calls] time_offset` (here +03:00).
        c.extra
            .insert("start_timestamp".into(), json!(1795304861 - 3 * 3600));
        assert_eq!(started_at(&c), 1795304861 - 3 * 3600);
        c.extra.insert("created_at".into(), json!(5));
        assert_eq!(started_at(&c), 5, "a customization's created_at wins");
    }

    #[test]
    fn itgrix_tags_become_embedded() {
        let p = tags_to_embedded(json!({"name": "x", "tags": ["a", "b"]}));
        assert_eq!(
            p,
            json!({"name": "x", "_embedded": {"tags": [{"name": "a"}, {"name": "b"}]}})
        );
    }

    #[test]
    fn statuses() {
        let mut c = call(Direction::Inbound);
        c.result = 486;
        assert_eq!(call_status(&c).0, 7);
        c.result = 480;
        assert_eq!(call_status(&c).0, 6);
        c.result = 200;
        c.answered_by = "101".into();
        assert_eq!(call_status(&c).0, 4);
    }

    #[test]
    fn matches_last_ten_digits_only() {
        let body = json!({"_embedded": {"contacts": [
            {"id": 1, "name": "A", "custom_fields_values": [{"field_code": "PHONE", "values": [{"value": "+7 916 123-45-67"}]}]},
            {"id": 2, "name": "B", "custom_fields_values": [{"field_code": "PHONE", "values": [{"value": "+7 916 123-45-670"}]}]},
        ]}});
        let m = matching_contacts(&body, "9161234567");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].id, 1);
    }
}
