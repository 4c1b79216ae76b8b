//! FastAGI server and the autodistribution handler.
//!
//! Asterisk opens one short TCP session per `AGI(agi://host:4573/<script>)` call,
//! sends the `agi_*` environment block, then waits for commands. For
//! `autodistribution` kolokol finds the caller's responsible manager (cache first, then
//! the CRMs, within a hard deadline), runs the `autodistribution` customization, sets
//! the destination and name channel variables and closes. When nothing is found in time
//! nothing is set, so the dialplan falls through to its normal route.
//!
//! * [`protocol`]: the wire format (environment block, replies, `HANGUP`), with limits.
//! * [`server`]: accept loop, connection cap, per-session timeouts, routing by script.
//! * [`autodist`]: lookup trait, TTL cache (with negative answers, warmed from CRM
//!   registrations), deadline, hook.
//! * [`http`]: `GET /autodistribution?phone=...` for dialplans that use `CURL()`.

pub mod autodist;
pub mod http;
pub mod protocol;
pub mod server;

use std::time::Duration;

use serde::Deserialize;

pub use autodist::{
    AutodistHandler, AutodistRequest, Autodistributor, CacheWarmer, CrmLookup, LookupError,
    ResponsibleCache, ResponsibleLookup, Route, Warmed,
};
pub use protocol::{AgiEnv, AgiError, AgiLimits, Reply};
pub use server::{AgiHandler, AgiServer, AgiSession};

/// `[agi]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgiConfig {
    /// FastAGI listen address (Asterisk's default port is 4573).
    pub listen: String,
    /// Hard limit for one autodistribution answer (cache, CRM lookup and customization
    /// together). Keep it well under the ring time: after it the dialplan's own route runs.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Channel variable that receives the destination extension.
    pub dst_variable: String,
    /// Channel variable that receives the display name. Set it to `CALLERID(name)` to
    /// change the name shown on the operator's phone directly (fixture 12 does that).
    pub name_variable: String,
    /// How long a found responsible manager is remembered.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "nobody is responsible for this number" is remembered.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// Cache size cap (numbers).
    pub cache_max_entries: usize,
    /// Warm the cache from call registrations: the responsible employee a CRM
    /// registration found or set answers the client's next call without a lookup.
    /// Kommo reads it from the registration; Bitrix24 spends one `crm.<type>.get` per
    /// finished call (off the call path) instead of the lookup's two on the next call.
    pub warm_from_registrations: bool,
    /// A CRM lookup still running after the deadline may finish (and fill the cache for
    /// the next call) for at most this long.
    #[serde(with = "humantime_serde")]
    pub lookup_timeout: Duration,
    /// Simultaneous FastAGI sessions; more are closed at once (the dialplan falls through).
    pub max_connections: usize,
    /// Cap on the whole `agi_*` block in bytes.
    pub max_header_bytes: usize,
    /// Cap on the number of `agi_*` lines.
    pub max_header_lines: usize,
    /// The whole `agi_*` block must arrive within this time (slow senders are cut off).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest wait for one reply line from Asterisk.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Hard cap on one session from accept to close.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
}

impl Default for AgiConfig {
    fn default() -> Self {
        AgiConfig {
            listen: "127.0.0.1:4573".into(),
            deadline: Duration::from_millis(1500),
            dst_variable: "KOLOKOL_DST".into(),
            name_variable: "KOLOKOL_NAME".into(),
            cache_ttl: Duration::from_secs(600),
            negative_cache_ttl: Duration::from_secs(60),
            cache_max_entries: 100_000,
            warm_from_registrations: true,
            lookup_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            max_header_lines: 128,
            header_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            session_timeout: Duration::from_secs(30),
        }
    }
}

impl AgiConfig {
    /// The protocol limits this config asks for.
    pub fn limits(&self) -> AgiLimits {
        AgiLimits {
            max_header_bytes: self.max_header_bytes,
            max_header_lines: self.max_header_lines,
            max_line_bytes: self.max_header_bytes.clamp(256, 8192),
            header_timeout: self.header_timeout,
            read_timeout: self.read_timeout,
            max_reply_lines: 64,
        }
    }
}
