//! Autodistribution: route an inbound caller to their responsible manager.
//!
//! Order of work for one call: the TTL cache (positive and negative answers), else one
//! CRM lookup per number at a time (concurrent calls from the same number share it), then
//! the `autodistribution` customization, all inside [`AgiConfig::deadline`]. A lookup
//! that misses the deadline keeps running in the background (up to `lookup_timeout`) so
//! that its answer is cached for the next call; this call falls through to the dialplan.
//!
//! [`AgiConfig::deadline`]: super::AgiConfig::deadline

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::Shared;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::AgiConfig;
use super::protocol::{AgiError, Reply, known};
use super::server::{AgiHandler, AgiSession};
use crate::crm::{BoxFuture, Connector, DeliveryReport, Job, LearnedResponsible, Responsible};
use crate::hooks::{Customize, HookOutcome};
use crate::phone;

/// The customization run before answering.
pub const HOOK: &str = "autodistribution";

/// Why a lookup gave no answer (as opposed to "nobody is responsible").
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("{crm}: {message}")]
    Crm { crm: String, message: String },
    #[error("CRM lookup took longer than {0:?}")]
    Timeout(Duration),
}

/// A lookup's answer with the rank (lookup order) of the source that gave it, if known.
pub type RankedAnswer = Option<(Responsible, Option<usize>)>;

/// Finds who is responsible for a client phone. The daemon uses [`CrmLookup`]; tests
/// plug in their own.
pub trait ResponsibleLookup: Send + Sync {
    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, LookupError>>;

    /// Like `find_responsible`, also saying which source answered: its rank in the
    /// lookup order (0 = asked first). The cache keeps it so that an answer learned
    /// from a registration never overrides a source the lookup asks first. Default:
    /// unknown (`None`).
    fn find_responsible_ranked<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<RankedAnswer, LookupError>> {
        Box::pin(async move { Ok(self.find_responsible(phone).await?.map(|r| (r, None))) })
    }
}

/// Asks each enabled CRM in order; the first that knows the client wins.
pub struct CrmLookup {
    connectors: Vec<Arc<dyn Connector>>,
}

impl CrmLookup {
    pub fn new(connectors: Vec<Arc<dyn Connector>>) -> CrmLookup {
        CrmLookup { connectors }
    }

    /// The connectors' names in lookup order (for [`CacheWarmer::new`]).
    pub fn order(&self) -> Vec<&'static str> {
        self.connectors.iter().map(|c| c.name()).collect()
    }
}

impl ResponsibleLookup for CrmLookup {
    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, LookupError>> {
        Box::pin(async move { Ok(self.find_responsible_ranked(phone).await?.map(|(r, _)| r)) })
    }

    fn find_responsible_ranked<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<RankedAnswer, LookupError>> {
        Box::pin(async move {
            let mut first_error = None;
            for (rank, c) in self.connectors.iter().enumerate() {
                match c.find_responsible(phone).await {
                    Ok(Some(r)) => return Ok(Some((r, Some(rank)))),
                    Ok(None) => {}
                    Err(e) => {
                        warn!(crm = c.name(), error = %e, "responsible lookup failed");
                        first_error.get_or_insert(LookupError::Crm {
                            crm: c.name().to_string(),
                            message: e.to_string(),
                        });
                    }
                }
            }
            // "Not found" is only trusted (and negatively cached) when every CRM answered.
            match first_error {
                Some(e) => Err(e),
                None => Ok(None),
            }
        })
    }
}

#[derive(Debug, Clone)]
struct CacheEntry {
    value: Option<Arc<Responsible>>,
    /// Rank (lookup order) of the CRM that gave a positive answer, when known.
    source: Option<usize>,
    /// When a registration stored or confirmed this entry: a lookup that started
    /// before may carry the older answer and must not overwrite it.
    learned_at: Option<Instant>,
    expires: Instant,
}

/// What [`ResponsibleCache::learn`] did with an answer learned from a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmed {
    /// Stored: the next call from this number is answered from memory.
    Stored,
    /// A cached answer from this CRM was stale and is dropped (the next call looks up).
    Forgotten,
    /// Left alone: a CRM the lookup asks first answers for this number (or might: its
    /// answer is not cached), or there was nothing to drop.
    Kept,
}

/// Answers by phone (last 10 digits), found or not, each with its own TTL.
#[derive(Debug)]
pub struct ResponsibleCache {
    entries: Mutex<HashMap<String, CacheEntry>>,
    ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
}

impl ResponsibleCache {
    pub fn new(ttl: Duration, negative_ttl: Duration, max_entries: usize) -> ResponsibleCache {
        ResponsibleCache {
            entries: Mutex::new(HashMap::new()),
            ttl,
            negative_ttl,
            max_entries: max_entries.max(1),
        }
    }

    pub fn from_config(c: &AgiConfig) -> ResponsibleCache {
        Self::new(c.cache_ttl, c.negative_cache_ttl, c.cache_max_entries)
    }

    fn key(phone: &str) -> String {
        phone::last10(phone)
    }

    /// `None`: not cached. `Some(None)`: cached "nobody". `Some(Some(r))`: cached answer.
    pub fn get(&self, phone: &str) -> Option<Option<Arc<Responsible>>> {
        let key = Self::key(phone);
        let now = Instant::now();
        let mut map = self.entries.lock().ok()?;
        match map.get(&key) {
            Some(e) if e.expires > now => Some(e.value.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remember a lookup result (negative answers with the negative TTL).
    pub fn put(&self, phone: &str, value: Option<Arc<Responsible>>) {
        self.put_ranked(phone, value, None);
    }

    /// Remember a lookup result and the rank of the CRM that gave it.
    pub fn put_ranked(&self, phone: &str, value: Option<Arc<Responsible>>, source: Option<usize>) {
        self.insert(phone, value, source, None, None);
    }

    /// Store unless `lookup_started` is given and a registration taught the cache
    /// something about this number since then (the lookup's answer may predate it).
    fn insert(
        &self,
        phone: &str,
        value: Option<Arc<Responsible>>,
        source: Option<usize>,
        learned_at: Option<Instant>,
        lookup_started: Option<Instant>,
    ) {
        let ttl = if value.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        if ttl.is_zero() {
            return;
        }
        let key = Self::key(phone);
        if key.is_empty() {
            return;
        }
        let now = Instant::now();
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if let (Some(started), Some(e)) = (lookup_started, map.get(&key))
            && e.expires > now
            && e.learned_at.is_some_and(|t| t >= started)
        {
            return;
        }
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            map.retain(|_, e| e.expires > now);
            if map.len() >= self.max_entries {
                // Still full of live entries: drop an arbitrary tenth rather than grow.
                let drop_n = (self.max_entries / 10).max(1);
                let victims: Vec<String> = map.keys().take(drop_n).cloned().collect();
                for k in victims {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            key,
            CacheEntry {
                value,
                source,
                learned_at,
                expires: now + ttl,
            },
        );
    }

    /// Fill the cache from elsewhere, unconditionally (as the answer of the CRM asked
    /// first). With several CRMs use [`ResponsibleCache::learn`].
    pub fn warm(&self, phone: &str, responsible: Responsible) {
        self.put_ranked(phone, Some(Arc::new(responsible)), Some(0));
    }

    /// Take what a registration in the CRM of rank `rank` (its place in the lookup
    /// order) learned, so that the cache never says what a lookup would not:
    ///
    /// * a responsible employee is stored over nothing only by the CRM asked first (a
    ///   later one would be outranked by an earlier CRM that knows the client); over a
    ///   cached "nobody" (every CRM said so) by any CRM; over a cached answer by the
    ///   CRM that gave it or one asked before it, so a changed responsible replaces
    ///   the stale one;
    /// * "no route" drops a cached answer that came from this CRM (or from an unknown
    ///   source); the next call looks up again.
    pub fn learn(&self, rank: usize, learned: LearnedResponsible) -> Warmed {
        let (phone, responsible) = match learned {
            LearnedResponsible::Found { phone, responsible } => (phone, Some(responsible)),
            LearnedResponsible::NoRoute { phone } => (phone, None),
        };
        let current = {
            let key = Self::key(&phone);
            let Ok(map) = self.entries.lock() else {
                return Warmed::Kept;
            };
            let now = Instant::now();
            map.get(&key)
                .filter(|e| e.expires > now)
                .map(|e| (e.value.is_some(), e.source))
        };
        match responsible {
            Some(r) => {
                let allowed = match current {
                    None => rank == 0,
                    Some((false, _)) => true,
                    Some((true, Some(source))) => rank <= source,
                    Some((true, None)) => rank == 0,
                };
                if !allowed || self.ttl.is_zero() {
                    return Warmed::Kept;
                }
                self.insert(
                    &phone,
                    Some(Arc::new(r)),
                    Some(rank),
                    Some(Instant::now()),
                    None,
                );
                Warmed::Stored
            }
            None => match current {
                Some((true, source)) if source.is_none_or(|s| s == rank) => {
                    self.forget(&phone);
                    Warmed::Forgotten
                }
                _ => Warmed::Kept,
            },
        }
    }

    /// Forget a number (e.g. the CRM says its responsible user changed).
    pub fn forget(&self, phone: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(&Self::key(phone));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Warms a [`ResponsibleCache`] from CRM registrations: after a job is delivered, the
/// connector reads its report ([`Connector::responsible_from_report`]) and the answer
/// goes into the cache under the rules of [`ResponsibleCache::learn`], with the
/// connector's rank in the lookup order (the order given to [`CrmLookup`]).
pub struct CacheWarmer {
    cache: Arc<ResponsibleCache>,
    order: Vec<&'static str>,
}

impl CacheWarmer {
    /// `order`: connector names as [`CrmLookup::order`] lists them.
    pub fn new(cache: Arc<ResponsibleCache>, order: Vec<&'static str>) -> CacheWarmer {
        CacheWarmer { cache, order }
    }

    pub fn cache(&self) -> &Arc<ResponsibleCache> {
        &self.cache
    }

    /// Learn from one delivered job. `None`: the connector is not asked by the lookup
    /// or its report says nothing about the client's responsible employee.
    pub async fn delivered(
        &self,
        connector: &dyn Connector,
        job: &Job,
        report: &DeliveryReport,
    ) -> Option<Warmed> {
        let rank = self.order.iter().position(|n| *n == connector.name())?;
        let learned = connector.responsible_from_report(job, report).await?;
        let outcome = self.cache.learn(rank, learned.clone());
        match (&learned, outcome) {
            (LearnedResponsible::Found { phone, responsible }, Warmed::Stored) => {
                debug!(crm = connector.name(), call_id = %job.call_full.id, phone = %phone, extension = %responsible.extension, "autodistribution cache warmed by a registration")
            }
            (LearnedResponsible::NoRoute { phone }, Warmed::Forgotten) => {
                debug!(crm = connector.name(), call_id = %job.call_full.id, phone = %phone, "stale autodistribution answer dropped after a registration")
            }
            _ => {}
        }
        Some(outcome)
    }
}

/// One routing question, from FastAGI or HTTP.
#[derive(Debug, Clone, Default)]
pub struct AutodistRequest {
    /// The caller's number as Asterisk gave it.
    pub phone: String,
    /// The line (DID/trunk) the call came in on, if known.
    pub trunk: String,
    /// The request as received (AGI environment or HTTP query), for the customization.
    pub request_data: Value,
    /// For logs (the channel's Uniqueid over AGI).
    pub call_id: String,
}

/// Where to send the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Extension to dial.
    pub number: String,
    /// Name to show on the operator's phone (may be empty).
    pub name: String,
}

type LookupResult = Result<Option<Arc<Responsible>>, LookupError>;
type InFlight = Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, LookupResult>>>>>;

/// Cache + lookup + customization within a deadline.
pub struct Autodistributor {
    lookup: Arc<dyn ResponsibleLookup>,
    cache: Arc<ResponsibleCache>,
    hooks: Arc<dyn Customize>,
    deadline: Duration,
    lookup_timeout: Duration,
    in_flight: InFlight,
    run_hook: bool,
}

impl Autodistributor {
    pub fn new(
        config: &AgiConfig,
        lookup: Arc<dyn ResponsibleLookup>,
        cache: Arc<ResponsibleCache>,
        hooks: Arc<dyn Customize>,
    ) -> Autodistributor {
        Autodistributor {
            lookup,
            cache,
            hooks,
            deadline: config.deadline,
            lookup_timeout: config.lookup_timeout.max(config.deadline),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            run_hook: true,
        }
    }

    /// Whether an `autodistribution` customization is installed (default: assume so).
    /// Without one, the hook's JSON input (the whole AGI environment) is never built,
    /// which saves about a hundred allocations per call on the hot path.
    pub fn with_customization(mut self, installed: bool) -> Autodistributor {
        self.run_hook = installed;
        self
    }

    /// See [`Autodistributor::with_customization`].
    pub fn runs_customization(&self) -> bool {
        self.run_hook
    }

    /// The cache (to warm it from call registrations).
    pub fn cache(&self) -> &Arc<ResponsibleCache> {
        &self.cache
    }

    /// Decide the route, or `None` to let the dialplan take its default. Never takes
    /// longer than the deadline.
    pub async fn route(&self, req: &AutodistRequest) -> Option<Route> {
        let started = Instant::now();
        let found = match tokio::time::timeout(self.deadline, self.lookup_cached(&req.phone)).await
        {
            Ok(r) => r,
            Err(_) => Err(LookupError::Timeout(self.deadline)),
        };
        let (number, name, entity, error) = match &found {
            Ok(Some(r)) => (
                r.extension.clone(),
                r.name.clone(),
                r.entity.clone(),
                String::new(),
            ),
            Ok(None) => (String::new(), String::new(), Value::Null, String::new()),
            Err(e) => (String::new(), String::new(), Value::Null, e.to_string()),
        };
        if let Err(e) = &found {
            warn!(call_id = %req.call_id, phone = %req.phone, error = %e, "autodistribution lookup gave no answer; the dialplan's default route is used");
        }
        let default = Route { number, name };
        if !self.run_hook {
            return finish(default, &req.call_id);
        }

        // Read-only fields are present only when not empty (customization contract).
        let mut input = Map::new();
        input.insert("number".into(), json!(default.number));
        input.insert("name".into(), json!(default.name));
        if !req.phone.is_empty() {
            input.insert("from".into(), json!(req.phone));
        }
        if !req.trunk.is_empty() {
            input.insert("trunk".into(), json!(req.trunk));
        }
        input.insert("request_data".into(), req.request_data.clone());
        if !entity.is_null() {
            input.insert("entity".into(), entity);
        }
        if !error.is_empty() {
            input.insert("error".into(), json!(error));
        }
        let left = self.deadline.saturating_sub(started.elapsed());
        let outcome = tokio::time::timeout(
            left,
            self.hooks.run(HOOK, Value::Object(input), &req.call_id),
        )
        .await;
        let chosen = match outcome {
            Ok(HookOutcome::Data(data)) => Route {
                number: json_text(data.get("number")).unwrap_or(default.number),
                name: json_text(data.get("name")).unwrap_or(default.name),
            },
            Ok(HookOutcome::Cancelled) => {
                info!(call_id = %req.call_id, hook = HOOK, "autodistribution cancelled by customization");
                return None;
            }
            Ok(HookOutcome::Default { reason }) => {
                debug!(call_id = %req.call_id, hook = HOOK, %reason, "customization default");
                default
            }
            Err(_) => {
                warn!(call_id = %req.call_id, hook = HOOK, "customization did not answer within the autodistribution deadline; using the CRM answer");
                default
            }
        };
        finish(chosen, &req.call_id)
    }

    /// Cache, else one shared lookup per number.
    async fn lookup_cached(&self, phone: &str) -> LookupResult {
        if phone::digits(phone).is_empty() {
            return Ok(None);
        }
        if let Some(hit) = self.cache.get(phone) {
            return Ok(hit);
        }
        let key = phone::last10(phone);
        let fut = {
            let Ok(mut in_flight) = self.in_flight.lock() else {
                return Err(LookupError::Crm {
                    crm: "kolokol".into(),
                    message: "lookup table poisoned".into(),
                });
            };
            match in_flight.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let shared = self.spawn_lookup(phone.to_string(), key.clone());
                    in_flight.insert(key, shared.clone());
                    shared
                }
            }
        };
        fut.await
    }

    /// Run the lookup in its own task: it outlives a caller that gave up at the deadline
    /// and fills the cache for the next call.
    fn spawn_lookup(&self, phone: String, key: String) -> Shared<BoxFuture<'static, LookupResult>> {
        let lookup = self.lookup.clone();
        let cache = self.cache.clone();
        let in_flight = self.in_flight.clone();
        let limit = self.lookup_timeout;
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let r = match tokio::time::timeout(limit, lookup.find_responsible_ranked(&phone)).await
            {
                Ok(Ok(v)) => Ok(v.map(|(r, rank)| (Arc::new(r), rank))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(LookupError::Timeout(limit)),
            };
            if let Ok(v) = &r {
                let (value, rank) = match v {
                    Some((r, rank)) => (Some(r.clone()), *rank),
                    None => (None, None),
                };
                cache.insert(&phone, value, rank, None, Some(started));
            }
            let r = r.map(|v| v.map(|(r, _)| r));
            if let Ok(mut m) = in_flight.lock() {
                m.remove(&key);
            }
            r
        });
        let fut: BoxFuture<'static, LookupResult> = Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                Err(LookupError::Crm {
                    crm: "kolokol".into(),
                    message: format!("lookup task failed: {e}"),
                })
            })
        });
        fut.shared()
    }
}

/// Check and clean the chosen route.
fn finish(chosen: Route, call_id: &str) -> Option<Route> {
    if chosen.number.is_empty() {
        return None;
    }
    if !valid_extension(&chosen.number) {
        warn!(call_id = %call_id, number = %chosen.number, "autodistribution target is not a dialable extension; ignored");
        return None;
    }
    Some(Route {
        number: chosen.number,
        name: clean_name(&chosen.name),
    })
}

fn json_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An extension Asterisk can dial and that cannot smuggle anything into an AGI line.
fn valid_extension(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'*' | b'#' | b'+' | b'_' | b'-' | b'.')
        })
}

/// Names come from the CRM: strip control characters (a newline would end the AGI
/// command and start another one).
fn clean_name(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_string()
}

/// Quote an AGI argument: Asterisk's parser honours `\"` and `\\` inside quotes.
pub(crate) fn agi_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `agi://host/autodistribution`: sets the destination and name variables, then closes.
pub struct AutodistHandler {
    auto: Arc<Autodistributor>,
    dst_variable: String,
    name_variable: String,
}

impl AutodistHandler {
    pub fn new(config: &AgiConfig, auto: Arc<Autodistributor>) -> AutodistHandler {
        AutodistHandler {
            auto,
            dst_variable: config.dst_variable.clone(),
            name_variable: config.name_variable.clone(),
        }
    }

    fn request(&self, session: &AgiSession) -> Option<AutodistRequest> {
        let env = &session.env;
        // `?phone=` lets a dialplan route on another number than the caller id.
        let phone = env
            .query_param("phone")
            .filter(|p| !p.is_empty())
            .or_else(|| env.caller_id())?
            .to_string();
        let trunk = env
            .query_param("trunk")
            .or_else(|| known(env.get("agi_dnid")))
            .or_else(|| known(env.get("agi_extension")))
            .unwrap_or("")
            .to_string();
        if !self.auto.runs_customization() {
            return Some(AutodistRequest {
                phone,
                trunk,
                request_data: Value::Null,
                call_id: env.uniqueid().to_string(),
            });
        }
        let mut data = Map::with_capacity(env.vars().len() + 1);
        for (k, v) in env.vars() {
            data.insert(k.to_string(), json!(v));
        }
        if !env.query.is_empty() {
            let q: Map<String, Value> = env
                .query
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            data.insert("query".into(), Value::Object(q));
        }
        Some(AutodistRequest {
            phone,
            trunk,
            request_data: Value::Object(data),
            call_id: env.uniqueid().to_string(),
        })
    }
}

impl AgiHandler for AutodistHandler {
    fn handle<'a>(&'a self, session: &'a mut AgiSession) -> BoxFuture<'a, Result<(), AgiError>> {
        Box::pin(async move {
            let Some(req) = self.request(session) else {
                debug!("no caller number; nothing to route");
                return Ok(());
            };
            let started = Instant::now();
            // Watch the socket while deciding: a HANGUP (or EOF) means the caller left.
            let route = tokio::select! {
                // Route first: a cache hit is ready at once and the socket is not polled.
                biased;
                r = self.auto.route(&req) => r,
                gone = session.conn.caller_gone() => {
                    gone?;
                    info!(call_id = %req.call_id, "caller hung up before routing");
                    return Ok(());
                }
            };
            let Some(route) = route else {
                info!(call_id = %req.call_id, phone = %req.phone, elapsed_ms = started.elapsed().as_millis() as u64, "autodistribution: no route, dialplan default applies");
                return Ok(());
            };
            let cmd = format!("SET VARIABLE {} {}", self.dst_variable, route.number);
            if !accepted(session.conn.command(&cmd).await?, &cmd) || session.conn.hung_up() {
                return Ok(());
            }
            if !route.name.is_empty() && !self.name_variable.is_empty() {
                let cmd = format!(
                    "SET VARIABLE {} {}",
                    self.name_variable,
                    agi_quote(&route.name)
                );
                accepted(session.conn.command(&cmd).await?, &cmd);
            }
            info!(call_id = %req.call_id, phone = %req.phone, extension = %route.number, elapsed_ms = started.elapsed().as_millis() as u64, "autodistribution: routed");
            Ok(())
        })
    }
}

fn accepted(reply: Reply, cmd: &str) -> bool {
    match reply {
        Reply::Success { .. } => true,
        Reply::DeadChannel(_) => {
            debug!(cmd, "channel already hung up");
            false
        }
        other => {
            warn!(cmd, reply = ?other, "Asterisk refused an AGI command");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(ext: &str) -> Responsible {
        Responsible {
            extension: ext.into(),
            name: format!("Client of {ext}"),
            entity: json!({"id": 7}),
        }
    }

    fn found(phone: &str, ext: &str) -> LearnedResponsible {
        LearnedResponsible::Found {
            phone: phone.into(),
            responsible: resp(ext),
        }
    }

    fn cached_ext(c: &ResponsibleCache, phone: &str) -> Option<Option<String>> {
        c.get(phone).map(|v| v.map(|r| r.extension.clone()))
    }

    fn cache() -> ResponsibleCache {
        ResponsibleCache::new(Duration::from_secs(600), Duration::from_secs(60), 100)
    }

    #[test]
    fn a_registration_replaces_a_negative_answer_and_a_stale_one() {
        let c = cache();
        c.put("+7 916 123-45-67", None);
        assert_eq!(cached_ext(&c, "79161234567"), Some(None));
        // Even the CRM asked second: "nobody" was every CRM's answer.
        assert_eq!(c.learn(1, found("+79161234567", "101")), Warmed::Stored);
        assert_eq!(cached_ext(&c, "89161234567"), Some(Some("101".into())));
        // The same CRM says the responsible changed: the new one replaces it.
        assert_eq!(c.learn(1, found("79161234567", "102")), Warmed::Stored);
        assert_eq!(cached_ext(&c, "79161234567"), Some(Some("102".into())));
        let r = c.get("79161234567").flatten().expect("cached");
        assert_eq!(*r, resp("102"), "stored exactly as learned");
    }

    #[test]
    fn precedence_of_the_lookup_order_is_kept() {
        let c = cache();
        // Nothing cached: only the CRM asked first may answer (an earlier CRM might
        // know the client).
        assert_eq!(c.learn(1, found("79161234567", "102")), Warmed::Kept);
        assert_eq!(c.get("79161234567"), None);
        assert_eq!(c.learn(0, found("79161234567", "101")), Warmed::Stored);
        // A later CRM never overrides the first one's answer.
        assert_eq!(c.learn(1, found("79161234567", "102")), Warmed::Kept);
        assert_eq!(cached_ext(&c, "79161234567"), Some(Some("101".into())));

        // An answer a lookup got from the second CRM: the first CRM's registration
        // outranks it, the second may refresh it.
        c.put_ranked("79990000000", Some(Arc::new(resp("103"))), Some(1));
        assert_eq!(c.learn(1, found("79990000000", "104")), Warmed::Stored);
        assert_eq!(c.learn(0, found("79990000000", "101")), Warmed::Stored);
        assert_eq!(c.learn(1, found("79990000000", "104")), Warmed::Kept);
        assert_eq!(cached_ext(&c, "79990000000"), Some(Some("101".into())));

        // Source unknown (plain `put`): only the first CRM replaces it.
        c.put("79880000000", Some(Arc::new(resp("103"))));
        assert_eq!(c.learn(1, found("79880000000", "104")), Warmed::Kept);
        assert_eq!(c.learn(0, found("79880000000", "104")), Warmed::Stored);
    }

    #[test]
    fn no_route_drops_only_this_crms_answer() {
        let c = cache();
        let no = |p: &str| LearnedResponsible::NoRoute { phone: p.into() };
        c.put_ranked("79161234567", Some(Arc::new(resp("101"))), Some(0));
        assert_eq!(c.learn(1, no("79161234567")), Warmed::Kept);
        assert_eq!(cached_ext(&c, "79161234567"), Some(Some("101".into())));
        assert_eq!(c.learn(0, no("79161234567")), Warmed::Forgotten);
        assert_eq!(c.get("79161234567"), None, "next call looks up again");
        // A negative answer stays negative.
        c.put("79990000000", None);
        assert_eq!(c.learn(0, no("79990000000")), Warmed::Kept);
        assert_eq!(c.get("79990000000"), Some(None));
    }

    #[test]
    fn a_lookup_that_started_before_a_registration_does_not_undo_it() {
        let c = cache();
        let started = Instant::now();
        assert_eq!(c.learn(0, found("79161234567", "102")), Warmed::Stored);
        // The lookup's (older) answer arrives afterwards.
        c.insert(
            "79161234567",
            Some(Arc::new(resp("101"))),
            Some(0),
            None,
            Some(started),
        );
        assert_eq!(cached_ext(&c, "79161234567"), Some(Some("102".into())));
        // A lookup started later is newer than the registration.
        c.insert(
            "79161234567",
            Some(Arc::new(resp("103"))),
            Some(0),
            None,
            Some(Instant::now()),
        );
        assert_eq!(cached_ext(&c, "79161234567"), Some(Some("103".into())));
    }

    #[test]
    fn zero_ttl_stores_nothing() {
        let c = ResponsibleCache::new(Duration::ZERO, Duration::ZERO, 10);
        c.put("79161234567", None);
        assert_eq!(c.learn(0, found("79161234567", "101")), Warmed::Kept);
        assert!(c.is_empty());
    }

    /// A connector whose reports say who is responsible, like Kommo's.
    struct Reporting(&'static str);

    impl Connector for Reporting {
        fn name(&self) -> &'static str {
            self.0
        }
        fn wants(&self, _stage: crate::calls::Stage) -> bool {
            true
        }
        fn deliver<'a>(
            &'a self,
            _job: &'a Job,
            _steps: &'a dyn crate::crm::JobSteps,
        ) -> BoxFuture<'a, Result<DeliveryReport, crate::crm::CrmError>> {
            Box::pin(async { Ok(json!({})) })
        }
        fn find_responsible<'a>(
            &'a self,
            _phone: &'a str,
        ) -> BoxFuture<'a, Result<Option<Responsible>, crate::crm::CrmError>> {
            Box::pin(async { Ok(None) })
        }
        fn responsible_from_report<'a>(
            &'a self,
            _job: &'a Job,
            report: &'a DeliveryReport,
        ) -> BoxFuture<'a, Option<LearnedResponsible>> {
            let ext = report["ext"].as_str().map(str::to_string);
            Box::pin(async move { Some(found("79161234567", &ext?)) })
        }
    }

    fn job() -> Job {
        Job {
            id: 1,
            connector: "a".into(),
            stage: crate::calls::Stage::CallEnded,
            conversation_id: None,
            call_full: Default::default(),
            attempts: 0,
        }
    }

    #[tokio::test]
    async fn the_warmer_ranks_connectors_by_the_lookup_order() {
        let cache = Arc::new(cache());
        let warmer = CacheWarmer::new(cache.clone(), vec!["first", "second"]);
        let (first, second, stranger) = (
            Reporting("first"),
            Reporting("second"),
            Reporting("stranger"),
        );
        let report = json!({"ext": "102"});
        assert_eq!(
            warmer.delivered(&second, &job(), &report).await,
            Some(Warmed::Kept)
        );
        assert_eq!(
            warmer.delivered(&stranger, &job(), &report).await,
            None,
            "not in the lookup"
        );
        assert_eq!(
            warmer.delivered(&first, &job(), &json!({})).await,
            None,
            "report says nothing"
        );
        assert_eq!(
            warmer.delivered(&first, &job(), &report).await,
            Some(Warmed::Stored)
        );
        assert_eq!(cached_ext(&cache, "79161234567"), Some(Some("102".into())));
        // The cache answers the autodistribution without asking the lookup.
        let auto = Autodistributor::new(
            &AgiConfig::default(),
            Arc::new(CrmLookup::new(vec![])),
            cache.clone(),
            Arc::new(crate::hooks::NoCustomizations),
        )
        .with_customization(false);
        let route = auto
            .route(&AutodistRequest {
                phone: "+79161234567".into(),
                ..AutodistRequest::default()
            })
            .await;
        assert_eq!(
            route,
            Some(Route {
                number: "102".into(),
                name: "Client of 102".into()
            })
        );
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(agi_quote("Ivan Petrov"), "\"Ivan Petrov\"");
        assert_eq!(agi_quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn names_lose_control_characters_and_extensions_are_checked() {
        assert_eq!(clean_name("Ivan\nEXEC System rm"), "IvanEXEC System rm");
        assert!(valid_extension("102"));
        assert!(!valid_extension("102\nEXEC"));
        assert!(!valid_extension("1 2"));
        assert!(!valid_extension(""));
    }
}
