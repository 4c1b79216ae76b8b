//! The long-lived AMI client: connect, log in, send actions with ActionIDs and match
//! the responses, deliver events in order, keep the link alive and reconnect.
//!
//! One task owns the socket. Callers talk to it through a cheap, cloneable
//! [`AmiHandle`]; events go to one consumer through a bounded channel:
//!
//! ```no_run
//! # async fn demo(config: kolokol::ami::AmiConfig) -> Result<(), kolokol::ami::AmiError> {
//! use kolokol::ami::{AmiClient, AmiEvent, Message};
//! let (ami, mut events) = AmiClient::spawn(config);
//! ami.wait_connected().await?;
//! let list = ami.action(Message::from_pairs(&[("Action", "CoreShowChannels")])).await?;
//! println!("{} channels", list.events.len());
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         AmiEvent::Message(m) => println!("{:?}", m.event()),
//!         AmiEvent::Reconnected => { /* resync: CoreShowChannels */ }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Back-pressure: when the consumer lags, up to `queue_capacity` messages wait in the
//! channel and as many again inside the task; beyond that the task stops reading the
//! socket (TCP flow control) instead of growing memory. Actions keep being sent and
//! their responses matched while there is room.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures::{FutureExt, StreamExt};
use md5::{Digest, Md5};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::codec::FramedRead;

use super::codec::{AmiCodec, Frame, Malformed};
use super::config::{AmiAuth, AmiConfig};
use super::message::Message;

/// Most list items one action may collect (a PBX with this many live channels is
/// beyond what one connector serves; the rest are dropped with a warning).
const MAX_LIST_ITEMS: usize = 200_000;
/// How many malformed frames per connection are logged with a sample before the log
/// thins out to one in [`MALFORMED_LOG_EVERY`].
const MALFORMED_LOG_FIRST: u64 = 10;
const MALFORMED_LOG_EVERY: u64 = 1000;
/// Sessions that lasted at least this long reset the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// What the consumer (the call tracker) receives, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum AmiEvent {
    /// First successful login. `banner` is e.g. `Asterisk Call Manager/13.0.0`.
    Connected { banner: String },
    /// An event (or an unsolicited message) from Asterisk, in wire order.
    Message(Message),
    /// Logged in again after a lost link: events in between are gone, resync with
    /// `CoreShowChannels`.
    Reconnected,
    /// The link is down (or a connect/login attempt failed); the client keeps retrying.
    Disconnected { reason: String },
}

/// The link as seen from outside; see [`AmiHandle::state`].
#[derive(Debug, Clone, PartialEq)]
pub enum LinkState {
    /// Connecting or logging in (nothing has succeeded or failed yet).
    Connecting,
    /// Logged in.
    Up { banner: String },
    /// The last attempt failed or the link was lost; retrying after a backoff.
    Down { error: AmiError },
    /// [`AmiHandle::shutdown`] was called (or every handle was dropped).
    Stopped,
}

/// Everything that can go wrong talking to AMI. Messages say what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AmiError {
    #[error(
        "cannot connect to AMI at {addr}: {reason} (is Asterisk running and manager.conf `enabled = yes`, `port`/`bindaddr` right?)"
    )]
    Connect { addr: String, reason: String },
    #[error(
        "AMI login refused for user '{user}' at {addr} (Asterisk said: {message}): check [ami] username/secret in the kolokol config and the [{user}] section of /etc/asterisk/manager.conf (secret, permit/deny)"
    )]
    LoginRefused {
        user: String,
        addr: String,
        message: String,
    },
    #[error("AMI at {addr} did not answer within {timeout:?} while {during}")]
    Timeout {
        addr: String,
        during: String,
        timeout: Duration,
    },
    #[error("AMI connection to {addr} lost: {reason}")]
    Io { addr: String, reason: String },
    #[error("AMI protocol error from {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("not connected to AMI ({reason})")]
    NotConnected { reason: String },
    #[error("the AMI connection was lost before the response to {action} arrived")]
    ConnectionLost { action: String },
    #[error("no response to AMI action {action} within {timeout:?}")]
    ActionTimeout { action: String, timeout: Duration },
    #[error("invalid AMI action: {0}")]
    InvalidAction(String),
    #[error("the AMI client has shut down")]
    Shutdown,
}

/// The answer to one action.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionResponse {
    /// The ActionID the action went out with (the caller's own, or one assigned).
    pub action_id: String,
    /// The `Response:` message.
    pub response: Message,
    /// For list actions (`EventList: start`): the list's events, in order.
    pub events: Vec<Message>,
    /// For list actions: the closing `...Complete` event.
    pub complete: Option<Message>,
}

impl ActionResponse {
    /// `Response: Success` (or the old `Follows` for command output).
    pub fn is_success(&self) -> bool {
        self.response
            .response()
            .is_some_and(|r| r.eq_ignore_ascii_case("Success") || r.eq_ignore_ascii_case("Follows"))
    }

    /// The `Message:` text, e.g. `Permission denied`.
    pub fn message(&self) -> Option<&str> {
        self.response.get("Message")
    }
}

/// Counters for health checks and metrics.
#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    malformed: AtomicU64,
    reconnects: AtomicU64,
}

/// A snapshot of the client's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmiStats {
    /// Messages received (events and responses).
    pub messages: u64,
    /// Frames skipped as malformed (over-long, not UTF-8).
    pub malformed: u64,
    /// Successful logins after the first.
    pub reconnects: u64,
}

enum Command {
    Action {
        msg: Message,
        reply: oneshot::Sender<Result<ActionResponse, AmiError>>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Entry point: [`AmiClient::spawn`].
pub struct AmiClient;

impl AmiClient {
    /// Start the client task (needs a tokio runtime). It connects at once and keeps
    /// reconnecting until [`AmiHandle::shutdown`] or until every handle is dropped.
    /// Events arrive on the returned receiver, in order; dropping the receiver is
    /// allowed (events are then discarded, actions still work).
    pub fn spawn(config: AmiConfig) -> (AmiHandle, mpsc::Receiver<AmiEvent>) {
        let capacity = config.queue_capacity.max(16);
        let (events_tx, events_rx) = mpsc::channel(capacity);
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
        let counters = Arc::new(Counters::default());
        let handle = AmiHandle {
            cmd_tx,
            state_rx,
            counters: counters.clone(),
            action_timeout: config.action_timeout,
        };
        let task = Task {
            config,
            events_tx,
            outq: VecDeque::new(),
            outq_max: capacity,
            consumer_gone: false,
            state_tx,
            counters,
            next_id: 1,
        };
        tokio::spawn(task.run(cmd_rx));
        (handle, events_rx)
    }
}

/// Cheap to clone; every clone talks to the same connection.
#[derive(Clone)]
pub struct AmiHandle {
    cmd_tx: mpsc::Sender<Command>,
    state_rx: watch::Receiver<LinkState>,
    counters: Arc<Counters>,
    action_timeout: Duration,
}

impl std::fmt::Debug for AmiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmiHandle")
            .field("state", &*self.state_rx.borrow())
            .finish()
    }
}

impl AmiHandle {
    /// Send an action and wait for its response (and, for list actions, the whole
    /// list). An `ActionID` in `msg` is kept; otherwise a unique one is assigned.
    /// Fails fast with [`AmiError::NotConnected`] while the link is down, so callers
    /// (click-to-call) can report instead of hanging.
    pub async fn action(&self, msg: Message) -> Result<ActionResponse, AmiError> {
        let name = msg.get("Action").unwrap_or("").to_string();
        validate_action(&msg)?;
        let (reply, rx) = oneshot::channel();
        self.cmd_tx
            .send(Command::Action { msg, reply })
            .await
            .map_err(|_| AmiError::Shutdown)?;
        match timeout(self.action_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AmiError::Shutdown),
            Err(_) => Err(AmiError::ActionTimeout {
                action: name,
                timeout: self.action_timeout,
            }),
        }
    }

    /// The current link state.
    pub fn state(&self) -> LinkState {
        self.state_rx.borrow().clone()
    }

    /// A receiver that sees every link state change (for health endpoints).
    pub fn watch_state(&self) -> watch::Receiver<LinkState> {
        self.state_rx.clone()
    }

    /// Wait for the outcome of the current connection attempt: the banner once logged
    /// in, or the error of the attempt that failed (the client keeps retrying in the
    /// background either way).
    pub async fn wait_connected(&self) -> Result<String, AmiError> {
        let mut rx = self.state_rx.clone();
        let state = rx
            .wait_for(|s| !matches!(s, LinkState::Connecting))
            .await
            .map_err(|_| AmiError::Shutdown)?
            .clone();
        match state {
            LinkState::Up { banner } => Ok(banner),
            LinkState::Down { error } => Err(error),
            LinkState::Stopped | LinkState::Connecting => Err(AmiError::Shutdown),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> AmiStats {
        AmiStats {
            messages: self.counters.messages.load(Ordering::Relaxed),
            malformed: self.counters.malformed.load(Ordering::Relaxed),
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Log off (when connected) and stop the task; the event channel then closes.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.cmd_tx.send(Command::Shutdown { done }).await.is_ok() {
            // Bounded: the task answers within one action timeout at worst.
            let _ = timeout(self.action_timeout + Duration::from_secs(1), rx).await;
        }
    }
}

/// Reject actions that would break the framing (a CR/LF in a value could smuggle in
/// a second action, e.g. from a phone number typed into a CRM).
fn validate_action(msg: &Message) -> Result<(), AmiError> {
    if msg.get("Action").is_none_or(|a| a.is_empty()) {
        return Err(AmiError::InvalidAction("no `Action:` field".into()));
    }
    for (k, v) in msg.fields() {
        if k.is_empty() || k.bytes().any(|b| b == b':' || b == b'\r' || b == b'\n') {
            return Err(AmiError::InvalidAction(format!("bad key {k:?}")));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(AmiError::InvalidAction(format!(
                "value of {k} contains a line break"
            )));
        }
    }
    Ok(())
}

/// Wire form of an action with `action_id`: `Action` first, then `ActionID`, then the
/// rest in order (any ActionID in `msg` is replaced).
fn action_wire(msg: &Message, action_id: &str, out: &mut BytesMut) {
    let action = msg.get("Action").unwrap_or("");
    out.extend_from_slice(b"Action: ");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\r\nActionID: ");
    out.extend_from_slice(action_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut skipped_action = false;
    for (k, v) in msg.fields() {
        if k.eq_ignore_ascii_case("ActionID") {
            continue;
        }
        if !skipped_action && k.eq_ignore_ascii_case("Action") {
            skipped_action = true;
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `md5hex(challenge + secret)`, the `Key` of an MD5 login.
pub fn md5_key(challenge: &str, secret: &str) -> String {
    let mut h = Md5::new();
    h.update(challenge.as_bytes());
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Reader = FramedRead<ReadHalf<Box<dyn Io>>, AmiCodec>;
type Writer = WriteHalf<Box<dyn Io>>;

/// Who is waiting for a response.
enum Waiter {
    Caller(oneshot::Sender<Result<ActionResponse, AmiError>>),
    /// Our own keepalive Ping: nobody waits.
    Keepalive,
}

struct Pending {
    action: String,
    waiter: Waiter,
    /// Set once `EventList: start` arrived: the response, then items.
    list: Option<(Message, Vec<Message>)>,
}

/// Why a session ended.
enum SessionEnd {
    Lost(AmiError),
    Stop,
}

struct Task {
    config: AmiConfig,
    events_tx: mpsc::Sender<AmiEvent>,
    /// Messages waiting for room in the channel (keeps the socket read while the
    /// consumer catches up; bounded by `outq_max`).
    outq: VecDeque<AmiEvent>,
    outq_max: usize,
    consumer_gone: bool,
    state_tx: watch::Sender<LinkState>,
    counters: Arc<Counters>,
    next_id: u64,
}

impl Task {
    async fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        let mut attempt: u32 = 0;
        let mut ever_up = false;
        let addr = self.config.addr();
        loop {
            self.state_tx.send_replace(LinkState::Connecting);
            let (end, lasted) = match self.connect_and_login().await {
                Ok((reader, writer, banner, early)) => {
                    tracing::info!(ami = %addr, user = %self.config.username, %banner, "AMI logged in");
                    if ever_up {
                        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.push(AmiEvent::Reconnected);
                    } else {
                        self.push(AmiEvent::Connected {
                            banner: banner.clone(),
                        });
                    }
                    ever_up = true;
                    for m in early {
                        self.push(AmiEvent::Message(m));
                    }
                    self.state_tx.send_replace(LinkState::Up { banner });
                    let started = Instant::now();
                    let end = self.session(&mut cmd_rx, reader, writer).await;
                    (end, started.elapsed())
                }
                Err(e) => (SessionEnd::Lost(e), Duration::ZERO),
            };
            let error = match end {
                SessionEnd::Stop => break,
                SessionEnd::Lost(e) => e,
            };
            if lasted >= STABLE_SESSION {
                attempt = 0;
            }
            match &error {
                AmiError::LoginRefused { .. } => {
                    tracing::error!(ami = %addr, user = %self.config.username, "{error}")
                }
                _ => tracing::warn!(ami = %addr, "{error}"),
            }
            self.push(AmiEvent::Disconnected {
                reason: error.to_string(),
            });
            self.state_tx.send_replace(LinkState::Down { error });
            let delay = backoff(
                attempt,
                self.config.reconnect_min,
                self.config.reconnect_max,
            );
            attempt = attempt.saturating_add(1);
            tracing::info!(ami = %addr, delay_ms = delay.as_millis() as u64, "AMI reconnect scheduled");
            if self.wait_backoff(&mut cmd_rx, delay).await {
                break;
            }
        }
        self.state_tx.send_replace(LinkState::Stopped);
        // Hand the consumer whatever is still queued, then close the channel.
        if !self.consumer_gone {
            while let Some(ev) = self.outq.pop_front() {
                if self.events_tx.send(ev).await.is_err() {
                    break;
                }
            }
        }
    }

    /// Queue an event for the consumer, sending at once when the channel has room.
    fn push(&mut self, ev: AmiEvent) {
        if self.consumer_gone {
            return;
        }
        self.outq.push_back(ev);
        self.flush();
    }

    fn flush(&mut self) {
        while let Some(ev) = self.outq.pop_front() {
            match self.events_tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.outq.push_front(ev);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.consumer_gone = true;
                    self.outq.clear();
                    return;
                }
            }
        }
    }

    /// Sleep through a backoff while still answering callers. True = stop.
    async fn wait_backoff(
        &mut self,
        cmd_rx: &mut mpsc::Receiver<Command>,
        delay: Duration,
    ) -> bool {
        let deadline = Instant::now() + delay;
        let events_tx = self.events_tx.clone();
        loop {
            let want_room = !self.outq.is_empty() && !self.consumer_gone;
            tokio::select! {
                _ = sleep_until(deadline) => return false,
                cmd = cmd_rx.recv() => match cmd {
                    None => return true,
                    Some(Command::Shutdown { done }) => {
                        let _ = done.send(());
                        return true;
                    }
                    Some(Command::Action { reply, .. }) => {
                        let reason = match &*self.state_tx.borrow() {
                            LinkState::Down { error } => error.to_string(),
                            _ => "reconnecting".to_string(),
                        };
                        let _ = reply.send(Err(AmiError::NotConnected { reason }));
                    }
                },
                permit = events_tx.reserve(), if want_room => match permit {
                    Ok(p) => {
                        if let Some(ev) = self.outq.pop_front() { p.send(ev); }
                        self.flush();
                    }
                    Err(_) => { self.consumer_gone = true; self.outq.clear(); }
                },
            }
        }
    }

    fn new_action_id(&mut self) -> String {
        let id = format!("kolokol-{}", self.next_id);
        self.next_id += 1;
        id
    }

    /// TCP connect, banner, login, optional Events/Filter setup. Returns the split
    /// stream, the banner and any events that arrived during the exchange.
    async fn connect_and_login(
        &mut self,
    ) -> Result<(Reader, Writer, String, Vec<Message>), AmiError> {
        let addr = self.config.addr();
        let tcp = match timeout(self.config.connect_timeout, TcpStream::connect(&addr)).await {
            Err(_) => {
                return Err(AmiError::Timeout {
                    addr,
                    during: "connecting".into(),
                    timeout: self.config.connect_timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(AmiError::Connect {
                    addr,
                    reason: e.to_string(),
                });
            }
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let boxed: Box<dyn Io> = Box::new(tcp);
        let (r, w) = tokio::io::split(boxed);
        let mut reader = FramedRead::with_capacity(r, AmiCodec::new(), 64 * 1024);
        let mut writer = w;
        let limit = self.config.action_timeout;
        let mut hs = Handshake {
            addr: addr.clone(),
            early: Vec::new(),
            counters: self.counters.clone(),
            malformed_seen: 0,
        };
        let result = timeout(limit, async {
            let banner = hs.banner(&mut reader).await?;
            let user = self.config.username.clone();
            let login = match self.config.auth {
                AmiAuth::Plain => Message::from_pairs(&[
                    ("Action", "Login"),
                    ("Username", user.as_str()),
                    ("Secret", self.config.secret.as_str()),
                ]),
                AmiAuth::Md5 => {
                    let id = self.new_action_id();
                    let challenge =
                        Message::from_pairs(&[("Action", "Challenge"), ("AuthType", "MD5")]);
                    let resp = hs
                        .exchange(&mut reader, &mut writer, &challenge, &id)
                        .await?;
                    let Some(ch) = resp.get("Challenge").filter(|_| is_success(&resp)) else {
                        return Err(AmiError::LoginRefused {
                            user,
                            addr: addr.clone(),
                            message: format!(
                                "MD5 challenge refused: {}",
                                resp.get("Message")
                                    .unwrap_or("no Challenge in the response")
                            ),
                        });
                    };
                    let key = md5_key(ch, &self.config.secret);
                    Message::from_pairs(&[
                        ("Action", "Login"),
                        ("AuthType", "MD5"),
                        ("Username", user.as_str()),
                        ("Key", key.as_str()),
                    ])
                }
            };
            let id = self.new_action_id();
            let resp = hs.exchange(&mut reader, &mut writer, &login, &id).await?;
            if !is_success(&resp) {
                return Err(AmiError::LoginRefused {
                    user,
                    addr: addr.clone(),
                    message: resp.get("Message").unwrap_or("no message").to_string(),
                });
            }
            // Optional event reduction. A refusal is logged, not fatal: events still flow.
            let mut setup = Vec::new();
            for f in &self.config.filters {
                setup.push(Message::from_pairs(&[
                    ("Action", "Filter"),
                    ("Operation", "Add"),
                    ("Filter", f.as_str()),
                ]));
            }
            if let Some(mask) = &self.config.events {
                setup.push(Message::from_pairs(&[
                    ("Action", "Events"),
                    ("EventMask", mask.as_str()),
                ]));
            }
            for action in setup {
                if let Err(e) = validate_action(&action) {
                    tracing::warn!(ami = %addr, "AMI setup skipped: {e}");
                    continue;
                }
                let id = self.new_action_id();
                let resp = hs.exchange(&mut reader, &mut writer, &action, &id).await?;
                if !is_success(&resp) {
                    tracing::warn!(
                        ami = %addr,
                        action = action.get("Action").unwrap_or(""),
                        message = resp.get("Message").unwrap_or(""),
                        "AMI setup action refused; events stay unfiltered"
                    );
                }
            }
            Ok(banner)
        })
        .await;
        match result {
            Err(_) => Err(AmiError::Timeout {
                addr,
                during: "logging in".into(),
                timeout: limit,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(banner)) => Ok((reader, writer, banner, hs.early)),
        }
    }

    /// The logged-in loop: frames in, actions out, keepalive, consumer delivery.
    async fn session(
        &mut self,
        cmd_rx: &mut mpsc::Receiver<Command>,
        mut reader: Reader,
        mut writer: Writer,
    ) -> SessionEnd {
        let events_tx = self.events_tx.clone();
        let addr = self.config.addr();
        let interval = self.config.ping_interval.max(Duration::from_millis(10));
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut ping_at = Instant::now() + interval;
        let mut last_rx = Instant::now();
        let mut malformed_seen = 0u64;
        let mut out = BytesMut::with_capacity(512);
        let end = loop {
            let room = self.consumer_gone || self.outq.len() < self.outq_max;
            let want_room = !self.outq.is_empty() && !self.consumer_gone;
            let dead_at = last_rx + interval * 2;
            tokio::select! {
                biased;
                permit = events_tx.reserve(), if want_room => match permit {
                    Ok(p) => {
                        if let Some(ev) = self.outq.pop_front() { p.send(ev); }
                        self.flush();
                    }
                    Err(_) => { self.consumer_gone = true; self.outq.clear(); }
                },
                cmd = cmd_rx.recv() => match cmd {
                    None => {
                        self.logoff(&mut reader, &mut writer).await;
                        break SessionEnd::Stop;
                    }
                    Some(Command::Shutdown { done }) => {
                        self.logoff(&mut reader, &mut writer).await;
                        let _ = done.send(());
                        break SessionEnd::Stop;
                    }
                    Some(Command::Action { msg, reply }) => {
                        let id = match msg.action_id() {
                            Some(id) if !id.is_empty() => {
                                if pending.contains_key(id) {
                                    let _ = reply.send(Err(AmiError::InvalidAction(format!("ActionID {id} is already waiting for a response"))));
                                    continue;
                                }
                                id.to_string()
                            }
                            _ => self.new_action_id(),
                        };
                        out.clear();
                        action_wire(&msg, &id, &mut out);
                        let action = msg.get("Action").unwrap_or("").to_string();
                        if let Err(e) = self.write(&mut writer, &out).await {
                            let _ = reply.send(Err(AmiError::ConnectionLost { action }));
                            break SessionEnd::Lost(e);
                        }
                        pending.insert(id, Pending { action, waiter: Waiter::Caller(reply), list: None });
                    }
                },
                _ = sleep_until(ping_at) => {
                    ping_at = Instant::now() + interval;
                    // Callers that gave up (timed out) no longer need their slot.
                    pending.retain(|_, p| match &p.waiter {
                        Waiter::Caller(tx) => !tx.is_closed(),
                        Waiter::Keepalive => true,
                    });
                    let id = self.new_action_id();
                    out.clear();
                    action_wire(&Message::from_pairs(&[("Action", "Ping")]), &id, &mut out);
                    if let Err(e) = self.write(&mut writer, &out).await {
                        break SessionEnd::Lost(e);
                    }
                    pending.insert(id, Pending { action: "Ping".into(), waiter: Waiter::Keepalive, list: None });
                    // Unanswered keepalives from long ago would pile up on a server
                    // that ignores Ping; keep only a few.
                    if pending.len() > 10_000 {
                        pending.retain(|_, p| !matches!(p.waiter, Waiter::Keepalive));
                    }
                },
                // After commands and the keepalive so a flood of events never delays them.
                frame = reader.next(), if room => {
                    last_rx = Instant::now();
                    let mut frame = frame;
                    // Handle what is already buffered without going back through
                    // select (one wake-up per read, not per message).
                    let mut budget = 512u32;
                    let lost = loop {
                        match frame {
                            None => break Some(AmiError::Io { addr: addr.clone(), reason: "connection closed by Asterisk".into() }),
                            Some(Err(e)) => break Some(AmiError::Io { addr: addr.clone(), reason: e.to_string() }),
                            Some(Ok(Frame::Message(m))) => {
                                self.counters.messages.fetch_add(1, Ordering::Relaxed);
                                self.on_message(m, &mut pending);
                            }
                            Some(Ok(Frame::Malformed(bad))) => {
                                malformed_seen += 1;
                                note_malformed(&self.counters, &addr, &bad, malformed_seen);
                            }
                            Some(Ok(Frame::Banner(b))) => tracing::debug!(ami = %addr, banner = %b, "second banner ignored"),
                        }
                        budget -= 1;
                        if budget == 0 || !(self.consumer_gone || self.outq.len() < self.outq_max) {
                            break None;
                        }
                        match reader.next().now_or_never() {
                            Some(next) => frame = next,
                            None => break None,
                        }
                    };
                    if let Some(e) = lost {
                        break SessionEnd::Lost(e);
                    }
                },
                _ = sleep_until(dead_at) => {
                    if !room {
                        // We stopped reading ourselves (consumer lagging): silence is ours.
                        last_rx = Instant::now();
                        continue;
                    }
                    break SessionEnd::Lost(AmiError::Timeout {
                        addr: addr.clone(),
                        during: format!("keeping the link alive (nothing received for {:?}, Ping unanswered)", interval * 2),
                        timeout: interval * 2,
                    });
                },
            }
        };
        for (_, p) in pending.drain() {
            if let Waiter::Caller(tx) = p.waiter {
                let _ = tx.send(Err(AmiError::ConnectionLost { action: p.action }));
            }
        }
        end
    }

    async fn write(&self, writer: &mut Writer, bytes: &[u8]) -> Result<(), AmiError> {
        let addr = self.config.addr();
        match timeout(self.config.action_timeout, writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AmiError::Io {
                addr,
                reason: e.to_string(),
            }),
            Err(_) => Err(AmiError::Timeout {
                addr,
                during: "sending an action (socket not writable)".into(),
                timeout: self.config.action_timeout,
            }),
        }
    }

    /// Best effort `Logoff`, waiting briefly for the Goodbye.
    async fn logoff(&mut self, reader: &mut Reader, writer: &mut Writer) {
        let id = self.new_action_id();
        let mut out = BytesMut::new();
        action_wire(&Message::from_pairs(&[("Action", "Logoff")]), &id, &mut out);
        if self.write(writer, &out).await.is_err() {
            return;
        }
        let _ = timeout(Duration::from_secs(1), async {
            while let Some(Ok(frame)) = reader.next().await {
                if let Frame::Message(m) = frame
                    && m.event().is_none()
                    && m.action_id() == Some(id.as_str())
                {
                    break;
                }
            }
        })
        .await;
        let _ = writer.shutdown().await;
    }

    fn on_message(&mut self, m: Message, pending: &mut HashMap<String, Pending>) {
        if m.event().is_some() {
            // List items carry the ActionID of the list action.
            if let Some(id) = m.action_id()
                && let Some(p) = pending.get_mut(id)
                && let Some((_, items)) = p.list.as_mut()
            {
                let last = m.get("EventList").is_some_and(|v| {
                    v.eq_ignore_ascii_case("Complete") || v.eq_ignore_ascii_case("Cancelled")
                });
                if !last {
                    if items.len() < MAX_LIST_ITEMS {
                        items.push(m);
                    } else if items.len() == MAX_LIST_ITEMS {
                        tracing::warn!(action = %p.action, "AMI list longer than {MAX_LIST_ITEMS} items; the rest is dropped");
                    }
                    return;
                }
                let id = id.to_string();
                if let Some(p) = pending.remove(&id)
                    && let (Waiter::Caller(tx), Some((response, events))) = (p.waiter, p.list)
                {
                    let _ = tx.send(Ok(ActionResponse {
                        action_id: id,
                        response,
                        events,
                        complete: Some(m),
                    }));
                }
                return;
            }
            self.push(AmiEvent::Message(m));
            return;
        }
        if m.response().is_none() {
            // Neither event nor response: pass it on rather than lose it.
            self.push(AmiEvent::Message(m));
            return;
        }
        let Some(id) = m.action_id().map(str::to_string) else {
            tracing::debug!("AMI response without ActionID ignored");
            return;
        };
        let Some(p) = pending.get_mut(&id) else {
            tracing::debug!(action_id = %id, "AMI response for an action nobody waits for (late or foreign)");
            return;
        };
        if m.get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("start"))
        {
            p.list = Some((m, Vec::new()));
            return;
        }
        if let Some(p) = pending.remove(&id) {
            match p.waiter {
                Waiter::Caller(tx) => {
                    let _ = tx.send(Ok(ActionResponse {
                        action_id: id,
                        response: m,
                        events: Vec::new(),
                        complete: None,
                    }));
                }
                Waiter::Keepalive => {}
            }
        }
    }
}

fn is_success(m: &Message) -> bool {
    m.response()
        .is_some_and(|r| r.eq_ignore_ascii_case("Success"))
}

fn note_malformed(counters: &Counters, addr: &str, bad: &Malformed, seen: u64) {
    let total = counters.malformed.fetch_add(1, Ordering::Relaxed) + 1;
    if seen <= MALFORMED_LOG_FIRST || seen.is_multiple_of(MALFORMED_LOG_EVERY) {
        tracing::warn!(
            ami = %addr,
            reason = %bad.reason,
            bytes_skipped = bad.bytes_skipped,
            sample = %bad.sample,
            malformed_total = total,
            "AMI frame skipped"
        );
    }
}

/// The banner + login exchange, before the session loop exists.
struct Handshake {
    addr: String,
    early: Vec<Message>,
    counters: Arc<Counters>,
    malformed_seen: u64,
}

impl Handshake {
    async fn next(&mut self, reader: &mut Reader) -> Result<Frame, AmiError> {
        match reader.next().await {
            None => Err(AmiError::Io {
                addr: self.addr.clone(),
                reason: "connection closed by Asterisk".into(),
            }),
            Some(Err(e)) => Err(AmiError::Io {
                addr: self.addr.clone(),
                reason: e.to_string(),
            }),
            Some(Ok(f)) => Ok(f),
        }
    }

    async fn banner(&mut self, reader: &mut Reader) -> Result<String, AmiError> {
        let got = match self.next(reader).await? {
            Frame::Banner(b) => return Ok(b),
            Frame::Malformed(bad) => {
                self.malformed_seen += 1;
                note_malformed(&self.counters, &self.addr, &bad, self.malformed_seen);
                format!("{:?}", bad.sample)
            }
            Frame::Message(m) => format!("a message {m:?}"),
        };
        Err(AmiError::Protocol {
            addr: self.addr.clone(),
            reason: format!(
                "expected the `Asterisk Call Manager/...` banner, got {got} (is this port AMI?)"
            ),
        })
    }

    /// Send one action and read until its response; events in between are kept.
    async fn exchange(
        &mut self,
        reader: &mut Reader,
        writer: &mut Writer,
        msg: &Message,
        id: &str,
    ) -> Result<Message, AmiError> {
        let mut out = BytesMut::new();
        action_wire(msg, id, &mut out);
        writer.write_all(&out).await.map_err(|e| AmiError::Io {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })?;
        loop {
            match self.next(reader).await? {
                Frame::Message(m) => {
                    self.counters.messages.fetch_add(1, Ordering::Relaxed);
                    if m.event().is_none() && m.action_id() == Some(id) {
                        return Ok(m);
                    }
                    if m.event().is_some() && self.early.len() < 10_000 {
                        self.early.push(m);
                    }
                }
                Frame::Malformed(bad) => {
                    self.malformed_seen += 1;
                    note_malformed(&self.counters, &self.addr, &bad, self.malformed_seen);
                }
                Frame::Banner(_) => {}
            }
        }
    }
}

/// Exponential backoff with jitter: `min * 2^attempt`, capped at `max`, then a random
/// point in the upper half so a fleet of clients does not reconnect in lockstep.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let min = min.max(Duration::from_millis(1));
    let max = max.max(min);
    let exp = min.saturating_mul(1u32 << attempt.min(20));
    let capped = exp.min(max);
    let half = capped / 2;
    let jitter = rand::thread_rng().gen_range(0..=half.as_millis() as u64);
    half + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_key_matches_the_recorded_login() {
        // 14c-md5-challenge-login: challenge 205788030, secret crm-secret-123.
        assert_eq!(
            md5_key("205788030", "crm-secret-123"),
            "ee02db17164e6c94d290bf6d5fc96959"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        for attempt in 0..40 {
            let d = backoff(attempt, min, max);
            assert!(d <= max, "{d:?}");
            assert!(d >= Duration::from_millis(250), "{d:?}");
        }
        assert!(backoff(10, min, max) >= Duration::from_secs(15));
    }

    #[test]
    fn action_wire_puts_action_and_id_first_and_replaces_ids() {
        let msg = Message::from_pairs(&[
            ("Channel", "PJSIP/101"),
            ("Action", "Originate"),
            ("ActionID", "old"),
            ("Variable", "A=1"),
            ("Variable", "B=2"),
        ]);
        let mut out = BytesMut::new();
        action_wire(&msg, "x-1", &mut out);
        assert_eq!(
            &out[..],
            b"Action: Originate\r\nActionID: x-1\r\nChannel: PJSIP/101\r\nVariable: A=1\r\nVariable: B=2\r\n\r\n"
        );
    }

    #[test]
    fn line_breaks_in_values_are_rejected() {
        let msg = Message::from_pairs(&[
            ("Action", "Originate"),
            ("Exten", "1\r\n\r\nAction: Logoff"),
        ]);
        assert!(matches!(
            validate_action(&msg),
            Err(AmiError::InvalidAction(_))
        ));
        let msg = Message::from_pairs(&[("Exten", "1")]);
        assert!(validate_action(&msg).is_err());
    }
}
