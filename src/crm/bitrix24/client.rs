//! The Bitrix24 REST client: authentication (incoming webhook or OAuth local
//! application), the shared leaky-bucket limiter, error decoding, retries with backoff
//! on `QUERY_LIMIT_EXCEEDED`/5xx, and `batch`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use super::error::{BitrixError, EXPIRED_TOKEN, QUERY_LIMIT_EXCEEDED, summarize_params};
use super::form;
use crate::crm::rate_limit::RateLimiter;
use crate::crm::{TokenSet, TokenStore};

/// The name tokens are stored under in the [`TokenStore`].
pub const TOKEN_KEY: &str = "bitrix24";

/// Largest answer body read from Bitrix24.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// How requests are authenticated.
pub enum Auth {
    /// Incoming webhook: `https://portal/rest/USER/SECRET/` + method.
    Webhook { base: String },
    /// A local application: `https://portal/rest/` + method with `?auth=ACCESS_TOKEN`.
    OAuth(OAuth),
}

/// OAuth state of a local application.
pub struct OAuth {
    /// `https://portal/rest/`.
    pub rest_base: String,
    /// Token endpoint, normally `https://oauth.bitrix.info/oauth/token/`.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// Where the rotated refresh token is kept (durably in the daemon).
    pub store: Arc<dyn TokenStore>,
    /// A refresh token from the config, used when the store has none yet.
    pub bootstrap_refresh_token: Option<String>,
    /// Serialises refreshes so that one expired token causes one refresh.
    pub refresh_lock: tokio::sync::Mutex<()>,
}

/// Retry policy for retryable failures (rate limit, 5xx, network).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries inside one request before the error goes back to the outbox.
    pub max_retries: u32,
    /// First backoff; doubled per retry up to `max_backoff`.
    pub base: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The result of a `batch`: per-command results and per-command errors, by key.
#[derive(Debug, Default, Clone)]
pub struct BatchResult {
    pub results: Map<String, Value>,
    pub errors: Map<String, Value>,
}

impl BatchResult {
    /// The error a command got, decoded, if it failed.
    pub fn error_of(&self, key: &str, method: &str, params: &Value) -> Option<BitrixError> {
        let e = self.errors.get(key)?;
        Some(BitrixError::Api {
            method: method.to_string(),
            params: summarize_params(params),
            status: 400,
            code: e
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            description: e
                .get("error_description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }
}

/// One Bitrix24 portal.
pub struct Client {
    http: reqwest::Client,
    auth: Auth,
    limiter: Arc<RateLimiter>,
    retry: RetryPolicy,
}

impl Client {
    pub fn new(
        auth: Auth,
        limiter: Arc<RateLimiter>,
        retry: RetryPolicy,
        timeout: Duration,
    ) -> Result<Client, BitrixError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("kolokol/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BitrixError::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            http,
            auth,
            limiter,
            retry,
        })
    }

    /// Whether the portal's request budget is at least half unused, so an optional
    /// request (warming the autodistribution cache) costs the calls nothing.
    pub fn has_spare_capacity(&self) -> bool {
        self.limiter.has_spare(0.5)
    }

    /// Call `method` and return its `result`.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, BitrixError> {
        let body = self.call_full(method, params).await?;
        Ok(body.get("result").cloned().unwrap_or(Value::Null))
    }

    /// Call `method` and return the whole answer (`result`, `next`, `total`, `time`).
    pub async fn call_full(&self, method: &str, params: Value) -> Result<Value, BitrixError> {
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            self.limiter.acquire().await;
            let used = self.current_access_token();
            match self.send_once(method, &params).await {
                Ok(v) => return Ok(v),
                Err(e) if e.code() == Some(EXPIRED_TOKEN) && !refreshed => {
                    refreshed = true;
                    info!(crm = "bitrix24", method, "access token expired, refreshing");
                    self.refresh_after(used.as_deref()).await?;
                }
                Err(e) if e.is_retryable() && attempt < self.retry.max_retries => {
                    let backoff = self
                        .retry
                        .base
                        .saturating_mul(1u32 << attempt.min(16))
                        .min(self.retry.max_backoff);
                    attempt += 1;
                    warn!(crm = "bitrix24", method, attempt, backoff_ms = backoff.as_millis() as u64, error = %e, "retrying");
                    if e.code() == Some(QUERY_LIMIT_EXCEEDED) {
                        // The portal's bucket is full: everyone waits, not just us.
                        self.limiter.pause_for(backoff).await;
                    } else {
                        tokio::time::sleep(backoff).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Run up to 50 commands as one request (one request against the rate limit).
    /// `cmds` are `(key, method, params)`; with `halt` the portal stops at the first
    /// failing command.
    pub async fn batch(
        &self,
        cmds: &[(String, String, Value)],
        halt: bool,
    ) -> Result<BatchResult, BitrixError> {
        let mut out = BatchResult::default();
        for chunk in cmds.chunks(50) {
            let mut cmd = Map::new();
            for (key, method, params) in chunk {
                cmd.insert(
                    key.clone(),
                    Value::String(format!("{method}?{}", form::encode(params))),
                );
            }
            let body = self
                .call(
                    "batch",
                    json!({"halt": if halt { 1 } else { 0 }, "cmd": cmd}),
                )
                .await?;
            if let Some(Value::Object(r)) = body.get("result") {
                out.results.extend(r.clone());
            }
            if let Some(Value::Object(r)) = body.get("result_error") {
                out.errors.extend(r.clone());
            }
        }
        Ok(out)
    }

    async fn url_for(&self, method: &str) -> Result<String, BitrixError> {
        match &self.auth {
            Auth::Webhook { base } => Ok(format!("{base}{method}")),
            Auth::OAuth(o) => {
                let token = match o.store.get(TOKEN_KEY) {
                    Some(t) => t.access_token,
                    None => {
                        self.refresh_after(Some("")).await?;
                        o.store
                            .get(TOKEN_KEY)
                            .map(|t| t.access_token)
                            .ok_or_else(|| BitrixError::Auth {
                                reason: "no access token after refresh".into(),
                            })?
                    }
                };
                Ok(format!(
                    "{}{method}?auth={}",
                    o.rest_base,
                    form::percent_encode(&token)
                ))
            }
        }
    }

    async fn send_once(&self, method: &str, params: &Value) -> Result<Value, BitrixError> {
        let url = self.url_for(method).await?;
        debug!(crm = "bitrix24", method, params = %summarize_params(params), "request");
        let resp = self
            .http
            .post(&url)
            .json(params)
            .send()
            .await
            .map_err(|e| BitrixError::Transport {
                method: method.to_string(),
                reason: without_url(&e),
            })?;
        let status = resp.status().as_u16();
        let bytes = read_limited(resp)
            .await
            .map_err(|reason| BitrixError::Transport {
                method: method.to_string(),
                reason,
            })?;
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => {
                return Err(BitrixError::BadResponse {
                    method: method.to_string(),
                    status,
                    snippet: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                });
            }
        };
        if let Some(code) = body.get("error") {
            // Bitrix24 sometimes sends "error": "" with only a description.
            let code = match code {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            return Err(BitrixError::Api {
                method: method.to_string(),
                params: summarize_params(params),
                status,
                code,
                description: body
                    .get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        if status >= 400 {
            return Err(BitrixError::BadResponse {
                method: method.to_string(),
                status,
                snippet: body.to_string().chars().take(200).collect(),
            });
        }
        Ok(body)
    }

    /// Get a new access token with the stored (or configured) refresh token and store
    /// the rotated pair before using it.
    pub async fn refresh(&self) -> Result<(), BitrixError> {
        self.refresh_after(None).await
    }

    fn current_access_token(&self) -> Option<String> {
        match &self.auth {
            Auth::OAuth(o) => o.store.get(TOKEN_KEY).map(|t| t.access_token),
            Auth::Webhook { .. } => None,
        }
    }

    /// Refresh, unless the access token that failed (`expired`) was already replaced
    /// by a concurrent refresh: one expiry causes one refresh, however many requests
    /// saw it.
    async fn refresh_after(&self, expired: Option<&str>) -> Result<(), BitrixError> {
        let Auth::OAuth(o) = &self.auth else {
            return Err(BitrixError::Api {
                method: "(webhook)".into(),
                params: "{}".into(),
                status: 401,
                code: EXPIRED_TOKEN.into(),
                description: "a webhook cannot be refreshed".into(),
            });
        };
        let _guard = o.refresh_lock.lock().await;
        let current = o.store.get(TOKEN_KEY);
        if let (Some(cur), Some(failed)) = (&current, expired)
            && cur.access_token != failed
        {
            // Someone refreshed while we waited for the lock.
            return Ok(());
        }
        let refresh_token = current
            .map(|t| t.refresh_token)
            .or_else(|| o.bootstrap_refresh_token.clone())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| BitrixError::Auth {
                reason: "no refresh token stored".into(),
            })?;
        let url = format!(
            "{}?grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={}",
            o.token_url,
            form::percent_encode(&o.client_id),
            form::percent_encode(&o.client_secret),
            form::percent_encode(&refresh_token)
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| BitrixError::Auth {
                reason: format!("token endpoint unreachable: {}", without_url(&e)),
            })?;
        let status = resp.status().as_u16();
        let bytes = read_limited(resp)
            .await
            .map_err(|reason| BitrixError::Auth { reason })?;
        let body: Value = serde_json::from_slice(&bytes).map_err(|_| BitrixError::Auth {
            reason: format!("token endpoint answered HTTP {status} with non-JSON"),
        })?;
        if let Some(err) = body.get("error").and_then(Value::as_str) {
            return Err(BitrixError::Auth {
                reason: format!(
                    "refresh refused: {err}: {}",
                    body.get("error_description")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                ),
            });
        }
        let access = body.get("access_token").and_then(Value::as_str);
        let refresh = body.get("refresh_token").and_then(Value::as_str);
        let (Some(access), Some(refresh)) = (access, refresh) else {
            return Err(BitrixError::Auth {
                reason: "token endpoint answer lacks access_token/refresh_token".into(),
            });
        };
        let expires_in = body
            .get("expires_in")
            .and_then(Value::as_i64)
            .unwrap_or(3600);
        let tokens = TokenSet {
            access_token: access.to_string(),
            refresh_token: refresh.to_string(),
            expires_at: chrono::Utc::now().timestamp() + expires_in,
        };
        o.store
            .put(TOKEN_KEY, &tokens)
            .map_err(|e| BitrixError::Auth {
                reason: format!("cannot save the rotated refresh token: {e}"),
            })?;
        info!(crm = "bitrix24", "OAuth tokens refreshed and saved");
        Ok(())
    }
}

/// reqwest errors print the URL, which holds the webhook secret or the access token.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "broken body"
    } else {
        "request error"
    };
    let e = e.without_url_ref();
    format!("{kind}: {e}")
}

trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut s = self.to_string();
        if let Some(url) = self.url() {
            s = s.replace(url.as_str(), "<url>");
        }
        s
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_BODY {
                    return Err(format!("answer larger than {MAX_BODY} bytes"));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(without_url(&e)),
        }
    }
}
