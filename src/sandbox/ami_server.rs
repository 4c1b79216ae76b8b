//! A fake Asterisk Manager Interface on a real TCP listener, speaking like the
//! recordings in `tests/fixtures/ami/`: the banner, Login (plain and MD5 challenge;
//! success, failure with the server closing, read-only users getting
//! `Permission denied`), Challenge, Ping, CoreShowChannels (from the channels this
//! connection has seen), Command, Originate, Events, Filter, Logoff, and unknown
//! actions answered like Asterisk does.
//!
//! Events come from recordings: a [`Replay`] holds a fixture's event bytes (byte
//! exact, optionally with the recorded chunking and timing, optionally with fresh
//! Uniqueids/Linkedids/channel names so the same call can be replayed again and again).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions, Replay};
//! let fake = FakeAmi::start(FakeAmiOptions::default()).await?;
//! let addr = fake.local_addr(); // point AmiConfig host/port here; user crm / crm-secret-123
//! fake.wait_logged_in(1, std::time::Duration::from_secs(5)).await;
//! let call = Replay::from_fixture("tests/fixtures/ami/01-inbound-answered-recorded.ami")?
//!     .fresh_ids(true);
//! fake.play(&call).await; // every logged-in session gets the call's events
//! fake.drop_connections(); // simulate Asterisk restarting
//! # Ok(()) }
//! ```
//!
//! Sandbox only: never used by production paths. Still robust: a misbehaving client
//! (garbage, huge frames) gets skipped frames, not a crashed server.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use regex::bytes::Regex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, FramedRead};

use crate::ami::Message;
use crate::ami::client::md5_key;
use crate::ami::codec::{AmiCodec, Frame};

/// The recorded banner (AMI protocol version of Asterisk 22/master).
pub const BANNER: &str = "Asterisk Call Manager/13.0.0";
/// The challenge recorded in fixture 14c.
pub const CHALLENGE: &str = "205788030";
/// The version line recorded in fixture 14 (`core show version`).
pub const VERSION: &str = "Asterisk GIT-master-f0c1c1a7b7 built by root @ vm on a x86_64 running Linux on 2026-11-21 23:32:14 UTC";
/// Most actions kept in the log returned by [`FakeAmi::actions`].
const ACTION_LOG_MAX: usize = 10_000;

/// One manager.conf user.
#[derive(Debug, Clone)]
pub struct FakeUser {
    pub username: String,
    pub secret: String,
    /// `write =` empty: Originate, CoreShowChannels and Command are denied.
    pub read_only: bool,
}

impl FakeUser {
    pub fn new(username: &str, secret: &str, read_only: bool) -> Self {
        FakeUser {
            username: username.into(),
            secret: secret.into(),
            read_only,
        }
    }
}

/// How the fake server behaves.
#[derive(Debug, Clone)]
pub struct FakeAmiOptions {
    /// Where to listen; the default is an ephemeral port on loopback.
    pub bind: SocketAddr,
    pub banner: String,
    /// Defaults: the recorded users `crm` / `crm-secret-123` (read/write) and
    /// `crm-ro` / `ro-secret-456` (read-only).
    pub users: Vec<FakeUser>,
    /// The number answered to `Action: Challenge`.
    pub challenge: String,
    /// Streamed to every session right after a successful login.
    pub on_login: Option<Replay>,
    /// Send `FullyBooted` after the login response, as Asterisk does.
    pub fully_booted: bool,
    /// Follow the channels in the events sent to each session, so CoreShowChannels
    /// lists the live ones (costs a parse of everything sent; benchmarks turn it off).
    pub track_channels: bool,
}

impl Default for FakeAmiOptions {
    fn default() -> Self {
        FakeAmiOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            banner: BANNER.into(),
            users: vec![
                FakeUser::new("crm", "crm-secret-123", false),
                FakeUser::new("crm-ro", "ro-secret-456", true),
            ],
            challenge: CHALLENGE.into(),
            on_login: None,
            fully_booted: true,
            track_channels: true,
        }
    }
}

/// A slice of event bytes and when to send it (relative to the start of the replay).
#[derive(Debug, Clone)]
struct Chunk {
    at: Duration,
    bytes: Bytes,
}

/// The events of a recording, ready to stream.
#[derive(Debug, Clone)]
pub struct Replay {
    /// All kept event bytes, in order.
    bytes: Bytes,
    /// Cut points and times in `bytes` (from the `.timeline`), if known.
    cuts: Vec<(usize, Duration)>,
    events: usize,
    timed: bool,
    speed: f64,
    fresh_ids: bool,
}

impl Replay {
    /// Read `NN-name.ami` and, if present, `NN-name.timeline` next to it.
    pub fn from_fixture(path: impl AsRef<Path>) -> std::io::Result<Replay> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)?;
        let timeline = std::fs::read_to_string(path.with_extension("timeline")).ok();
        Ok(Replay::from_ami_bytes(&bytes, timeline.as_deref()))
    }

    /// Keep the events of a received byte stream: everything after the banner that is
    /// an `Event:` block without an ActionID (those answered the recorder's actions)
    /// and not `FullyBooted` (the server sends its own per login). `timeline` is the
    /// `.timeline` text: `<seconds> recv <offset> <length>` lines.
    pub fn from_ami_bytes(ami: &[u8], timeline: Option<&str>) -> Replay {
        let mut kept: Vec<(usize, usize)> = Vec::new();
        let mut start = 0usize;
        let mut pos = 0usize;
        let mut first_line = true;
        while pos < ami.len() {
            let end = memchr::memchr(b'\n', &ami[pos..]).map_or(ami.len(), |o| pos + o + 1);
            let line = &ami[pos..end];
            if first_line {
                first_line = false;
                if line.starts_with(b"Asterisk Call Manager") {
                    pos = end;
                    start = end;
                    continue;
                }
            }
            if line == b"\r\n" || line == b"\n" {
                let block = &ami[start..pos];
                if block.starts_with(b"Event:")
                    && memchr::memmem::find(block, b"\nActionID:").is_none()
                    && !block.starts_with(b"Event: FullyBooted")
                {
                    kept.push((start, end));
                }
                start = end;
            }
            pos = end;
        }
        let mut bytes = BytesMut::new();
        for (s, e) in &kept {
            bytes.extend_from_slice(&ami[*s..*e]);
        }
        // Map recorded read chunks onto the kept bytes.
        let mut cuts = Vec::new();
        if let Some(tl) = timeline {
            let mut recv: Vec<(f64, usize, usize)> = tl
                .lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    let t: f64 = it.next()?.parse().ok()?;
                    if it.next()? != "recv" {
                        return None;
                    }
                    let off: usize = it.next()?.parse().ok()?;
                    let len: usize = it.next()?.parse().ok()?;
                    Some((t, off, len))
                })
                .collect();
            recv.sort_by_key(|r| r.1);
            let mut t0: Option<f64> = None;
            let mut new_off = 0usize;
            let mut k = 0usize;
            for (t, off, len) in recv {
                let chunk_end = off.saturating_add(len);
                let mut kept_here = 0usize;
                while k < kept.len() {
                    let (s, e) = kept[k];
                    if s >= chunk_end {
                        break;
                    }
                    let a = s.max(off);
                    let b = e.min(chunk_end);
                    if b > a {
                        kept_here += b - a;
                    }
                    if e <= chunk_end {
                        k += 1;
                    } else {
                        break;
                    }
                }
                if kept_here > 0 {
                    let base = *t0.get_or_insert(t);
                    cuts.push((new_off, Duration::from_secs_f64((t - base).max(0.0))));
                    new_off += kept_here;
                }
            }
        }
        Replay {
            bytes: bytes.freeze(),
            cuts,
            events: kept.len(),
            timed: true,
            speed: 1.0,
            fresh_ids: false,
        }
    }

    /// Raw event bytes (already framed) as a replay without timing.
    pub fn from_event_bytes(bytes: impl Into<Bytes>) -> Replay {
        let bytes = bytes.into();
        let events = crate::ami::codec::parse_messages(&bytes).len();
        Replay {
            bytes,
            cuts: Vec::new(),
            events,
            timed: false,
            speed: 1.0,
            fresh_ids: false,
        }
    }

    /// Keep the recorded chunking and pauses (default true when a timeline exists).
    pub fn timed(mut self, on: bool) -> Self {
        self.timed = on;
        self
    }

    /// Play `factor` times faster than recorded (e.g. 10.0).
    pub fn speed(mut self, factor: f64) -> Self {
        if factor.is_finite() && factor > 0.0 {
            self.speed = factor;
        }
        self
    }

    /// Give every play fresh Uniqueids/Linkedids and channel-name counters, so a
    /// fixture can be replayed repeatedly as new calls.
    pub fn fresh_ids(mut self, on: bool) -> Self {
        self.fresh_ids = on;
        self
    }

    /// The event bytes as recorded.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Number of events.
    pub fn event_count(&self) -> usize {
        self.events
    }

    /// The recorded length of the stream, at the configured speed.
    pub fn duration(&self) -> Duration {
        self.cuts
            .last()
            .map_or(Duration::ZERO, |(_, at)| at.div_f64(self.speed))
    }

    /// The chunks of one play (ids rewritten if asked).
    fn chunks(&self, ids: &IdRewriter) -> Vec<Chunk> {
        let (bytes, map_off): (Bytes, Box<dyn Fn(usize) -> usize>) = if self.fresh_ids {
            let (b, f) = ids.rewrite(&self.bytes);
            (b, Box::new(f))
        } else {
            (self.bytes.clone(), Box::new(|o| o))
        };
        if !self.timed || self.cuts.is_empty() {
            return vec![Chunk {
                at: Duration::ZERO,
                bytes,
            }];
        }
        let mut out = Vec::with_capacity(self.cuts.len());
        for (i, (off, at)) in self.cuts.iter().enumerate() {
            let s = map_off(*off).min(bytes.len());
            let e = self
                .cuts
                .get(i + 1)
                .map_or(bytes.len(), |(o, _)| map_off(*o))
                .min(bytes.len());
            if e > s {
                out.push(Chunk {
                    at: at.div_f64(self.speed),
                    bytes: bytes.slice(s..e),
                });
            }
        }
        out
    }
}

/// Fresh ids for replays: `<epoch>.<seq>` Uniqueids and hex channel counters that
/// never repeat within one server.
struct IdRewriter {
    uniqueid: Regex,
    channel: Regex,
    seq: AtomicU64,
    chan_seq: AtomicU64,
    local_seq: AtomicU64,
    epoch: u64,
}

impl IdRewriter {
    fn new() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1_800_000_000, |d| d.as_secs());
        IdRewriter {
            // Patterns are constants: a failure would be a programming error caught by
            // every test; fall back to never-matching patterns instead of panicking.
            uniqueid: Regex::new(r"\b1\d{9}\.\d{1,9}\b").unwrap_or_else(|_| never()),
            channel: Regex::new(r"((?:PJSIP|SIP|IAX2|DAHDI|Local)/[^\s,;&|]*?)-([0-9a-f]{8})\b")
                .unwrap_or_else(|_| never()),
            seq: AtomicU64::new(1000),
            chan_seq: AtomicU64::new(0x1000),
            local_seq: AtomicU64::new(0x100),
            epoch,
        }
    }

    /// Rewrite `src`; returns the new bytes and a map from old to new offsets (an
    /// offset inside a replaced token moves to its end).
    fn rewrite(&self, src: &[u8]) -> (Bytes, impl Fn(usize) -> usize + use<>) {
        // (old_start, old_end, replacement)
        let mut reps: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        let mut ids: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for m in self.uniqueid.find_iter(src) {
            let new = ids
                .entry(m.as_bytes().to_vec())
                .or_insert_with(|| {
                    let n = self.seq.fetch_add(1, Ordering::Relaxed);
                    format!("{}.{}", self.epoch, n).into_bytes()
                })
                .clone();
            reps.push((m.start(), m.end(), new));
        }
        let mut chans: HashMap<(bool, Vec<u8>), Vec<u8>> = HashMap::new();
        for c in self.channel.captures_iter(src) {
            let (Some(name), Some(hex)) = (c.get(1), c.get(2)) else {
                continue;
            };
            let local = name.as_bytes().starts_with(b"Local/");
            let new = chans
                .entry((local, hex.as_bytes().to_vec()))
                .or_insert_with(|| {
                    let ctr = if local {
                        &self.local_seq
                    } else {
                        &self.chan_seq
                    };
                    format!("{:08x}", ctr.fetch_add(1, Ordering::Relaxed)).into_bytes()
                })
                .clone();
            reps.push((hex.start(), hex.end(), new));
        }
        reps.sort_by_key(|r| r.0);
        let mut out = Vec::with_capacity(src.len() + src.len() / 8);
        let mut offsets: Vec<(usize, usize, isize)> = Vec::with_capacity(reps.len());
        let mut last = 0usize;
        let mut delta: isize = 0;
        for (s, e, new) in reps {
            if s < last {
                continue; // overlapping matches: keep the first
            }
            out.extend_from_slice(&src[last..s]);
            out.extend_from_slice(&new);
            delta += new.len() as isize - (e - s) as isize;
            offsets.push((s, e, delta));
            last = e;
        }
        out.extend_from_slice(&src[last..]);
        let map = move |old: usize| -> usize {
            // Delta of all replacements that end at or before `old`.
            let idx = offsets.partition_point(|(_, e, _)| *e <= old);
            let before = if idx == 0 { 0 } else { offsets[idx - 1].2 };
            match offsets.get(idx) {
                // Inside a replaced token: move to its (new) end.
                Some((s, e, d)) if *s < old => (*e as isize + *d) as usize,
                _ => (old as isize + before) as usize,
            }
        };
        (Bytes::from(out), map)
    }
}

fn never() -> Regex {
    // `[^\s\S]` matches nothing; if even this failed there is nothing sane to do,
    // but Regex::new on it cannot fail.
    match Regex::new(r"[^\s\S]") {
        Ok(r) => r,
        Err(_) => unreachable!("constant regex"),
    }
}

/// What a session's writer is told to do.
enum Out {
    Bytes(Bytes),
    Close,
}

struct SessionCtl {
    tx: mpsc::UnboundedSender<Out>,
    logged_in: bool,
    events_on: Arc<AtomicBool>,
}

struct Inner {
    opts: FakeAmiOptions,
    sessions: Mutex<HashMap<u64, SessionCtl>>,
    next_session: AtomicU64,
    logged_in_tx: watch::Sender<usize>,
    frozen: AtomicBool,
    /// Replays wait while nobody is logged in (see [`FakeAmi::hold_when_alone`]).
    hold: AtomicBool,
    /// Replays wait while set (see [`FakeAmi::pause`]).
    paused: AtomicBool,
    /// The PBX's live channels: everything pushed, whoever was connected (what a
    /// client that reconnects finds with CoreShowChannels).
    pbx_channels: Mutex<Channels>,
    actions_log: Mutex<Vec<Message>>,
    actions_tx: broadcast::Sender<Message>,
    ids: IdRewriter,
    connections: AtomicU64,
    started: Instant,
}

/// A running fake AMI server. Cheap to clone; [`FakeAmi::shutdown`] stops it.
#[derive(Clone)]
pub struct FakeAmi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: Arc<watch::Sender<bool>>,
}

impl FakeAmi {
    /// Bind and start accepting connections.
    pub async fn start(opts: FakeAmiOptions) -> std::io::Result<FakeAmi> {
        let listener = TcpListener::bind(opts.bind).await?;
        let addr = listener.local_addr()?;
        let (logged_in_tx, _) = watch::channel(0usize);
        let (actions_tx, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            opts,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            logged_in_tx,
            frozen: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            pbx_channels: Mutex::new(Channels::new()),
            actions_log: Mutex::new(Vec::new()),
            actions_tx,
            ids: IdRewriter::new(),
            connections: AtomicU64::new(0),
            started: Instant::now(),
        });
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let acc = inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    res = listener.accept() => match res {
                        Ok((stream, peer)) => {
                            acc.connections.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(session(acc.clone(), stream, peer));
                        }
                        Err(e) => {
                            tracing::warn!("fake AMI accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    },
                }
            }
        });
        Ok(FakeAmi {
            inner,
            addr,
            stop: Arc::new(stop_tx),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Send raw bytes (anything: events, garbage, half a message) to every logged-in
    /// session with events on. Returns how many sessions got them.
    pub fn push_bytes(&self, bytes: impl Into<Bytes>) -> usize {
        let bytes = bytes.into();
        lock(&self.inner.pbx_channels).feed(&bytes);
        let sessions = lock(&self.inner.sessions);
        let mut n = 0;
        for s in sessions.values() {
            if s.logged_in
                && s.events_on.load(Ordering::Relaxed)
                && s.tx.send(Out::Bytes(bytes.clone())).is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// Stream a replay to every logged-in session, keeping its timing (if timed).
    /// Returns when the last chunk has been handed over.
    pub async fn play(&self, replay: &Replay) {
        self.play_with(replay, |_| {}).await
    }

    /// Like [`FakeAmi::play`], but first shows `before` all the bytes about to be sent
    /// (ids already rewritten), e.g. to create the recording files they name.
    pub async fn play_with(&self, replay: &Replay, before: impl FnOnce(&[u8])) {
        let start = Instant::now();
        let chunks = replay.chunks(&self.inner.ids);
        let all: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.bytes.iter().copied())
            .collect();
        before(&all);
        let mut late = Duration::ZERO;
        for chunk in chunks {
            // With `hold_when_alone`, what happens while the client is away waits for it
            // (and the rest of the replay shifts by the time spent waiting).
            while self.inner.paused.load(Ordering::Relaxed)
                || (self.inner.hold.load(Ordering::Relaxed) && self.logged_in() == 0)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
                late += Duration::from_millis(5);
            }
            let chunk = Chunk {
                at: chunk.at + late,
                bytes: chunk.bytes,
            };
            tokio::time::sleep_until(start + chunk.at).await;
            self.push_bytes(chunk.bytes);
        }
    }

    /// Make replays wait while no client is logged in, instead of sending into the void:
    /// lets a test kill and restart its client at random points and still expect every
    /// call to be seen (as far as what was sent before the kill was processed).
    pub fn hold_when_alone(&self, on: bool) {
        self.inner.hold.store(on, Ordering::Relaxed);
    }

    /// Hold every replay between two chunks (the PBX goes quiet) until `pause(false)`.
    pub fn pause(&self, on: bool) {
        self.inner.paused.store(on, Ordering::Relaxed);
    }

    /// Close every connection at once (after what was already queued for it), like
    /// an Asterisk restart.
    pub fn drop_connections(&self) {
        let sessions = lock(&self.inner.sessions);
        for s in sessions.values() {
            let _ = s.tx.send(Out::Close);
        }
    }

    /// While frozen the server keeps connections open but sends nothing and answers
    /// nothing (a dead link: a crashed host, a stale NAT entry).
    pub fn freeze(&self, on: bool) {
        self.inner.frozen.store(on, Ordering::Relaxed);
    }

    /// Sessions currently logged in.
    pub fn logged_in(&self) -> usize {
        *self.inner.logged_in_tx.borrow()
    }

    /// TCP connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Wait until at least `n` sessions are logged in; false on timeout.
    pub async fn wait_logged_in(&self, n: usize, limit: Duration) -> bool {
        let mut rx = self.inner.logged_in_tx.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every action received so far (at most the last 10,000), in order.
    pub fn actions(&self) -> Vec<Message> {
        lock(&self.inner.actions_log).clone()
    }

    /// Actions as they arrive (e.g. the demo plays a call when it sees Originate).
    pub fn subscribe_actions(&self) -> broadcast::Receiver<Message> {
        self.inner.actions_tx.subscribe()
    }

    /// Stop accepting and close every connection.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.drop_connections();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another test thread panicked; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn update_logged_in(&self) {
        let n = lock(&self.sessions)
            .values()
            .filter(|s| s.logged_in)
            .count();
        self.logged_in_tx.send_replace(n);
    }
}

/// The `CoreShowChannel` events (and the closing `CoreShowChannelsComplete`) this
/// server would answer to `CoreShowChannels` after pushing `events` (raw AMI event
/// bytes, without banner): the channels still up, each with the snapshot fields its
/// last events carried. For tests that rebuild a tracker mid-call.
pub fn core_show_channels_after(events: &[u8]) -> Vec<Message> {
    let mut ch = Channels::new();
    ch.feed(events);
    crate::ami::codec::parse_messages(&ch.core_show_channels(None))
        .into_iter()
        .filter(|m| m.event().is_some())
        .collect()
}

/// Live channels, from the events pushed through the server.
#[derive(Default)]
struct Channels {
    decoder: AmiCodec,
    buf: BytesMut,
    live: BTreeMap<String, Chan>,
}

struct Chan {
    fields: Vec<(String, String)>,
    application: String,
    data: String,
    bridge: String,
    since: Instant,
}

const SNAPSHOT: [&str; 14] = [
    "Channel",
    "ChannelState",
    "ChannelStateDesc",
    "CallerIDNum",
    "CallerIDName",
    "ConnectedLineNum",
    "ConnectedLineName",
    "Language",
    "AccountCode",
    "Context",
    "Exten",
    "Priority",
    "Uniqueid",
    "Linkedid",
];

impl Channels {
    fn new() -> Self {
        Channels {
            decoder: AmiCodec::without_banner(),
            ..Default::default()
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Ok(Some(frame)) = self.decoder.decode(&mut self.buf) {
            if let Frame::Message(m) = frame {
                self.apply(&m);
            }
        }
    }

    fn apply(&mut self, m: &Message) {
        let (Some(ev), Some(uid), Some(_)) = (m.event(), m.get("Uniqueid"), m.get("Channel"))
        else {
            return;
        };
        if ev.eq_ignore_ascii_case("Hangup") {
            self.live.remove(uid);
            return;
        }
        if ev.eq_ignore_ascii_case("Cdr") {
            return; // describes a finished leg, not a live channel
        }
        let chan = self.live.entry(uid.to_string()).or_insert_with(|| Chan {
            fields: Vec::new(),
            application: String::new(),
            data: String::new(),
            bridge: String::new(),
            since: Instant::now(),
        });
        if chan.fields.is_empty() {
            chan.fields = SNAPSHOT
                .iter()
                .map(|k| (k.to_string(), String::new()))
                .collect();
        }
        // Only the fields this event carries: some events (Cdr, RTCP) have a
        // Channel and Uniqueid but not the whole snapshot.
        for (k, v) in chan.fields.iter_mut() {
            if let Some(new) = m.get(k) {
                new.clone_into(v);
            }
        }
        if ev.eq_ignore_ascii_case("Newexten") {
            chan.application = m.get("Application").unwrap_or("").into();
            chan.data = m.get("AppData").unwrap_or("").into();
        } else if ev.eq_ignore_ascii_case("BridgeEnter") {
            chan.bridge = m.get("BridgeUniqueid").unwrap_or("").into();
        } else if ev.eq_ignore_ascii_case("BridgeLeave") {
            chan.bridge.clear();
        }
    }

    fn core_show_channels(&self, id: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        resp(
            &mut out,
            "Success",
            id,
            &[("EventList", "start"), ("Message", "Channels will follow")],
        );
        for c in self.live.values() {
            out.extend_from_slice(b"Event: CoreShowChannel\r\n");
            if let Some(id) = id {
                line(&mut out, "ActionID", id);
            }
            for (k, v) in &c.fields {
                line(&mut out, k, v);
            }
            line(&mut out, "Application", &c.application);
            line(&mut out, "ApplicationData", &c.data);
            let s = c.since.elapsed().as_secs();
            line(
                &mut out,
                "Duration",
                &format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60),
            );
            line(&mut out, "BridgeId", &c.bridge);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Event: CoreShowChannelsComplete\r\n");
        if let Some(id) = id {
            line(&mut out, "ActionID", id);
        }
        line(&mut out, "EventList", "Complete");
        line(&mut out, "ListItems", &self.live.len().to_string());
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn line(out: &mut Vec<u8>, k: &str, v: &str) {
    out.extend_from_slice(k.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(v.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A response block: `Response`, `ActionID` (when the action had one), then `rest`.
fn resp(out: &mut Vec<u8>, status: &str, id: Option<&str>, rest: &[(&str, &str)]) {
    line(out, "Response", status);
    if let Some(id) = id {
        line(out, "ActionID", id);
    }
    for (k, v) in rest {
        line(out, k, v);
    }
    out.extend_from_slice(b"\r\n");
}

fn security_event(
    out: &mut Vec<u8>,
    name: &str,
    user: &str,
    local: SocketAddr,
    peer: SocketAddr,
    request: &str,
) {
    line(out, "Event", name);
    line(out, "Privilege", "security,all");
    line(
        out,
        "EventTV",
        &chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
            .to_string(),
    );
    line(out, "Severity", "Error");
    line(out, "Service", "AMI");
    line(out, "EventVersion", "1");
    line(out, "AccountID", user);
    line(out, "SessionID", "0x7f82dc002c90");
    line(
        out,
        "LocalAddress",
        &format!("IPV4/TCP/{local}").replace(':', "/"),
    );
    line(
        out,
        "RemoteAddress",
        &format!("IPV4/TCP/{peer}").replace(':', "/"),
    );
    line(out, "RequestType", request);
    out.extend_from_slice(b"\r\n");
}

async fn session(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = FramedRead::new(r, AmiCodec::without_banner());
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let id = inner.next_session.fetch_add(1, Ordering::Relaxed);
    let events_on = Arc::new(AtomicBool::new(true));
    lock(&inner.sessions).insert(
        id,
        SessionCtl {
            tx: tx.clone(),
            logged_in: false,
            events_on: events_on.clone(),
        },
    );
    let mut banner = inner.opts.banner.clone().into_bytes();
    banner.extend_from_slice(b"\r\n");
    let _ = tx.send(Out::Bytes(banner.into()));

    let mut user: Option<FakeUser> = None;
    let mut challenge_sent = false;
    let mut channels = Channels::new();
    let mut replay_task: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                None | Some(Out::Close) => break,
                Some(Out::Bytes(b)) => {
                    if inner.frozen.load(Ordering::Relaxed) {
                        continue;
                    }
                    if user.is_some() && inner.opts.track_channels {
                        channels.feed(&b);
                    }
                    if w.write_all(&b).await.is_err() {
                        break;
                    }
                }
            },
            frame = reader.next() => {
                let m = match frame {
                    None | Some(Err(_)) => break,
                    Some(Ok(Frame::Message(m))) => m,
                    Some(Ok(_)) => continue, // garbage from the client: skipped like Asterisk
                };
                if inner.frozen.load(Ordering::Relaxed) {
                    continue;
                }
                {
                    let mut log = lock(&inner.actions_log);
                    if log.len() >= ACTION_LOG_MAX {
                        log.remove(0);
                    }
                    log.push(m.clone());
                }
                let _ = inner.actions_tx.send(m.clone());
                let aid = m.action_id();
                let action = m.get("Action").unwrap_or("").to_ascii_lowercase();
                let mut out = Vec::new();
                let mut close = false;
                match (action.as_str(), &user) {
                    ("login", None) => {
                        let name = m.get("Username").unwrap_or("");
                        let found = inner.opts.users.iter().find(|u| u.username == name);
                        let ok = found.is_some_and(|u| {
                            if m.get("AuthType").is_some_and(|a| a.eq_ignore_ascii_case("md5")) {
                                challenge_sent && m.get("Key") == Some(md5_key(&inner.opts.challenge, &u.secret).as_str())
                            } else {
                                m.get("Secret") == Some(u.secret.as_str())
                            }
                        });
                        if let (true, Some(u)) = (ok, found) {
                            resp(&mut out, "Success", aid, &[("Message", "Authentication accepted")]);
                            if inner.opts.fully_booted {
                                let up = inner.started.elapsed().as_secs().to_string();
                                out.extend_from_slice(format!("Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: {up}\r\nLastReload: {up}\r\nStatus: Fully Booted\r\n\r\n").as_bytes());
                            }
                            user = Some(u.clone());
                            if let Some(s) = lock(&inner.sessions).get_mut(&id) {
                                s.logged_in = true;
                            }
                            inner.update_logged_in();
                            if let Some(replay) = inner.opts.on_login.clone() {
                                let chunks = replay.chunks(&inner.ids);
                                let tx = tx.clone();
                                let events_on = events_on.clone();
                                replay_task = Some(tokio::spawn(async move {
                                    let start = Instant::now();
                                    for c in chunks {
                                        tokio::time::sleep_until(start + c.at).await;
                                        if events_on.load(Ordering::Relaxed) && tx.send(Out::Bytes(c.bytes)).is_err() {
                                            break;
                                        }
                                    }
                                }));
                            }
                        } else {
                            // 14b: the only reply, then Asterisk closes the connection.
                            resp(&mut out, "Error", aid, &[("Message", "Authentication failed")]);
                            close = true;
                        }
                    }
                    ("challenge", None) => {
                        if m.get("AuthType").is_some_and(|a| a.eq_ignore_ascii_case("md5")) {
                            challenge_sent = true;
                            resp(&mut out, "Success", aid, &[("Challenge", &inner.opts.challenge)]);
                        } else {
                            resp(&mut out, "Error", aid, &[("Message", "Must specify AuthType")]);
                        }
                    }
                    ("logoff", _) => {
                        resp(&mut out, "Goodbye", aid, &[("Message", "Thanks for all the fish.")]);
                        close = true;
                    }
                    ("ping", _) => {
                        let ts = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64());
                        resp(&mut out, "Success", aid, &[("Ping", "Pong"), ("Timestamp", &format!("{ts:.6}"))]);
                    }
                    (_, None) => {
                        resp(&mut out, "Error", aid, &[("Message", "Authentication Required")]);
                    }
                    (a @ ("originate" | "coreshowchannels" | "command"), Some(u)) if u.read_only => {
                        resp(&mut out, "Error", aid, &[("Message", "Permission denied")]);
                        let name = m.get("Action").unwrap_or(a);
                        security_event(&mut out, "RequestNotAllowed", &u.username, local, peer, &format!("Action: {name}"));
                    }
                    ("coreshowchannels", Some(_)) => out = lock(&inner.pbx_channels).core_show_channels(aid),
                    ("command", Some(_)) => {
                        let cmd = m.get("Command").unwrap_or("");
                        let output = if cmd.trim() == "core show version" {
                            VERSION.to_string()
                        } else {
                            format!("No such command '{cmd}' (type 'core show help {cmd}' for other possible commands)")
                        };
                        resp(&mut out, "Success", aid, &[("Message", "Command output follows"), ("Output", &output)]);
                    }
                    ("originate", Some(_)) => {
                        let chan = m.get("Channel").unwrap_or("");
                        let fails = chan.is_empty() || chan.eq_ignore_ascii_case("PJSIP/999");
                        let is_async = m.get("Async").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1"));
                        if is_async {
                            resp(&mut out, "Success", aid, &[("Message", "Originate successfully queued")]);
                            line(&mut out, "Event", "OriginateResponse");
                            line(&mut out, "Privilege", "call,all");
                            if let Some(aid) = aid {
                                line(&mut out, "ActionID", aid);
                            }
                            line(&mut out, "Response", if fails { "Failure" } else { "Success" });
                            line(&mut out, "Channel", chan);
                            line(&mut out, "Context", m.get("Context").unwrap_or(""));
                            line(&mut out, "Exten", m.get("Exten").unwrap_or(""));
                            line(&mut out, "Reason", if fails { "0" } else { "4" });
                            let uid = if fails {
                                "<unknown>".to_string()
                            } else {
                                format!("{}.{}", inner.ids.epoch, inner.ids.seq.fetch_add(1, Ordering::Relaxed))
                            };
                            line(&mut out, "Uniqueid", &uid);
                            line(&mut out, "CallerIDNum", "<unknown>");
                            line(&mut out, "CallerIDName", "<unknown>");
                            out.extend_from_slice(b"\r\n");
                        } else if fails {
                            resp(&mut out, "Error", aid, &[("Message", "Originate failed")]);
                        } else {
                            resp(&mut out, "Success", aid, &[("Message", "Originate successfully queued")]);
                        }
                    }
                    ("events", Some(_)) => {
                        let mask = m.get("EventMask").unwrap_or("on");
                        let off = mask.eq_ignore_ascii_case("off");
                        events_on.store(!off, Ordering::Relaxed);
                        resp(&mut out, "Success", aid, &[("Events", if off { "Off" } else { "On" })]);
                    }
                    ("filter", Some(_)) => {
                        resp(&mut out, "Success", aid, &[("Message", "Filter Added Successfully")]);
                    }
                    (_, Some(u)) => {
                        let name = m.get("Action").unwrap_or("");
                        resp(&mut out, "Error", aid, &[("Message", &format!("Invalid/unknown command: {name}. Use Action: ListCommands to show available commands."))]);
                        security_event(&mut out, "RequestBadFormat", &u.username, local, peer, &format!("Action: {name}"));
                    }
                }
                if !out.is_empty() && w.write_all(&out).await.is_err() {
                    break;
                }
                if close {
                    break;
                }
            },
        }
    }
    if let Some(t) = replay_task {
        t.abort();
    }
    let _ = w.shutdown().await;
    lock(&inner.sessions).remove(&id);
    inner.update_logged_in();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_only_unsolicited_events_and_maps_timeline() {
        let ami = b"Asterisk Call Manager/13.0.0\r\nResponse: Success\r\nActionID: 1\r\n\r\nEvent: FullyBooted\r\n\r\nEvent: A\r\nX: 1\r\n\r\nEvent: L\r\nActionID: 2\r\n\r\nEvent: B\r\n\r\n";
        // chunks: banner 30 | response+booted | A (split) | rest
        let tl = "0.1 recv 0 30\n0.2 recv 30 58\n0.3 recv 88 10\n0.5 recv 98 100\n";
        let r = Replay::from_ami_bytes(ami, Some(tl));
        assert_eq!(&r.bytes()[..], b"Event: A\r\nX: 1\r\n\r\nEvent: B\r\n\r\n");
        assert_eq!(r.event_count(), 2);
        let chunks = r.chunks(&IdRewriter::new());
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.bytes.to_vec()).collect();
        assert_eq!(&joined[..], &r.bytes()[..]);
        assert!(chunks.len() >= 2, "{chunks:?}");
        assert_eq!(chunks[0].at, Duration::ZERO);
    }

    #[test]
    fn fresh_ids_are_consistent_and_new() {
        let src = b"Event: Newchannel\r\nChannel: PJSIP/trunk-0000001e\r\nUniqueid: 1795305032.32\r\nLinkedid: 1795305032.32\r\n\r\nEvent: Newchannel\r\nChannel: Local/102@from-internal-00000000;1\r\nUniqueid: 1795305032.33\r\nLinkedid: 1795305032.32\r\n\r\n";
        let ids = IdRewriter::new();
        let (a, _) = ids.rewrite(src);
        let (b, _) = ids.rewrite(src);
        assert_ne!(a, b);
        let ma = crate::ami::codec::parse_messages(&a);
        assert_eq!(ma.len(), 2);
        assert_eq!(ma[0].get("Uniqueid"), ma[0].get("Linkedid"));
        assert_eq!(ma[1].get("Linkedid"), ma[0].get("Uniqueid"));
        assert_ne!(ma[0].get("Uniqueid"), Some("1795305032.32"));
        assert_ne!(ma[0].get("Channel"), Some("PJSIP/trunk-0000001e"));
        assert!(
            ma[0]
                .get("Channel")
                .is_some_and(|c| c.starts_with("PJSIP/trunk-"))
        );
        assert!(
            ma[1]
                .get("Channel")
                .is_some_and(|c| c.starts_with("Local/102@from-internal-") && c.ends_with(";1"))
        );
    }
}
