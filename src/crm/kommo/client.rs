//! HTTP access to one Kommo account: authentication, rate limit, retries and the
//! translation of Kommo's answers into [`KommoError`] / [`CrmError`].
//!
//! Kommo answers successes as `application/hal+json`, errors as
//! `application/problem+json` (`title`, `status`, `detail`, and for 400 a
//! `validation-errors` array). 204 means "nothing found". Access tokens live 24 h and
//! every refresh rotates the refresh token: two concurrent refreshes would lock the
//! account out, so refreshes are serialised and the new pair is stored before use.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{KommoConfig, NAME};
use crate::crm::rate_limit::RateLimiter;
use crate::crm::{CrmError, TokenSet, TokenStore};

/// Largest response body read from Kommo (a page of 250 contacts fits easily).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Longest `Retry-After` waited inside one delivery; longer ones go back to the outbox.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(5);

/// What went wrong talking to Kommo.
#[derive(Debug, thiserror::Error)]
pub enum KommoError {
    #[error("Kommo {what}: network error: {detail} (check [kommo] base_url and connectivity)")]
    Network { what: String, detail: String },
    #[error("Kommo {what}: too many requests (429), retry after {retry_after:?}")]
    RateLimited {
        what: String,
        retry_after: Option<Duration>,
    },
    #[error("Kommo {what}: server error {status}: {detail}")]
    Server {
        what: String,
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    #[error(
        "Kommo {what}: access token rejected (401) even after refresh: {detail}; re-authorize with `kolokol kommo auth --code CODE` or check [kommo] long_lived_token"
    )]
    Unauthorized { what: String, detail: String },
    #[error(
        "Kommo {what}: forbidden (403): {detail}; the account may be blocked or this server's IP not allowed; jobs are kept until access is restored"
    )]
    Forbidden { what: String, detail: String },
    #[error("Kommo rejected {what} (400): {detail}")]
    Validation { what: String, detail: String },
    #[error("Kommo {what}: unexpected status {status}: {detail}")]
    Rejected {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("Kommo {what}: unexpected answer: {detail}")]
    BadResponse { what: String, detail: String },
    #[error(
        "no Kommo OAuth tokens stored: run `kolokol kommo auth --code CODE` with a fresh authorization code, or set [kommo] long_lived_token"
    )]
    NotAuthorized,
    #[error(
        "Kommo refused the OAuth {grant} ({status}): {detail}; get a new authorization code and run `kolokol kommo auth --code CODE` (check client_id, client_secret, redirect_uri)"
    )]
    OAuth {
        grant: &'static str,
        status: u16,
        detail: String,
    },
    #[error("cannot store Kommo tokens: {0}")]
    TokenStore(String),
    /// The account lacks something kolokol needs; the text says what to change.
    #[error("Kommo account not ready: {0}")]
    Account(String),
}

impl KommoError {
    fn retry_after(&self) -> Option<Option<Duration>> {
        match self {
            KommoError::Network { .. } => Some(None),
            KommoError::RateLimited { retry_after, .. }
            | KommoError::Server { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<KommoError> for CrmError {
    fn from(e: KommoError) -> Self {
        let message = e.to_string();
        match e {
            KommoError::Network { .. } => CrmError::Retryable {
                message,
                retry_after: None,
            },
            KommoError::RateLimited { retry_after, .. }
            | KommoError::Server { retry_after, .. } => CrmError::Retryable {
                message,
                retry_after,
            },
            KommoError::OAuth { status, .. } if status >= 500 || status == 429 => {
                CrmError::Retryable {
                    message,
                    retry_after: None,
                }
            }
            KommoError::Unauthorized { .. }
            | KommoError::Forbidden { .. }
            | KommoError::NotAuthorized
            | KommoError::OAuth { .. }
            | KommoError::TokenStore(_)
            | KommoError::Account(_) => CrmError::Blocked { message },
            KommoError::Validation { .. }
            | KommoError::Rejected { .. }
            | KommoError::BadResponse { .. } => CrmError::Rejected { message },
        }
    }
}

enum Auth {
    LongLived(String),
    OAuth {
        store: Arc<dyn TokenStore>,
        /// The newest pair, also kept here so a failing store does not lose it.
        current: Mutex<Option<TokenSet>>,
    },
}

/// One Kommo account's HTTP client. Cheap to share behind `Arc`.
pub struct KommoClient {
    http: reqwest::Client,
    base: String,
    client_id: String,
    client_secret: String,
    redirect_uri: String,
    refresh_margin: Duration,
    inline_retries: u32,
    auth: Auth,
    limiter: RateLimiter,
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn parse_retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// The human part of a problem+json body, with validation errors spelled out:
/// `path: detail (code)` for each.
pub fn problem_detail(body: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(items) = body.get("validation-errors").and_then(Value::as_array) {
        for item in items {
            let rid = item.get("request_id").and_then(Value::as_str).unwrap_or("");
            for err in item
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                parts.push(format!(
                    "item {rid}: {}: {} ({})",
                    s("path"),
                    s("detail"),
                    s("code")
                ));
            }
        }
    }
    if parts.is_empty() {
        for k in ["detail", "title", "hint"] {
            if let Some(s) = body.get(k).and_then(Value::as_str) {
                parts.push(s.to_string());
                break;
            }
        }
    }
    if parts.is_empty() {
        let mut s = body.to_string();
        s.truncate(500);
        parts.push(s);
    }
    parts.join("; ")
}

impl KommoClient {
    /// A client for `cfg`. With `long_lived_token` set the token store is not used.
    pub fn new(cfg: &KommoConfig, store: Arc<dyn TokenStore>) -> Result<Self, KommoError> {
        let base = cfg.base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(KommoError::BadResponse {
                what: "config".into(),
                detail: format!(
                    "[kommo] base_url {:?} must be the account URL, e.g. https://example.kommo.com",
                    cfg.base_url
                ),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("kolokol/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| KommoError::Network {
                what: "client".into(),
                detail: e.to_string(),
            })?;
        let auth = match cfg.long_lived_token.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => Auth::LongLived(t.to_string()),
            _ => Auth::OAuth {
                current: Mutex::new(store.get(NAME)),
                store,
            },
        };
        let rate = if cfg.rate_limit > 0.0 {
            cfg.rate_limit
        } else {
            7.0
        };
        Ok(KommoClient {
            http,
            base,
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
            redirect_uri: cfg.redirect_uri.clone(),
            refresh_margin: cfg.refresh_margin,
            inline_retries: cfg.inline_retries,
            auth,
            limiter: RateLimiter::new(rate, rate.ceil().max(1.0) as u32),
        })
    }

    /// Exchange an authorization code (valid 20 minutes) for tokens and store them.
    pub async fn exchange_code(&self, code: &str) -> Result<TokenSet, KommoError> {
        let body = json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
        });
        let tokens = self.token_request("authorization code", body).await?;
        self.save_tokens(&tokens).await?;
        Ok(tokens)
    }

    async fn token_request(
        &self,
        grant: &'static str,
        body: Value,
    ) -> Result<TokenSet, KommoError> {
        self.limiter.acquire().await;
        let what = "POST /oauth2/access_token".to_string();
        let resp = self
            .http
            .post(format!("{}/oauth2/access_token", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| KommoError::Network {
                what: what.clone(),
                detail: e.to_string(),
            })?;
        let status = resp.status();
        let body = read_json(resp, &what).await?;
        if !status.is_success() {
            return Err(KommoError::OAuth {
                grant,
                status: status.as_u16(),
                detail: problem_detail(&body.unwrap_or(Value::Null)),
            });
        }
        let body = body.unwrap_or(Value::Null);
        let s = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        match (s("access_token"), s("refresh_token")) {
            (Some(access_token), Some(refresh_token)) => {
                let expires_in = body
                    .get("expires_in")
                    .and_then(Value::as_i64)
                    .unwrap_or(86400);
                Ok(TokenSet {
                    access_token,
                    refresh_token,
                    expires_at: now_unix() + expires_in,
                })
            }
            _ => Err(KommoError::BadResponse {
                what,
                detail: "no access_token/refresh_token in the answer".into(),
            }),
        }
    }

    async fn save_tokens(&self, tokens: &TokenSet) -> Result<(), KommoError> {
        if let Auth::OAuth { store, current } = &self.auth {
            *current.lock().await = Some(tokens.clone());
            store.put(NAME, tokens).map_err(|e| {
                tracing::error!(crm = NAME, error = %e, "rotated Kommo refresh token could not be stored; it is kept in memory only");
                KommoError::TokenStore(e)
            })?;
        }
        Ok(())
    }

    /// The access token to send, refreshing it first when it is about to expire.
    async fn access_token(&self) -> Result<String, KommoError> {
        match &self.auth {
            Auth::LongLived(t) => Ok(t.clone()),
            Auth::OAuth { current, .. } => {
                let tokens = current.lock().await.clone();
                match tokens {
                    None => Err(KommoError::NotAuthorized),
                    Some(t) if t.expires_at - now_unix() > self.refresh_margin.as_secs() as i64 => {
                        Ok(t.access_token)
                    }
                    Some(t) => self.refresh(&t.access_token).await,
                }
            }
        }
    }

    /// Refresh the tokens unless someone already replaced `stale` meanwhile.
    async fn refresh(&self, stale: &str) -> Result<String, KommoError> {
        let Auth::OAuth { current, store } = &self.auth else {
            return Err(KommoError::NotAuthorized);
        };
        // Holding the lock across the request serialises refreshes: a second refresh
        // with the same (now rotated) refresh token would be refused.
        let mut guard = current.lock().await;
        let Some(tokens) = guard.clone() else {
            return Err(KommoError::NotAuthorized);
        };
        if tokens.access_token != stale
            && tokens.expires_at - now_unix() > self.refresh_margin.as_secs() as i64
        {
            return Ok(tokens.access_token);
        }
        tracing::info!(crm = NAME, "refreshing the Kommo access token");
        let body = json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "redirect_uri": self.redirect_uri,
        });
        let new = self.token_request("refresh token", body).await?;
        *guard = Some(new.clone());
        drop(guard);
        if let Err(e) = store.put(NAME, &new) {
            tracing::error!(crm = NAME, error = %e, "rotated Kommo refresh token could not be stored; it is kept in memory only");
            return Err(KommoError::TokenStore(e));
        }
        Ok(new.access_token)
    }

    /// One API request with retries: 401 → refresh once and repeat; 429/5xx/network →
    /// up to `inline_retries` more attempts (honouring `Retry-After` up to 5 s).
    /// `Ok(None)` is a 204 No Content.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<Value>, KommoError> {
        let what = format!("{method} {path}");
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            let token = self.access_token().await?;
            match self
                .send_once(&method, path, query, body, &token, &what)
                .await
            {
                Ok(v) => return Ok(v),
                Err(KommoError::Unauthorized { detail, .. })
                    if !refreshed && matches!(self.auth, Auth::OAuth { .. }) =>
                {
                    tracing::warn!(crm = NAME, request = %what, %detail, "Kommo answered 401: refreshing the token once");
                    refreshed = true;
                    self.refresh(&token).await?;
                }
                Err(e) => match e.retry_after() {
                    Some(ra) if attempt < self.inline_retries => {
                        let wait = ra.unwrap_or(Duration::from_millis(200 << attempt.min(5)));
                        if wait > MAX_INLINE_WAIT {
                            return Err(e);
                        }
                        tracing::warn!(crm = NAME, request = %what, error = %e, ?wait, attempt, "retrying Kommo request");
                        attempt += 1;
                        tokio::time::sleep(wait).await;
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        token: &str,
        what: &str,
    ) -> Result<Option<Value>, KommoError> {
        self.limiter.acquire().await;
        let mut rb = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .bearer_auth(token)
            .header(reqwest::header::ACCEPT, "application/hal+json");
        if !query.is_empty() {
            rb = rb.query(query);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| KommoError::Network {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
        let status = resp.status();
        let retry_after = parse_retry_after(resp.headers());
        tracing::debug!(crm = NAME, request = %what, status = status.as_u16(), "Kommo answered");
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let body = read_json(resp, what).await;
        if status.is_success() {
            return body;
        }
        let detail = match &body {
            Ok(Some(b)) => problem_detail(b),
            Ok(None) => status.canonical_reason().unwrap_or("").to_string(),
            Err(e) => e.to_string(),
        };
        let what = what.to_string();
        Err(match status.as_u16() {
            429 => {
                // Everyone waits, not just this request.
                self.limiter
                    .pause_for(retry_after.unwrap_or(Duration::from_secs(1)))
                    .await;
                KommoError::RateLimited { what, retry_after }
            }
            401 => KommoError::Unauthorized { what, detail },
            403 => KommoError::Forbidden { what, detail },
            400 => KommoError::Validation { what, detail },
            s if s >= 500 => KommoError::Server {
                what,
                status: s,
                detail,
                retry_after,
            },
            s => KommoError::Rejected {
                what,
                status: s,
                detail,
            },
        })
    }

    /// `GET` a path.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<Value>, KommoError> {
        self.request(Method::GET, path, query, None).await
    }

    /// `POST` a JSON body; a success must have a body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, KommoError> {
        self.request(Method::POST, path, &[], Some(body))
            .await?
            .ok_or_else(|| KommoError::BadResponse {
                what: format!("POST {path}"),
                detail: "empty answer".into(),
            })
    }

    /// `PATCH` a JSON body.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Option<Value>, KommoError> {
        self.request(Method::PATCH, path, &[], Some(body)).await
    }
}

async fn read_json(resp: reqwest::Response, what: &str) -> Result<Option<Value>, KommoError> {
    if resp.content_length().is_some_and(|n| n as usize > MAX_BODY) {
        return Err(KommoError::BadResponse {
            what: what.to_string(),
            detail: "answer too large".into(),
        });
    }
    let mut resp = resp;
    let mut bytes = Vec::new();
    // Read chunk by chunk so a chunked answer cannot grow without bound.
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if bytes.len() + c.len() > MAX_BODY {
                    return Err(KommoError::BadResponse {
                        what: what.to_string(),
                        detail: "answer too large".into(),
                    });
                }
                bytes.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(KommoError::Network {
                    what: what.to_string(),
                    detail: e.to_string(),
                });
            }
        }
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| KommoError::BadResponse {
            what: what.to_string(),
            detail: format!("not JSON: {e}"),
        })
}
