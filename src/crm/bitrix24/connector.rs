//! The call flow: stage jobs → `telephony.externalcall.*` requests.
//!
//! | stage | what happens |
//! |---|---|
//! | `conversation_requested` | first ring at an employee: `register` (once per call); later rings: `show` |
//! | `conversation_accepted` | `show` to who answered (if not yet), `hide` for everyone else |
//! | `conversation_ended` | a ring that ended unanswered: `hide` for that employee |
//! | `call_ended` | `hide` the rest, `finish` (once), then `attachRecord`, then the optional responsible update, missed-call to-do and `post_registration` |
//!
//! Each `call_ended` step stores its result through [`JobSteps`], so a redelivered job
//! skips what is done; the per-call state (the Bitrix24 `CALL_ID`, open cards) lives in
//! a [`CallIdStore`] shared by the jobs of the call.
//!
//! The connector reads these parts of `call_full`: the top-level fields, and
//! `conversations.<conversation_id>.user` (the employee's internal number; falls back to
//! the conversation's `channel.to`/`channel.from`), `conversations.<id>.was_answered`,
//! `start_time`, and for click-to-call `crm_call_id` or `variables.CRM_CALL_ID`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::client::{Auth, Client, OAuth, RetryPolicy};
use super::error::BitrixError;
use super::events::{ClickToCall, PendingClickToCalls};
use super::lookup::{self, Found};
use super::store::{CallIdStore, CallRecord};
use super::users::{Directory, Employee, as_i64};
use super::{Bitrix24Config, LookupMethod, MissedResponsible, RecordMode, ShowMode};
use crate::calls::{CallFull, Direction, Stage};
use crate::crm::rate_limit::RateLimiter;
use crate::crm::{
    BoxFuture, Connector, CrmError, DeliveryReport, Job, JobSteps, LearnedResponsible, Responsible,
    TokenStore,
};
use crate::hooks::{Customize, HookOutcome};

/// Where recordings come from. The daemon implements it with the `records` module
/// (signed mp3 links, converted files); [`PathRecords`] is the plain default.
pub trait RecordSource: Send + Sync {
    /// A link Bitrix24 can download the call's recording from (for `RECORD_URL`).
    fn link<'a>(&'a self, call: &'a CallFull) -> BoxFuture<'a, Option<String>>;
    /// The recording file to upload (`.mp3` or `.wav`).
    fn file<'a>(&'a self, call: &'a CallFull) -> BoxFuture<'a, Option<PathBuf>>;
}

/// Recordings as the call snapshot names them: the link from `call_full.record_link`
/// (or `link`), the file from `call_full.record` (its `.mp3` sibling when one exists).
#[derive(Debug, Default, Clone, Copy)]
pub struct PathRecords;

impl RecordSource for PathRecords {
    fn link<'a>(&'a self, call: &'a CallFull) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let v = view(call);
            ["record_link", "link"]
                .iter()
                .filter_map(|k| field(&v, k))
                .find(|s| s.starts_with("http://") || s.starts_with("https://"))
                .map(str::to_string)
        })
    }
    fn file<'a>(&'a self, call: &'a CallFull) -> BoxFuture<'a, Option<PathBuf>> {
        Box::pin(async move {
            if call.record.is_empty() {
                return None;
            }
            let path = PathBuf::from(&call.record);
            let mp3 = path.with_extension("mp3");
            if tokio::fs::metadata(&mp3).await.is_ok() {
                return Some(mp3);
            }
            tokio::fs::metadata(&path).await.ok().map(|_| path)
        })
    }
}

/// What the connector is built from besides its config.
pub struct Deps {
    pub store: Arc<dyn CallIdStore>,
    pub hooks: Arc<dyn Customize>,
    pub records: Arc<dyn RecordSource>,
    /// Where OAuth tokens live (unused with a webhook).
    pub tokens: Arc<dyn TokenStore>,
}

/// A card change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CardOp {
    Show(i64),
    Hide(i64),
}

/// Debounced show/hide operations waiting to be sent, per call.
#[derive(Default)]
struct CardQueue {
    pending: std::sync::Mutex<Vec<(String, CardOp)>>,
    /// Held while a flush sends, so `call_ended` never overtakes queued cards.
    sending: Mutex<()>,
}

/// The Bitrix24 connector.
pub struct Bitrix24 {
    cfg: Bitrix24Config,
    client: Arc<Client>,
    users: Arc<Directory>,
    store: Arc<dyn CallIdStore>,
    hooks: Arc<dyn Customize>,
    records: Arc<dyn RecordSource>,
    pending_c2c: Arc<PendingClickToCalls>,
    cards: Arc<CardQueue>,
}

/// Scopes the connector needs.
pub const REQUIRED_SCOPES: [&str; 3] = ["telephony", "crm", "user"];

impl Bitrix24 {
    /// Build the connector. With `card_debounce > 0` a background task sends queued
    /// card operations, so this must run inside a tokio runtime.
    pub fn new(cfg: Bitrix24Config, deps: Deps) -> Result<Arc<Bitrix24>, BitrixError> {
        let auth = match (&cfg.webhook_url, &cfg.base_url) {
            (Some(w), _) if !w.trim().is_empty() => {
                let mut base = w.trim().to_string();
                if !base.ends_with('/') {
                    base.push('/');
                }
                Auth::Webhook { base }
            }
            (_, Some(b)) if !b.trim().is_empty() => {
                let (Some(id), Some(secret)) = (&cfg.client_id, &cfg.client_secret) else {
                    return Err(BitrixError::Config(
                        "base_url needs client_id and client_secret of the local application"
                            .into(),
                    ));
                };
                let base = b.trim().trim_end_matches('/');
                Auth::OAuth(OAuth {
                    rest_base: format!("{base}/rest/"),
                    token_url: cfg.oauth_url.clone(),
                    client_id: id.clone(),
                    client_secret: secret.clone(),
                    store: deps.tokens.clone(),
                    bootstrap_refresh_token: cfg.refresh_token.clone(),
                    refresh_lock: Mutex::new(()),
                })
            }
            _ => {
                return Err(BitrixError::Config(
                    "set [bitrix24] webhook_url (an incoming webhook with scopes telephony, crm, user) or base_url + client_id + client_secret".into(),
                ));
            }
        };
        let limiter = Arc::new(RateLimiter::new(cfg.rate_per_sec, cfg.burst));
        let retry = RetryPolicy {
            max_retries: cfg.max_retries,
            base: cfg.retry_backoff,
            max_backoff: Duration::from_secs(30).max(cfg.retry_backoff),
        };
        let client = Arc::new(Client::new(auth, limiter, retry, cfg.request_timeout)?);
        let users = Arc::new(Directory::new(client.clone(), cfg.users_refresh));
        let me = Arc::new(Bitrix24 {
            pending_c2c: Arc::new(PendingClickToCalls::new(Duration::from_secs(300))),
            cfg,
            client,
            users,
            store: deps.store,
            hooks: deps.hooks,
            records: deps.records,
            cards: Arc::new(CardQueue::default()),
        });
        if !me.cfg.card_debounce.is_zero() {
            let weak = Arc::downgrade(&me);
            let every = me.cfg.card_debounce;
            let rt = tokio::runtime::Handle::try_current().map_err(|_| {
                BitrixError::Config(
                    "the connector must be built inside the tokio runtime (card_debounce > 0 starts a task)"
                        .into(),
                )
            })?;
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(me) = weak.upgrade() else { return };
                    me.flush_cards().await;
                }
            });
        }
        Ok(me)
    }

    /// The REST client (for the event poller and admin tools).
    pub fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    /// The employee directory.
    pub fn directory(&self) -> Arc<Directory> {
        self.users.clone()
    }

    /// Click-to-call requests waiting for their PBX call (fed by [`super::events`]).
    pub fn pending_click_to_calls(&self) -> Arc<PendingClickToCalls> {
        self.pending_c2c.clone()
    }

    /// Wire click-to-call for the daemon: the router for online events
    /// (`POST /bitrix24/events`, to merge into the HTTP server) and, with
    /// `offline_events = true`, a task that binds `ONEXTERNALCALLSTART` as an offline
    /// event and polls `event.offline.get` until `stop`. Every accepted request arrives
    /// on `tx`; originate it with [`super::events::CRM_CALL_ID_VAR`] set to its
    /// `crm_call_id`.
    pub fn click_to_call(
        &self,
        tx: tokio::sync::mpsc::Sender<ClickToCall>,
        stop: tokio_util::sync::CancellationToken,
    ) -> (axum::Router, Option<tokio::task::JoinHandle<()>>) {
        let intake = super::events::ClickToCallIntake::with_closer(
            self.cfg.application_token.clone(),
            self.cfg.click_to_call_dedup,
            tx,
            self.pending_c2c.clone(),
            self.users.clone(),
            self.client.clone(),
        );
        let router = super::events::router(intake.clone());
        let poller = self.cfg.offline_events.then(|| {
            let client = self.client.clone();
            let every = self.cfg.offline_poll_interval;
            tokio::spawn(async move {
                super::events::bind_offline(&client).await;
                super::events::spawn_offline_poller(client, intake, every, stop)
                    .await
                    .ok();
            })
        });
        (router, poller)
    }

    /// Startup check: the webhook/application has the scopes telephony, crm and user,
    /// and the employee directory loads.
    pub async fn check_access(&self) -> Result<usize, BitrixError> {
        let scopes = self.client.call("scope", json!({})).await?;
        let have: Vec<String> = scopes
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let missing: Vec<&str> = REQUIRED_SCOPES
            .iter()
            .copied()
            .filter(|s| !have.iter().any(|h| h == s))
            .collect();
        if !missing.is_empty() {
            return Err(BitrixError::Config(format!(
                "the Bitrix24 webhook/application lacks the scope(s) {}: edit it in Bitrix24 (Developer resources → Other → Inbound webhook, or the local application's settings) and tick telephony, crm, user (has: {})",
                missing.join(", "),
                have.join(", ")
            )));
        }
        self.users.refresh().await
    }

    /// Send every queued card operation now.
    pub async fn flush_cards(&self) {
        let _g = self.cards.sending.lock().await;
        let ops: Vec<(String, CardOp)> = match self.cards.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        if ops.is_empty() {
            return;
        }
        let mut calls: Vec<String> = Vec::new();
        for (c, _) in &ops {
            if !calls.contains(c) {
                calls.push(c.clone());
            }
        }
        let mut cmds = Vec::new();
        let mut updates = Vec::new();
        for c in &calls {
            let Some(rec) = self.store.get(c) else {
                continue;
            };
            let mine: Vec<CardOp> = ops
                .iter()
                .filter(|(k, _)| k == c)
                .map(|(_, o)| *o)
                .collect();
            let (rec2, mut cc) = plan_cards(c, rec, &mine);
            cmds.append(&mut cc);
            updates.push((c.clone(), rec2));
        }
        if let Err(e) = self.send_card_cmds(&cmds).await {
            warn!(crm = "bitrix24", error = %e, "call cards not updated");
            if e.is_retryable() {
                // Back to the front of the queue: the next flush (or the call's end) retries.
                if let Ok(mut p) = self.cards.pending.lock() {
                    let later = std::mem::take(&mut *p);
                    *p = ops;
                    p.extend(later);
                }
            }
            return;
        }
        for (c, rec) in updates {
            if let Err(e) = self.store.put(&c, &rec) {
                warn!(crm = "bitrix24", call_id = %c, error = %e, "cannot save open call cards");
            }
        }
    }

    async fn send_card_cmds(&self, cmds: &[(String, String, Value)]) -> Result<(), BitrixError> {
        match cmds {
            [] => Ok(()),
            [(_, method, params)] => self.client.call(method, params.clone()).await.map(|_| ()),
            many => {
                let r = self.client.batch(many, false).await?;
                for (k, m, p) in many {
                    if let Some(e) = r.error_of(k, m, p) {
                        // A card that cannot be shown or hidden is not worth failing the call.
                        warn!(crm = "bitrix24", error = %e, "card operation refused");
                    }
                }
                Ok(())
            }
        }
    }

    /// Apply card operations for one call: queued when debouncing, else sent now.
    async fn cards(&self, our_id: &str, ops: Vec<CardOp>) -> Result<(), BitrixError> {
        if ops.is_empty() || self.cfg.show == ShowMode::Never {
            return Ok(());
        }
        if !self.cfg.card_debounce.is_zero() {
            if let Ok(mut p) = self.cards.pending.lock() {
                p.extend(ops.into_iter().map(|o| (our_id.to_string(), o)));
            }
            return Ok(());
        }
        self.apply_now(our_id, &ops).await
    }

    async fn apply_now(&self, our_id: &str, ops: &[CardOp]) -> Result<(), BitrixError> {
        let Some(rec) = self.store.get(our_id) else {
            return Ok(());
        };
        let (rec, cmds) = plan_cards(our_id, rec, ops);
        self.send_card_cmds(&cmds).await?;
        self.store.put(our_id, &rec).map_err(BitrixError::Config)
    }

    /// Take this call's queued operations and send them (before `finish`).
    async fn flush_call(&self, our_id: &str) -> Result<(), BitrixError> {
        let _g = self.cards.sending.lock().await;
        let mine: Vec<CardOp> = match self.cards.pending.lock() {
            Ok(mut p) => {
                let (mine, rest): (Vec<_>, Vec<_>) = p.drain(..).partition(|(c, _)| c == our_id);
                *p = rest;
                mine.into_iter().map(|(_, o)| o).collect()
            }
            Err(_) => Vec::new(),
        };
        if mine.is_empty() {
            return Ok(());
        }
        self.apply_now(our_id, &mine).await
    }

    async fn run_hook(&self, hook: &str, input: Value, call_id: &str) -> HookOutcome {
        self.hooks.run(hook, input, call_id).await
    }

    /// The client's phone as sent to Bitrix24 (after `process_client_phone`).
    async fn client_phone(&self, call: &CallFull, stage: Stage) -> String {
        let phone = call.client_phone.clone();
        match self
            .run_hook(
                "process_client_phone",
                json!({"phone": phone, "call_full": call, "call_stage": stage.as_str()}),
                &call.id,
            )
            .await
        {
            HookOutcome::Data(d) => d
                .get("phone")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(phone),
            _ => phone,
        }
    }

    /// The client's CRM entity, by the configured lookup.
    pub async fn lookup(&self, phone: &str) -> Result<Option<Found>, BitrixError> {
        match self.cfg.lookup {
            LookupMethod::Findbycomm => lookup::find(&self.client, phone).await,
            LookupMethod::SearchCrmEntities => {
                lookup::search_crm_entities(&self.client, phone).await
            }
        }
    }

    fn fallback_user(&self) -> Option<i64> {
        self.cfg.default_user_id.or(self.cfg.webhook_user_id())
    }

    /// The call's CRM call id when it was started from Bitrix24.
    fn click_to_call_for(&self, call: &CallFull, ext: Option<&str>) -> Option<ClickToCall> {
        let v = view(call);
        let var = field(&v, "crm_call_id").or_else(|| {
            v.get("variables")
                .and_then(|x| field(x, super::events::CRM_CALL_ID_VAR))
        });
        if let Some(id) = var {
            if let Some(c2c) = self.pending_c2c.take_by_call_id(id) {
                return Some(c2c);
            }
            // The variable is shared by every CRM's click-to-call: only a Bitrix24
            // CALL_ID (`externalCall.…`) is ours to finish; another CRM's request id
            // means a normal registration here.
            if id.starts_with("externalCall.") {
                return Some(ClickToCall {
                    crm_call_id: id.to_string(),
                    extension: ext.unwrap_or("").to_string(),
                    phone: call.client_phone.clone(),
                    ..ClickToCall::default()
                });
            }
            tracing::debug!(crm = "bitrix24", call_id = %call.id, request_id = id,
                "click-to-call of another CRM: registering the call normally");
        }
        if call.direction == Direction::Outbound
            && let Some(ext) = ext
        {
            return self.pending_c2c.take_match(ext, &call.client_phone);
        }
        None
    }

    /// The call's record, registering the call first if no earlier job did.
    /// `None`: registration was cancelled by a customization or impossible.
    async fn ensure_registered(
        &self,
        job: &Job,
        steps: &dyn JobSteps,
        emp: Option<&Employee>,
    ) -> Result<Option<CallRecord>, CrmError> {
        let call = &job.call_full;
        if let Some(rec) = self.store.get(&call.id) {
            return Ok(Some(rec));
        }
        if let Some(v) = steps.get("register") {
            if v.get("cancelled").is_some() {
                return Ok(None);
            }
            if let Ok(rec) = serde_json::from_value::<CallRecord>(v) {
                self.put(&call.id, &rec)?;
                return Ok(Some(rec));
            }
        }
        if let Some(c2c) = self.click_to_call_for(call, emp.map(|e| e.extension.as_str())) {
            let user = emp
                .map(|e| e.id)
                .or((c2c.user_id > 0).then_some(c2c.user_id))
                .or(self.fallback_user())
                .unwrap_or(0);
            // Bitrix24 registered this call itself and shows its card to the user who
            // clicked: adopt it, never register it again.
            let rec = CallRecord {
                call_id: c2c.crm_call_id.clone(),
                user_id: user,
                shown: if user > 0 { vec![user] } else { vec![] },
                rang: if user > 0 { vec![user] } else { vec![] },
                click_to_call: true,
                crm_entity_type: c2c.crm_entity_type.clone(),
                crm_entity_id: c2c.crm_entity_id,
                ..CallRecord::default()
            };
            info!(crm = "bitrix24", call_id = %call.id, crm_call_id = %rec.call_id, "click-to-call: using the CALL_ID from Bitrix24");
            self.record_step(
                steps,
                "register",
                &serde_json::to_value(&rec).unwrap_or_default(),
            )?;
            self.put(&call.id, &rec)?;
            return Ok(Some(rec));
        }
        let phone = self.client_phone(call, job.stage).await;
        let user_id = match emp {
            Some(e) => Some(e.id),
            None => self.missed_user(call, &phone, &CallRecord::default()).await,
        };
        let Some(user_id) = user_id else {
            warn!(crm = "bitrix24", call_id = %call.id, "no Bitrix24 user to register the call for: set [bitrix24] default_user_id");
            return Ok(None);
        };
        let show = match self.cfg.show {
            ShowMode::OnRing => emp.is_some() && job.stage == Stage::ConversationRequested,
            ShowMode::OnAnswer => emp.is_some() && job.stage == Stage::ConversationAccepted,
            ShowMode::Never => false,
        };
        let ty = match call.direction {
            Direction::Outbound => 1,
            _ if is_transfer_leg(call, job.conversation_id.as_deref()) => 3,
            _ => 2,
        };
        let mut params = json!({
            "USER_ID": user_id,
            "PHONE_NUMBER": phone,
            "TYPE": ty,
            "CALL_START_DATE": start_date(call),
            "CRM_CREATE": if self.cfg.crm_create { 1 } else { 0 },
            "SHOW": if show { 1 } else { 0 },
            "LINE_NUMBER": call.line_number,
            "EXTERNAL_CALL_ID": call.id,
        });
        if !self.cfg.crm_source.is_empty() {
            params["CRM_SOURCE"] = json!(self.cfg.crm_source);
        }
        match self
            .run_hook(
                "process_call_params",
                json!({"call_full": call, "call_stage": job.stage.as_str(), "method": "telephony.externalcall.register", "params": params}),
                &call.id,
            )
            .await
        {
            HookOutcome::Cancelled => {
                info!(crm = "bitrix24", call_id = %call.id, "registration cancelled by customization");
                self.record_step(steps, "register", &json!({"cancelled": true}))?;
                return Ok(None);
            }
            HookOutcome::Data(d) if d.is_object() => {
                params = d.get("params").filter(|p| p.is_object()).cloned().unwrap_or(d);
            }
            _ => {}
        }
        let res = match self
            .client
            .call("telephony.externalcall.register", params.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if !e.is_retryable() && self.cfg.notify_unregistered {
                    self.notify_unregistered(call, &phone, user_id, &e).await;
                }
                return Err(e.into_crm());
            }
        };
        let Some(crm_call_id) = res.get("CALL_ID").and_then(Value::as_str) else {
            return Err(CrmError::Rejected {
                message: format!(
                    "Bitrix24 telephony.externalcall.register answered without CALL_ID: {res}"
                ),
            });
        };
        let shown_user = params
            .get("USER_ID")
            .and_then(|v| as_i64(Some(v)))
            .unwrap_or(user_id);
        let rec = CallRecord {
            call_id: crm_call_id.to_string(),
            user_id: shown_user,
            shown: if show { vec![shown_user] } else { vec![] },
            rang: emp.map(|e| vec![e.id]).unwrap_or_default(),
            click_to_call: false,
            crm_entity_type: res
                .get("CRM_ENTITY_TYPE")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            crm_entity_id: as_i64(res.get("CRM_ENTITY_ID")).filter(|i| *i > 0),
            crm_created: as_i64(res.get("CRM_CREATED_LEAD")).is_some_and(|i| i > 0)
                || res
                    .get("CRM_CREATED_ENTITIES")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty()),
            finished: false,
        };
        info!(crm = "bitrix24", call_id = %call.id, crm_call_id = %rec.call_id, user_id = shown_user, "call registered");
        self.record_step(
            steps,
            "register",
            &serde_json::to_value(&rec).unwrap_or_default(),
        )?;
        self.put(&call.id, &rec)?;
        Ok(Some(rec))
    }

    async fn notify_unregistered(&self, call: &CallFull, phone: &str, user: i64, e: &BitrixError) {
        let to = self.cfg.notify_user_id.unwrap_or(user);
        let msg = format!(
            "kolokol could not register the {} call {} (number {phone}, line {}) in Bitrix24: {}",
            call.direction.as_str(),
            call.id,
            call.line_number,
            e
        );
        if let Err(e2) = self
            .client
            .call(
                "im.notify",
                json!({"USER_ID": to, "MESSAGE": msg, "TYPE": "SYSTEM"}),
            )
            .await
        {
            warn!(crm = "bitrix24", call_id = %call.id, error = %e2, "im.notify failed");
        }
    }

    /// The user a missed call goes to, by `missed_responsible`.
    async fn missed_user(&self, call: &CallFull, phone: &str, rec: &CallRecord) -> Option<i64> {
        let first = rec.rang.first().copied();
        let last = rec.rang.last().copied();
        let rule = match self.cfg.missed_responsible {
            MissedResponsible::FirstRang => first,
            MissedResponsible::LastRang => last,
            MissedResponsible::Fixed => self.cfg.default_user_id,
            MissedResponsible::Crm => {
                let found = match self.lookup(phone).await {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(crm = "bitrix24", call_id = %call.id, error = %e, "lookup for the missed call's responsible failed");
                        None
                    }
                };
                let mut out = None;
                if let Some(id) = found.and_then(|f| f.assigned_by_id) {
                    // Only someone who can take calls.
                    if matches!(self.users.by_id(id).await, Ok(Some(_))) {
                        out = Some(id);
                    }
                }
                out.or(first)
            }
        };
        rule.or(first)
            .or(if rec.user_id > 0 {
                Some(rec.user_id)
            } else {
                None
            })
            .or(self.fallback_user())
    }

    fn put(&self, our_id: &str, rec: &CallRecord) -> Result<(), CrmError> {
        self.store
            .put(our_id, rec)
            .map_err(|e| CrmError::Retryable {
                message: format!("cannot save Bitrix24 call state: {e}"),
                retry_after: None,
            })
    }

    fn record_step(&self, steps: &dyn JobSteps, step: &str, v: &Value) -> Result<(), CrmError> {
        steps.put(step, v).map_err(|e| CrmError::Retryable {
            message: format!("cannot save step {step}: {e}"),
            retry_after: None,
        })
    }

    async fn employee(&self, ext: Option<&str>) -> Result<Option<Employee>, CrmError> {
        let Some(ext) = ext.filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let e = self
            .users
            .by_extension(ext)
            .await
            .map_err(BitrixError::into_crm)?;
        if e.is_none() {
            info!(crm = "bitrix24", extension = %ext, "no Bitrix24 user has this internal number (UF_PHONE_INNER); its rings are not shown");
        }
        Ok(e)
    }

    async fn deliver_inner(&self, job: &Job, steps: &dyn JobSteps) -> Result<Value, CrmError> {
        let call = &job.call_full;
        if call.direction == Direction::Internal {
            return Ok(json!({"skipped": "internal call"}));
        }
        let conv_ext = job
            .conversation_id
            .as_deref()
            .and_then(|c| conversation_employee(call, c));
        match job.stage {
            Stage::ConversationRequested => {
                let Some(emp) = self.employee(conv_ext.as_deref()).await? else {
                    return Ok(
                        json!({"skipped": "no Bitrix24 user for this ring", "extension": conv_ext}),
                    );
                };
                let had = self.store.get(&call.id).is_some() || steps.get("register").is_some();
                let Some(mut rec) = self.ensure_registered(job, steps, Some(&emp)).await? else {
                    return Ok(json!({"cancelled": true}));
                };
                if !rec.rang.contains(&emp.id) {
                    rec.rang.push(emp.id);
                    self.put(&call.id, &rec)?;
                }
                if had && self.cfg.show == ShowMode::OnRing && !rec.finished {
                    self.cards(&call.id, vec![CardOp::Show(emp.id)])
                        .await
                        .map_err(BitrixError::into_crm)?;
                }
                Ok(json!({"call_id": rec.call_id, "user_id": emp.id, "registered": !had}))
            }
            Stage::ConversationAccepted => {
                let ext = conv_ext.or_else(|| Some(call.answered_by.clone()));
                let Some(emp) = self.employee(ext.as_deref()).await? else {
                    return Ok(json!({"skipped": "no Bitrix24 user answered"}));
                };
                let had = self.store.get(&call.id).is_some() || steps.get("register").is_some();
                let Some(mut rec) = self.ensure_registered(job, steps, Some(&emp)).await? else {
                    return Ok(json!({"cancelled": true}));
                };
                if !rec.rang.contains(&emp.id) {
                    rec.rang.push(emp.id);
                    self.put(&call.id, &rec)?;
                }
                if rec.finished {
                    return Ok(json!({"call_id": rec.call_id}));
                }
                let mut ops = Vec::new();
                if had || self.cfg.show == ShowMode::OnRing {
                    ops.push(CardOp::Show(emp.id));
                }
                let mut others: Vec<i64> = rec.rang.clone();
                others.extend(rec.shown.iter().copied());
                others.sort_unstable();
                others.dedup();
                ops.extend(
                    others
                        .into_iter()
                        .filter(|u| *u != emp.id)
                        .map(CardOp::Hide),
                );
                self.cards(&call.id, ops)
                    .await
                    .map_err(BitrixError::into_crm)?;
                Ok(json!({"call_id": rec.call_id, "answered_by": emp.id}))
            }
            Stage::ConversationEnded => {
                let Some(conv) = job.conversation_id.as_deref() else {
                    return Ok(json!({"skipped": "no conversation"}));
                };
                let Some(rec) = self.store.get(&call.id) else {
                    return Ok(json!({"skipped": "call not registered"}));
                };
                let Some(emp) = self.employee(conv_ext.as_deref()).await? else {
                    return Ok(json!({"skipped": "no Bitrix24 user"}));
                };
                let answered =
                    conversation_answered(call, conv).unwrap_or(call.answered_by == emp.extension);
                if !answered && !rec.finished {
                    self.cards(&call.id, vec![CardOp::Hide(emp.id)])
                        .await
                        .map_err(BitrixError::into_crm)?;
                }
                Ok(json!({"call_id": rec.call_id}))
            }
            Stage::CallEnded => self.call_ended(job, steps).await,
        }
    }

    async fn call_ended(&self, job: &Job, steps: &dyn JobSteps) -> Result<Value, CrmError> {
        let call = &job.call_full;
        if let Some(done) = steps.get("done") {
            return Ok(done);
        }
        let answered = !call.answered_by.is_empty();
        let answerer = if answered {
            self.employee(Some(&call.answered_by)).await?
        } else {
            None
        };
        // A call that never rang at a mapped employee (abandoned in a queue, IVR) is
        // still registered here, so that the missed call exists in the CRM.
        let first_emp = match &answerer {
            Some(a) => Some(a.clone()),
            None => {
                let mut found = None;
                for ext in all_employees(call) {
                    if let Some(e) = self.employee(Some(&ext)).await? {
                        found = Some(e);
                        break;
                    }
                }
                found
            }
        };
        let mut rec = match steps
            .get("call")
            .and_then(|v| serde_json::from_value::<CallRecord>(v).ok())
        {
            Some(rec) => rec,
            None => {
                let Some(rec) = self
                    .ensure_registered(job, steps, first_emp.as_ref())
                    .await?
                else {
                    return Ok(json!({"cancelled": true}));
                };
                // Kept with the job: the shared record is dropped once the call is done.
                self.record_step(
                    steps,
                    "call",
                    &serde_json::to_value(&rec).unwrap_or_default(),
                )?;
                rec
            }
        };
        self.flush_call(&call.id)
            .await
            .map_err(BitrixError::into_crm)?;
        if let Some(fresh) = self.store.get(&call.id) {
            rec = fresh;
        }
        let phone = call.client_phone.clone();

        let finisher = match (&answerer, steps.get("finish_user").and_then(|v| v.as_i64())) {
            (_, Some(u)) => u,
            (Some(a), None) => a.id,
            // Registered by this job for nobody in particular: that user was already
            // chosen by the same rule (and a second lookup would cost two requests).
            (None, None)
                if rec.rang.is_empty() && rec.user_id > 0 && steps.get("register").is_some() =>
            {
                rec.user_id
            }
            (None, None) => self
                .missed_user(call, &phone, &rec)
                .await
                .unwrap_or(rec.user_id),
        };
        self.record_step(steps, "finish_user", &json!(finisher))?;

        // Hide every other open card before finish: cards cannot be hidden after it.
        if steps.get("hide").is_none() {
            let others: Vec<i64> = rec
                .shown
                .iter()
                .copied()
                .filter(|u| *u != finisher)
                .collect();
            if !others.is_empty() && self.cfg.show != ShowMode::Never {
                let ops: Vec<CardOp> = others.into_iter().map(CardOp::Hide).collect();
                self.apply_now(&call.id, &ops)
                    .await
                    .map_err(BitrixError::into_crm)?;
            }
            self.record_step(steps, "hide", &json!(true))?;
        }

        let status = status_code(call, &self.cfg);
        let finish = match steps.get("finish") {
            Some(v) => v,
            None => {
                let mut params = json!({
                    "CALL_ID": rec.call_id,
                    "USER_ID": finisher,
                    "DURATION": if answered { call.talk_duration } else { 0 },
                    "STATUS_CODE": status,
                    "ADD_TO_CHAT": if self.cfg.add_to_chat { 1 } else { 0 },
                });
                match self
                    .run_hook(
                        "process_call_params",
                        json!({"call_full": call, "call_stage": "call_ended", "method": "telephony.externalcall.finish", "params": params}),
                        &call.id,
                    )
                    .await
                {
                    HookOutcome::Cancelled => {
                        info!(crm = "bitrix24", call_id = %call.id, "finish cancelled by customization");
                        self.record_step(steps, "finish", &json!({"cancelled": true}))?;
                        self.store.remove(&call.id);
                        return Ok(json!({"call_id": rec.call_id, "finish": "cancelled"}));
                    }
                    HookOutcome::Data(d) if d.is_object() => {
                        params = d.get("params").filter(|p| p.is_object()).cloned().unwrap_or(d);
                        params["CALL_ID"] = json!(rec.call_id);
                    }
                    _ => {}
                }
                let repeated = steps.get("finish_sent").is_some();
                self.record_step(steps, "finish_sent", &json!(true))?;
                let res = match self
                    .client
                    .call("telephony.externalcall.finish", params)
                    .await
                {
                    Ok(r) => r,
                    Err(e)
                        if rec.finished || (repeated && e.description().contains("not found")) =>
                    {
                        // Finished by an earlier attempt whose answer was lost.
                        warn!(crm = "bitrix24", call_id = %call.id, error = %e, "finish repeated; treating the call as finished");
                        json!({"CALL_ID": rec.call_id, "repeated": true})
                    }
                    Err(e) => return Err(e.into_crm()),
                };
                rec.finished = true;
                if rec.crm_entity_id.is_none() {
                    rec.crm_entity_type = res
                        .get("CRM_ENTITY_TYPE")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string);
                    rec.crm_entity_id = as_i64(res.get("CRM_ENTITY_ID")).filter(|i| *i > 0);
                }
                self.put(&call.id, &rec)?;
                self.record_step(steps, "finish", &res)?;
                info!(crm = "bitrix24", call_id = %call.id, crm_call_id = %rec.call_id, user_id = finisher, status = %status, "call finished");
                res
            }
        };
        if finish.get("cancelled").is_some() {
            return Ok(json!({"call_id": rec.call_id, "finish": "cancelled"}));
        }
        rec.finished = true;

        let record = match steps.get("record") {
            Some(v) => v,
            None => {
                let v = self.attach_record(call, &rec.call_id).await?;
                self.record_step(steps, "record", &v)?;
                v
            }
        };

        let entity = rec.crm_entity_type.clone().zip(rec.crm_entity_id);
        if self.cfg.set_responsible_on_answer
            && answered
            && !rec.crm_created
            && steps.get("responsible").is_none()
        {
            let v = match &entity {
                Some((ty, id)) => self.set_responsible(call, ty, *id, finisher).await?,
                None => json!({"skipped": "no CRM entity"}),
            };
            self.record_step(steps, "responsible", &v)?;
        }

        if self.cfg.todo_on_missed
            && !answered
            && call.direction == Direction::Inbound
            && steps.get("todo").is_none()
        {
            let v = match &entity {
                Some((ty, id)) => self.todo(call, ty, *id, finisher).await?,
                None => json!({"skipped": "no CRM entity"}),
            };
            self.record_step(steps, "todo", &v)?;
        }

        let report = json!({
            "call_id": rec.call_id,
            "user_id": finisher,
            "status_code": status,
            "record": record,
            "crm_entity_type": rec.crm_entity_type,
            "crm_entity_id": rec.crm_entity_id,
            "finish": finish,
        });
        if steps.get("post_registration").is_none() {
            // The documented input: {"call_full", "call_stage", "crm", "result"}.
            let input = crate::hooks::contract::post_registration_input(
                call,
                Stage::CallEnded,
                "bitrix24",
                &report,
            );
            let _ = self.run_hook("post_registration", input, &call.id).await;
            self.record_step(steps, "post_registration", &json!(true))?;
        }
        self.record_step(steps, "done", &report)?;
        self.store.remove(&call.id);
        Ok(report)
    }

    async fn attach_record(&self, call: &CallFull, crm_call_id: &str) -> Result<Value, CrmError> {
        if call.answered_by.is_empty()
            || call.record.is_empty() && field(&view(call), "record_link").is_none()
        {
            return Ok(json!({"skipped": "no recording"}));
        }
        let params = match self.cfg.record {
            RecordMode::None => return Ok(json!({"skipped": "record = none"})),
            RecordMode::Link => match self.records.link(call).await {
                Some(url) => json!({"CALL_ID": crm_call_id, "RECORD_URL": url}),
                None => return Ok(json!({"skipped": "no recording link"})),
            },
            RecordMode::Upload => {
                let Some(path) = self.records.file(call).await else {
                    return Ok(json!({"skipped": "recording file not found"}));
                };
                let meta = tokio::fs::metadata(&path)
                    .await
                    .map_err(|e| CrmError::Retryable {
                        message: format!("recording {}: {e}", path.display()),
                        retry_after: None,
                    })?;
                if meta.len() > self.cfg.record_max_bytes {
                    warn!(crm = "bitrix24", call_id = %call.id, bytes = meta.len(), "recording too large to upload; raise [bitrix24] record_max_bytes or use record = \"link\"");
                    return Ok(json!({"skipped": "recording too large"}));
                }
                let bytes = tokio::fs::read(&path)
                    .await
                    .map_err(|e| CrmError::Retryable {
                        message: format!("recording {}: {e}", path.display()),
                        retry_after: None,
                    })?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "record.mp3".into());
                let content = tokio::task::spawn_blocking(move || {
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                })
                .await
                .map_err(|e| CrmError::Retryable {
                    message: format!("base64 task: {e}"),
                    retry_after: None,
                })?;
                json!({"CALL_ID": crm_call_id, "FILENAME": name, "FILE_CONTENT": content})
            }
        };
        let r = self
            .client
            .call("telephony.externalCall.attachRecord", params)
            .await
            .map_err(|e| {
                if e.description().contains("not finished") {
                    CrmError::Retryable {
                        message: e.to_string(),
                        retry_after: Some(Duration::from_secs(5)),
                    }
                } else {
                    e.into_crm()
                }
            })?;
        Ok(json!({"attached": true, "result": r}))
    }

    async fn set_responsible(
        &self,
        call: &CallFull,
        ty: &str,
        id: i64,
        user: i64,
    ) -> Result<Value, CrmError> {
        let (method, hook) = match ty {
            "LEAD" => ("crm.lead.update", Some("process_lead_update_params")),
            "CONTACT" => ("crm.contact.update", Some("process_contact_update_params")),
            "COMPANY" => ("crm.company.update", None),
            _ => return Ok(json!({"skipped": format!("entity type {ty}")})),
        };
        let mut params = json!({"id": id, "fields": {"ASSIGNED_BY_ID": user}});
        if let Some(h) = hook {
            match self
                .run_hook(h, json!({"call_full": call, "params": params}), &call.id)
                .await
            {
                HookOutcome::Cancelled => return Ok(json!({"cancelled": true})),
                HookOutcome::Data(d) if d.is_object() => {
                    params = d
                        .get("params")
                        .filter(|p| p.is_object())
                        .cloned()
                        .unwrap_or(d);
                }
                _ => {}
            }
        }
        let r = self
            .client
            .call(method, params)
            .await
            .map_err(BitrixError::into_crm)?;
        Ok(json!({"updated": r}))
    }

    async fn todo(&self, call: &CallFull, ty: &str, id: i64, user: i64) -> Result<Value, CrmError> {
        let owner = Found {
            entity_type: ty.to_string(),
            id,
            assigned_by_id: None,
            name: String::new(),
        };
        let deadline = chrono::Local::now()
            + chrono::Duration::from_std(self.cfg.todo_deadline)
                .unwrap_or(chrono::Duration::hours(1));
        let mut params = json!({
            "ownerTypeId": owner.owner_type_id(),
            "ownerId": id,
            "deadline": deadline.format("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            "title": format!("Missed call from {}", call.client_phone),
            "description": format!("Call back {} (missed call to line {})", call.client_phone, call.line_number),
            "responsibleId": user,
        });
        match self
            .run_hook(
                "process_task_creation_params",
                json!({"call_full": call, "params": params}),
                &call.id,
            )
            .await
        {
            HookOutcome::Cancelled => return Ok(json!({"cancelled": true})),
            HookOutcome::Data(d) if d.is_object() => {
                params = d
                    .get("params")
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or(d);
            }
            _ => {}
        }
        let r = self
            .client
            .call("crm.activity.todo.add", params)
            .await
            .map_err(BitrixError::into_crm)?;
        Ok(json!({"created": r}))
    }
}

impl Connector for Bitrix24 {
    fn name(&self) -> &'static str {
        "bitrix24"
    }

    fn wants(&self, stage: Stage) -> bool {
        match stage {
            Stage::CallEnded | Stage::ConversationRequested | Stage::ConversationAccepted => true,
            // Only used to hide cards of rings that stopped.
            Stage::ConversationEnded => self.cfg.show == ShowMode::OnRing,
        }
    }

    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        steps: &'a dyn JobSteps,
    ) -> BoxFuture<'a, Result<DeliveryReport, CrmError>> {
        Box::pin(async move {
            let r = self.deliver_inner(job, steps).await;
            if let Err(e) = &r {
                warn!(crm = "bitrix24", call_id = %job.call_full.id, stage = job.stage.as_str(), error = %e, "delivery failed");
            }
            r
        })
    }

    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmError>> {
        Box::pin(async move {
            let Some(found) = self.lookup(phone).await.map_err(BitrixError::into_crm)? else {
                return Ok(None);
            };
            let Some(uid) = found.assigned_by_id else {
                return Ok(None);
            };
            let Some(emp) = self.users.by_id(uid).await.map_err(BitrixError::into_crm)? else {
                // The responsible has no internal number: nothing to route to.
                return Ok(None);
            };
            Ok(Some(Responsible {
                extension: emp.extension,
                name: if found.name.is_empty() {
                    emp.name
                } else {
                    found.name.clone()
                },
                entity: json!({"type": found.entity_type, "id": found.id, "assigned_by_id": uid}),
            }))
        })
    }

    fn responsible_from_report<'a>(
        &'a self,
        job: &'a Job,
        report: &'a DeliveryReport,
    ) -> BoxFuture<'a, Option<LearnedResponsible>> {
        Box::pin(super::warm::responsible_from_report(self, job, report))
    }
}

/// Turn card operations into requests against the record's open cards: a `show` for a
/// card already open and a `hide` for one already closed are dropped, and a show
/// followed by a hide within one flush cancel out (the debounce).
fn plan_cards(
    _our_id: &str,
    mut rec: CallRecord,
    ops: &[CardOp],
) -> (CallRecord, Vec<(String, String, Value)>) {
    let mut shows: Vec<i64> = Vec::new();
    let mut hides: Vec<i64> = Vec::new();
    if rec.finished {
        return (rec, Vec::new());
    }
    for op in ops {
        match *op {
            CardOp::Show(u) => {
                if !rec.shown.contains(&u) {
                    rec.shown.push(u);
                    if let Some(i) = hides.iter().position(|h| *h == u) {
                        hides.remove(i);
                    } else {
                        shows.push(u);
                    }
                }
            }
            CardOp::Hide(u) => {
                if let Some(i) = rec.shown.iter().position(|s| *s == u) {
                    rec.shown.remove(i);
                    if let Some(j) = shows.iter().position(|s| *s == u) {
                        shows.remove(j);
                    } else {
                        hides.push(u);
                    }
                }
            }
        }
    }
    let mut cmds = Vec::new();
    let key = rec.call_id.replace('.', "_");
    if !hides.is_empty() {
        cmds.push((
            format!("hide_{key}"),
            "telephony.externalcall.hide".to_string(),
            json!({"CALL_ID": rec.call_id, "USER_ID": hides}),
        ));
    }
    if !shows.is_empty() {
        cmds.push((
            format!("show_{key}"),
            "telephony.externalcall.show".to_string(),
            json!({"CALL_ID": rec.call_id, "USER_ID": shows}),
        ));
    }
    (rec, cmds)
}

/// The snapshot as JSON: the connector reads `call_full` by its documented JSON field
/// names, so it works the same whether a field is typed in [`CallFull`] or carried in
/// its `extra` map (fields in `extra` win, as they do in the serialized form).
pub fn view(call: &CallFull) -> Value {
    serde_json::to_value(call).unwrap_or(Value::Null)
}

/// A number that may be a string, a number, or an object with a `number` field
/// (`Party`/`User` objects of `call_full`).
fn number_of(v: &Value) -> Option<String> {
    let n = match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(o) => ["number", "internal_number", "extension"]
            .iter()
            .find_map(|k| o.get(*k).and_then(number_of)),
        _ => None,
    };
    n.filter(|s| !s.is_empty())
}

/// The employee (internal number) a conversation rings at: its `user`, else its
/// channel's `to` (inbound) or `from` (outbound).
pub fn conversation_employee(call: &CallFull, conversation_id: &str) -> Option<String> {
    employee_in(&view(call), call.direction, conversation_id)
}

fn employee_in(v: &Value, direction: Direction, conversation_id: &str) -> Option<String> {
    let conv = v.get("conversations")?.get(conversation_id)?;
    if let Some(e) = conv.get("user").and_then(number_of) {
        return Some(e);
    }
    let key = if direction == Direction::Outbound {
        "from"
    } else {
        "to"
    };
    conv.get("channel")?.get(key).and_then(number_of)
}

fn conversation_answered(call: &CallFull, conversation_id: &str) -> Option<bool> {
    let v = view(call);
    let conv = v.get("conversations")?.get(conversation_id)?;
    let flag = conv
        .get("was_answered")
        .or_else(|| conv.get("channel").and_then(|c| c.get("was_answered")))
        .and_then(Value::as_bool);
    let by_result = conv.get("result").and_then(Value::as_u64).map(|r| r == 200);
    let by_status = conv
        .get("dial_status")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| s == "ANSWER");
    match (flag, by_result, by_status) {
        (Some(true), _, _) | (_, Some(true), _) | (_, _, Some(true)) => Some(true),
        (None, None, None) => None,
        _ => Some(false),
    }
}

/// Every employee of the call, in order: for outbound calls the one who dialled
/// (`employee`, `user`, else the main channel's `from`), then each conversation's.
fn all_employees(call: &CallFull) -> Vec<String> {
    let v = view(call);
    let mut out = Vec::new();
    if call.direction == Direction::Outbound {
        let dialler = ["employee", "user"]
            .iter()
            .find_map(|k| v.get(*k).and_then(number_of))
            .or_else(|| {
                v.get("channel")
                    .and_then(|c| c.get("from"))
                    .and_then(number_of)
            });
        if let Some(d) = dialler {
            out.push(d);
        }
    }
    if let Some(Value::Object(convs)) = v.get("conversations") {
        for id in convs.keys() {
            if let Some(e) = employee_in(&v, call.direction, id)
                && !out.contains(&e)
            {
                out.push(e);
            }
        }
    }
    out
}

fn is_transfer_leg(call: &CallFull, conversation_id: Option<&str>) -> bool {
    let v = view(call);
    let Some(conv) = conversation_id.and_then(|c| v.get("conversations")?.get(c)) else {
        return false;
    };
    conv.get("via").and_then(Value::as_str) == Some("transfer")
        || conv.get("is_transfer").and_then(Value::as_bool) == Some(true)
        || conv
            .get("transferred_from")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
}

/// A string field of the snapshot (top level).
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// `CALL_START_DATE`: when the call started ([`CallFull::started_at`]: the daemon's
/// `start_timestamp`, else the channels' times read as UTC, the tracker's default) in
/// ISO-8601; now when unknown.
fn start_date(call: &CallFull) -> String {
    use chrono::Offset;
    call.started_at(chrono::Utc.fix())
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .unwrap_or_else(chrono::Utc::now)
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// `STATUS_CODE` for the call's result. An answered call is always 200, whatever the
/// result of a losing leg; overrides from `[bitrix24.status_map]` win.
pub fn status_code(call: &CallFull, cfg: &Bitrix24Config) -> String {
    let dir = call.direction.as_str();
    if !call.answered_by.is_empty() {
        return "200".into();
    }
    let r = call.result;
    for key in [format!("{dir}:{r}"), r.to_string()] {
        if let Some(v) = cfg.status_map.get(&key) {
            return v.clone();
        }
    }
    match (call.direction, r) {
        (_, 200) if call.talk_duration > 0 => "200",
        (_, 486) => "486",
        (_, 404) => "404",
        (_, 484) => "484",
        (_, 503) => "503",
        (_, 403) => "403",
        (_, 603) => "603",
        (_, 402) => "402",
        (_, 423) => "423",
        // The employee gave up dialling out: cancelled. A client who hangs up while
        // ringing, or nobody answering, is a missed call.
        (Direction::Outbound, 487) => "603-S",
        (Direction::Outbound, 480) => "480",
        _ => "304",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(direction: Direction, answered_by: &str, result: u16) -> CallFull {
        CallFull {
            id: "1.0".into(),
            direction,
            answered_by: answered_by.into(),
            result,
            ..CallFull::default()
        }
    }

    #[test]
    fn status_codes() {
        let cfg = Bitrix24Config::default();
        let code = |d, a: &str, r| status_code(&ended(d, a, r), &cfg);
        assert_eq!(
            code(Direction::Inbound, "101", 487),
            "200",
            "answered wins over a losing leg"
        );
        assert_eq!(code(Direction::Inbound, "", 480), "304");
        assert_eq!(code(Direction::Inbound, "", 487), "304");
        assert_eq!(code(Direction::Inbound, "", 486), "486");
        assert_eq!(code(Direction::Outbound, "", 487), "603-S");
        assert_eq!(code(Direction::Outbound, "", 480), "480");
        assert_eq!(code(Direction::Outbound, "", 404), "404");
        let mut cfg = Bitrix24Config::default();
        cfg.status_map.insert("inbound:487".into(), "603-S".into());
        cfg.status_map.insert("480".into(), "OTHER".into());
        assert_eq!(
            status_code(&ended(Direction::Inbound, "", 487), &cfg),
            "603-S"
        );
        assert_eq!(
            status_code(&ended(Direction::Outbound, "", 480), &cfg),
            "OTHER"
        );
    }

    #[test]
    fn card_plan_drops_repeats_and_cancels_pairs() {
        let rec = CallRecord {
            call_id: "externalCall.x".into(),
            shown: vec![11],
            ..CallRecord::default()
        };
        use CardOp::*;
        let (rec2, cmds) = plan_cards(
            "c",
            rec.clone(),
            &[Show(11), Show(12), Show(13), Hide(13), Hide(11), Hide(14)],
        );
        assert_eq!(rec2.shown, vec![12]);
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].1, "telephony.externalcall.hide");
        assert_eq!(cmds[0].2["USER_ID"], json!([11]));
        assert_eq!(cmds[1].2["USER_ID"], json!([12]));
        let finished = CallRecord {
            finished: true,
            ..rec
        };
        assert!(
            plan_cards("c", finished, &[Hide(11)]).1.is_empty(),
            "no card calls after finish"
        );
    }

    #[test]
    fn conversation_employee_reads_user_or_channel() {
        let mut c = ended(Direction::Inbound, "", 0);
        c.extra.insert(
            "conversations".into(),
            json!({"a": {"user": "101"}, "b": {"user": {"number": "102"}}, "c": {"channel": {"from": "79161234567", "to": "103"}}}),
        );
        assert_eq!(conversation_employee(&c, "a").as_deref(), Some("101"));
        assert_eq!(conversation_employee(&c, "b").as_deref(), Some("102"));
        assert_eq!(conversation_employee(&c, "c").as_deref(), Some("103"));
        assert_eq!(conversation_employee(&c, "zz"), None);
        assert_eq!(all_employees(&c), vec!["101", "102", "103"]);
    }

    #[test]
    fn reads_the_trackers_typed_shapes() {
        // Party/User objects, per-conversation result and dial status, unset times.
        let mut c = ended(Direction::Outbound, "", 0);
        c.extra.insert(
            "conversations".into(),
            json!({
                "9.1": {"user": {"number": "101", "name": "Alice"}, "result": 200, "dial_status": "ANSWER",
                         "channel": {"was_answered": true}, "via": "transfer"},
                "9.2": {"user": null, "result": 487, "dial_status": "CANCEL",
                         "channel": {"from": {"number": "102", "name": ""}, "to": {"number": "79161234567", "name": ""}, "was_answered": false}},
            }),
        );
        c.extra.insert("channel".into(), json!({"from": {"number": "103", "name": "Carol"}, "start_time": "0001-01-01 00:00:00"}));
        c.extra.insert(
            "variables".into(),
            json!({"CRM_CALL_ID": "externalCall.x.1"}),
        );
        assert_eq!(conversation_employee(&c, "9.1").as_deref(), Some("101"));
        assert_eq!(conversation_employee(&c, "9.2").as_deref(), Some("102"));
        assert_eq!(conversation_answered(&c, "9.1"), Some(true));
        assert_eq!(conversation_answered(&c, "9.2"), Some(false));
        assert_eq!(all_employees(&c), vec!["103", "101", "102"]);
        assert!(is_transfer_leg(&c, Some("9.1")));
        assert!(!is_transfer_leg(&c, Some("9.2")));
        assert!(!start_date(&c).starts_with("0001"), "unset time → now");
        let mut timed = c.clone();
        timed.channel.start_time = "2026-11-21 23:47:41".into();
        assert_eq!(start_date(&timed), "2026-11-21T23:47:41+00:00");
        // The daemon's stamp (here from times written at +03:00) is the instant.
        timed
            .extra
            .insert("start_timestamp".into(), json!(1795304861 - 3 * 3600));
        assert_eq!(start_date(&timed), "2026-11-21T20:47:41+00:00");
        let v = view(&c);
        assert_eq!(
            v["variables"]
                .get(super::super::events::CRM_CALL_ID_VAR)
                .and_then(Value::as_str),
            Some("externalCall.x.1")
        );
    }
}
