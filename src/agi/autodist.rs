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
use crate::crm::{BoxFuture, Connector, Responsible};
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

/// Finds who is responsible for a client phone. The daemon uses [`CrmLookup`]; tests
/// plug in their own.
pub trait ResponsibleLookup: Send + Sync {
    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, LookupError>>;
}

/// Asks each enabled CRM in order; the first that knows the client wins.
pub struct CrmLookup {
    connectors: Vec<Arc<dyn Connector>>,
}

impl CrmLookup {
    pub fn new(connectors: Vec<Arc<dyn Connector>>) -> CrmLookup {
        CrmLookup { connectors }
    }
}

impl ResponsibleLookup for CrmLookup {
    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, LookupError>> {
        Box::pin(async move {
            let mut first_error = None;
            for c in &self.connectors {
                match c.find_responsible(phone).await {
                    Ok(Some(r)) => return Ok(Some(r)),
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
    expires: Instant,
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
                expires: now + ttl,
            },
        );
    }

    /// Fill the cache from elsewhere (e.g. a call registration found the responsible user).
    pub fn warm(&self, phone: &str, responsible: Responsible) {
        self.put(phone, Some(Arc::new(responsible)));
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
        let task = tokio::spawn(async move {
            let r = match tokio::time::timeout(limit, lookup.find_responsible(&phone)).await {
                Ok(Ok(v)) => Ok(v.map(Arc::new)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(LookupError::Timeout(limit)),
            };
            if let Ok(v) = &r {
                cache.put(&phone, v.clone());
            }
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
