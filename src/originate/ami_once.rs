//! A minimal, short-lived AMI session: connect, log in, send actions, wait for an
//! event, log off. Used by `kolokol originate` (one click-to-call from a shell) so the
//! command works without the daemon. The daemon itself uses the long-lived
//! `ami::client` and implements [`Originator`] on it.
//!
//! ActionIDs are `kolokol-crm-<n>`, one number per action sent (an action that brings
//! its own ActionID still takes a number), as in the recorded `.sent` files.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use md5::{Digest, Md5};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

use super::{OriginateError, Originator};
use crate::ami::{AmiAuth, AmiCodec, AmiConfig, Frame, Message};
use crate::crm::BoxFuture;

/// Events kept while waiting for a response, so an event that overtakes it is not lost.
const MAX_BACKLOG: usize = 1024;

/// One logged-in AMI connection.
pub struct AmiSession {
    reader: FramedRead<OwnedReadHalf, AmiCodec>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    backlog: VecDeque<Message>,
    addr: String,
}

impl AmiSession {
    /// Connect and log in (plain or MD5 challenge, per `[ami] auth`). `timeout` bounds
    /// each step.
    pub async fn login(
        config: &AmiConfig,
        timeout: Duration,
    ) -> Result<AmiSession, OriginateError> {
        let addr = format!("{}:{}", config.host, config.port);
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(OriginateError::Unreachable {
                    addr,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(OriginateError::Unreachable {
                    addr,
                    reason: format!("no connection within {timeout:?}"),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut s = AmiSession {
            reader: FramedRead::new(r, AmiCodec::new()),
            writer: w,
            next_id: 1,
            timeout,
            backlog: VecDeque::new(),
            addr,
        };
        let login = match config.auth {
            AmiAuth::Plain => Message::from_pairs(&[
                ("Action", "Login"),
                ("Username", config.username.as_str()),
                ("Secret", config.secret.as_str()),
            ]),
            AmiAuth::Md5 => {
                let challenge = s
                    .action(Message::from_pairs(&[
                        ("Action", "Challenge"),
                        ("AuthType", "MD5"),
                    ]))
                    .await?;
                let Some(ch) = challenge.get("Challenge") else {
                    return Err(OriginateError::LoginRefused {
                        user: config.username.clone(),
                        message: "no MD5 challenge offered".into(),
                    });
                };
                let key = hex::encode(Md5::digest(format!("{ch}{}", config.secret)));
                Message::from_pairs(&[
                    ("Action", "Login"),
                    ("AuthType", "MD5"),
                    ("Username", config.username.as_str()),
                    ("Key", key.as_str()),
                ])
            }
        };
        let resp = s.action(login).await?;
        if !is_success(&resp) {
            return Err(OriginateError::LoginRefused {
                user: config.username.clone(),
                message: resp.get("Message").unwrap_or("refused").to_string(),
            });
        }
        Ok(s)
    }

    /// Send `action` and wait for the response with its ActionID. An action without an
    /// ActionID gets `kolokol-crm-<n>` (inserted right after `Action`).
    pub async fn action(&mut self, action: Message) -> Result<Message, OriginateError> {
        let n = self.next_id;
        self.next_id += 1;
        let action = match action.action_id() {
            Some(_) => action,
            None => {
                let id = format!("kolokol-crm-{n}");
                let mut pairs: Vec<(String, String)> = Vec::with_capacity(action.len() + 1);
                for (i, (k, v)) in action.fields().enumerate() {
                    pairs.push((k.to_string(), v.to_string()));
                    if i == 0 {
                        pairs.push(("ActionID".into(), id.clone()));
                    }
                }
                Message::from_pairs(&pairs)
            }
        };
        let id = action.action_id().unwrap_or("").to_string();
        self.writer
            .write_all(&action.to_wire())
            .await
            .map_err(|e| OriginateError::Connection(e.to_string()))?;
        loop {
            let msg = self.next_message().await?;
            if msg.response().is_some() && msg.action_id() == Some(id.as_str()) {
                return Ok(msg);
            }
            if msg.event().is_some() {
                if self.backlog.len() >= MAX_BACKLOG {
                    self.backlog.pop_front();
                }
                self.backlog.push_back(msg);
            }
        }
    }

    /// Wait up to `limit` for an event matching `pred` (also looks at events that
    /// arrived while an action was pending).
    pub async fn wait_event(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> Result<Message, OriginateError> {
        if let Some(i) = self.backlog.iter().position(&mut pred)
            && let Some(m) = self.backlog.remove(i)
        {
            return Ok(m);
        }
        let wait = async {
            loop {
                let msg = self.read_frame().await?;
                if pred(&msg) {
                    return Ok(msg);
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => Err(OriginateError::Timeout(limit)),
        }
    }

    /// Log off politely (bounded in time; errors are irrelevant at this point).
    pub async fn logoff(mut self) {
        let r = self
            .action(Message::from_pairs(&[("Action", "Logoff")]))
            .await;
        if let Err(e) = r {
            debug!(error = %e, "AMI logoff");
        }
    }

    async fn next_message(&mut self) -> Result<Message, OriginateError> {
        let limit = self.timeout;
        match tokio::time::timeout(limit, self.read_frame()).await {
            Ok(r) => r,
            Err(_) => Err(OriginateError::Timeout(limit)),
        }
    }

    async fn read_frame(&mut self) -> Result<Message, OriginateError> {
        loop {
            match self.reader.next().await {
                Some(Ok(Frame::Message(m))) => return Ok(m),
                Some(Ok(Frame::Banner(b))) => debug!(banner = %b, "AMI banner"),
                Some(Ok(Frame::Malformed(bad))) => {
                    warn!(reason = %bad.reason, sample = %bad.sample, "skipped malformed AMI data")
                }
                Some(Err(e)) => return Err(OriginateError::Connection(e.to_string())),
                None => {
                    return Err(OriginateError::Connection(format!(
                        "{} closed the connection",
                        self.addr
                    )));
                }
            }
        }
    }
}

fn is_success(m: &Message) -> bool {
    m.response()
        .is_some_and(|r| r.eq_ignore_ascii_case("Success"))
}

/// An [`Originator`] over one [`AmiSession`] (the CLI's).
pub struct SessionOriginator(pub Mutex<AmiSession>);

impl Originator for SessionOriginator {
    fn originate(&self, action: Message) -> BoxFuture<'_, Result<Message, OriginateError>> {
        Box::pin(async move { self.0.lock().await.action(action).await })
    }
}

/// Called with `(request id, outcome)` when an originated call's `OriginateResponse`
/// arrives (to report failures back to the CRM).
pub type OutcomeSink = Arc<dyn Fn(String, super::OriginateOutcome) + Send + Sync>;

/// An [`Originator`] that opens its own AMI session per click-to-call, waits for the
/// `OriginateResponse` in the background (reporting it to `sink` and the log), then logs
/// off. For setups where the long-lived AMI client is not available (or not allowed to
/// originate); the daemon normally uses its own client.
pub struct OneShotOriginator {
    pub ami: AmiConfig,
    /// Bound on connect, login and the action's response.
    pub step_timeout: Duration,
    /// How long to wait for the `OriginateResponse` (ring timeout plus a margin).
    pub outcome_timeout: Duration,
    pub sink: Option<OutcomeSink>,
}

impl Originator for OneShotOriginator {
    fn originate(&self, action: Message) -> BoxFuture<'_, Result<Message, OriginateError>> {
        Box::pin(async move {
            let mut session = AmiSession::login(&self.ami, self.step_timeout).await?;
            let response = match session.action(action.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    session.logoff().await;
                    return Err(e);
                }
            };
            if !is_success(&response) {
                session.logoff().await;
                return Ok(response);
            }
            let action_id = action.action_id().unwrap_or("").to_string();
            let limit = self.outcome_timeout;
            let sink = self.sink.clone();
            tokio::spawn(async move {
                let event = session
                    .wait_event(limit, |m| {
                        m.is_event("OriginateResponse") && m.action_id() == Some(action_id.as_str())
                    })
                    .await;
                match event.ok().as_ref().and_then(super::outcome) {
                    Some((request_id, o)) => {
                        if o.is_success() {
                            tracing::info!(call_id = %request_id, "click-to-call: {}", o.describe());
                        } else {
                            warn!(call_id = %request_id, "click-to-call failed: {}", o.describe());
                        }
                        if let Some(sink) = sink {
                            sink(request_id, o);
                        }
                    }
                    None => warn!(%action_id, ?limit, "no OriginateResponse from Asterisk in time"),
                }
                session.logoff().await;
            });
            Ok(response)
        })
    }
}
