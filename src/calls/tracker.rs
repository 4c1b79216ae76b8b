//! The tracker: folds AMI events into calls and conversations.
//!
//! * A **call** is everything with one `Linkedid`. A channel whose events start
//!   showing another Linkedid (Asterisk propagates the oldest Linkedid when channels
//!   of two calls are bridged: attended transfer between calls, pickup, parking) moves
//!   into that call.
//! * A **conversation** is a real phone ringing: every non-Local channel that is the
//!   destination of a `DialBegin` (with or without a caller channel), keyed by its
//!   uniqueid. Local channel pairs (queues with Local members, Atxfer consultation,
//!   originate through Local) never make conversations of their own; the phone leg the
//!   `;2` half dials does.
//! * Outcomes come from `DialEnd DialStatus` (hangup causes are unreliable, surprise 8);
//!   an answered conversation always wins over orphan NOANSWER/CANCEL legs.
//! * State is dropped when the call's last channel hangs up (`call_ended`), or by
//!   [`Tracker::reap`] after `reap_after` without events.
//!
//! No I/O, no clock: time comes in with every event.

use std::collections::{HashMap, HashSet, VecDeque};

use chrono::{DateTime, Datelike, FixedOffset, Timelike, Utc};
use serde_json::Value;

use super::call_full::{
    CallFull, ChannelData, ChannelExtra, Conversation, Conversations, Direction, Party, Stage,
    StageEvent, UNSET_TIME, User,
};
use super::classify::{Classifier, Kind, local_exten, split_channel_name};
use super::config::{CallsConfig, CallsConfigError, parse_offset};
use crate::ami::Message;

/// How many uniqueids of hung-up channels are remembered to ignore late events (they
/// arrive within milliseconds of the hangup).
const RECENTLY_ENDED: usize = 2048;

/// Conversations kept per call. Every snapshot carries all of them, so a queue call
/// ringing many agents for hours must not grow without bound; further legs are
/// still followed for the outcome but not listed.
pub const MAX_CONVERSATIONS: usize = 200;
/// Variables kept per call, and the longest value kept.
const MAX_VARIABLES: usize = 64;
const MAX_VARIABLE_LEN: usize = 1024;

type Time = DateTime<Utc>;

/// One Asterisk channel.
#[derive(Debug, Clone)]
struct Chan {
    id: Box<str>,
    name: String,
    /// The call (Linkedid) this channel belongs to now.
    call: Box<str>,
    /// The Linkedid its events showed last (to notice changes).
    seen_linkedid: Box<str>,
    kind: Kind,
    endpoint: String,
    /// Caller ID when the channel appeared (before any dialplan rewrite).
    caller_num: String,
    caller_name: String,
    /// Caller ID now.
    cur_caller_num: String,
    context: String,
    /// First meaningful extension (the DID on an inbound trunk channel).
    exten: String,
    /// Created in state Down without a caller (by an Originate).
    created_down: bool,
    start: Time,
    answer: Option<Time>,
    end: Option<Time>,
    hangup_cause: Option<u16>,
    hangup_cause_txt: String,
    record: String,
    /// Connected line number (on an outbound trunk leg: the office line presented).
    connected_num: String,
    /// `Dial` arguments the channel was running when a resync listed it.
    dial_data: String,
    /// First seen during a resync from something other than its `Newchannel`: its
    /// history (the `DialBegin` that made it ring) was missed, so the resync builds
    /// its conversation.
    resync_new: bool,
    /// First seen while a resync runs (its events from then on are all seen).
    born_in_resync: bool,
}

/// One conversation (a ringing phone).
#[derive(Debug, Clone)]
struct Conv {
    /// Uniqueid of the ringing channel (also the conversation id).
    id: Box<str>,
    user: Option<User>,
    requested: Time,
    answered: Option<Time>,
    ended: Option<Time>,
    dial_status: String,
    result: u16,
    is_parked: bool,
    via: &'static str,
}

#[derive(Debug, Clone)]
struct Call {
    id: Box<str>,
    /// Member channel uniqueids, in order of appearance (ended ones stay until the end).
    channels: Vec<Box<str>>,
    live: usize,
    convs: Vec<Conv>,
    start: Time,
    last_event: Time,
    end: Option<Time>,
    queue: String,
    in_queue: bool,
    queue_abandoned: bool,
    variables: serde_json::Map<String, Value>,
    originate_action_id: String,
    /// Number dialed on the first trunk leg (outbound client).
    dialed_number: String,
    /// Caller ID presented to the trunk (outbound office line).
    line_from_dial: String,
    /// Uniqueid of the first dialed trunk leg.
    trunk_leg: Option<Box<str>>,
    /// Record started on a channel that is not a conversation's (e.g. the trunk leg
    /// before any dial).
    record: String,
    hangup_by: &'static str,
    pending_via: Option<&'static str>,
    emitted_any: bool,
    merged_into: String,
    /// First seen during a resync, its start missed: only snapshots tell who is who.
    rebuilt: bool,
}

impl Call {
    fn new(id: &str, at: Time) -> Self {
        Call {
            id: id.into(),
            channels: Vec::new(),
            live: 0,
            convs: Vec::new(),
            start: at,
            last_event: at,
            end: None,
            queue: String::new(),
            in_queue: false,
            queue_abandoned: false,
            variables: serde_json::Map::new(),
            originate_action_id: String::new(),
            dialed_number: String::new(),
            line_from_dial: String::new(),
            trunk_leg: None,
            record: String::new(),
            hangup_by: "",
            pending_via: None,
            emitted_any: false,
            merged_into: String::new(),
            rebuilt: false,
        }
    }

    fn conv_mut(&mut self, id: &str) -> Option<&mut Conv> {
        self.convs.iter_mut().find(|c| &*c.id == id)
    }
}

/// A live call, summarised for the admin page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LiveCall {
    pub id: String,
    pub direction: Direction,
    pub client_phone: String,
    pub line_number: String,
    /// Extensions ringing now.
    pub ringing: Vec<String>,
    /// Extensions talking now.
    pub talking: Vec<String>,
    /// Start of the call, `YYYY-MM-DD HH:MM:SS` (configured offset).
    pub started: String,
    /// Start of the call, Unix seconds.
    pub started_unix: i64,
}

/// The call tracker. Feed it every AMI event with the time it was received.
pub struct Tracker {
    classify: Classifier,
    offset: FixedOffset,
    reap_after: chrono::Duration,
    keep_vars: Vec<(String, bool)>,
    channels: HashMap<Box<str>, Chan>,
    calls: HashMap<Box<str>, Call>,
    ended: HashSet<Box<str>>,
    ended_order: VecDeque<Box<str>>,
    resync: Option<HashSet<Box<str>>>,
    /// Inbound trunk channels whose DID is not known yet (created with `Exten=s`).
    need_did: HashSet<Box<str>>,
}

fn g<'a>(m: &'a Message, k: &str) -> &'a str {
    m.get(k).unwrap_or("")
}

fn unknown_to_empty(s: &str) -> &str {
    if s == "<unknown>" { "" } else { s }
}

/// Round a span to whole seconds.
fn secs(from: Time, to: Time) -> u64 {
    let ms = (to - from).num_milliseconds();
    if ms <= 0 {
        0
    } else {
        ((ms + 500) / 1000) as u64
    }
}

/// SIP-like result of a DialStatus.
pub fn result_of_dial_status(status: &str, cause: Option<u16>) -> u16 {
    match status {
        "ANSWER" => 200,
        "BUSY" => 486,
        "NOANSWER" => 480,
        "CANCEL" => 487,
        "CONGESTION" => 503,
        "CHANUNAVAIL" => match cause {
            Some(c) if c != 0 && c != 16 => result_of_cause(c, false),
            _ => 480,
        },
        "DONTCALL" | "TORTURE" => 603,
        _ => 500,
    }
}

/// SIP-like result of a Q.850 hangup cause for a leg that ended without a DialStatus.
pub fn result_of_cause(cause: u16, answered: bool) -> u16 {
    if answered {
        return 200;
    }
    match cause {
        1 => 404,
        3 | 28 => 484,
        17 => 486,
        18..=20 => 480,
        21 => 603,
        34 | 38 | 41 | 42 => 503,
        _ => 487,
    }
}

impl Tracker {
    /// Build a tracker from the `[calls]` section.
    pub fn new(cfg: &CallsConfig) -> Result<Tracker, CallsConfigError> {
        let keep_vars = cfg
            .keep_variables
            .iter()
            .map(|p| match p.strip_suffix('*') {
                Some(prefix) => (prefix.to_string(), true),
                None => (p.clone(), false),
            })
            .collect();
        Ok(Tracker {
            classify: Classifier::new(cfg)?,
            offset: parse_offset(&cfg.time_offset)?,
            reap_after: chrono::Duration::from_std(cfg.reap_after)
                .unwrap_or(chrono::Duration::hours(6)),
            keep_vars,
            channels: HashMap::new(),
            calls: HashMap::new(),
            // Twice the ring's size, so that insert/remove churn rehashes in place
            // instead of growing the table: memory stays flat.
            ended: HashSet::with_capacity(RECENTLY_ENDED * 2),
            ended_order: VecDeque::with_capacity(RECENTLY_ENDED + 1),
            resync: None,
            need_did: HashSet::new(),
        })
    }

    /// Number of calls being tracked.
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// Number of channels being tracked.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Feed one AMI message received at `at`; returns the stage changes it caused.
    pub fn handle(&mut self, m: &Message, at: Time) -> Vec<StageEvent> {
        let mut out = Vec::new();
        self.handle_into(m, at, &mut out);
        out
    }

    /// Like [`Tracker::handle`], pushing into `out` (no allocation when nothing happens).
    pub fn handle_into(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        let Some(ev) = m.event() else { return };
        match ev {
            // The chatty ones first: most are of no interest.
            "VarSet" => self.on_varset(m, at),
            "Newexten" => self.on_newexten(m),
            "Newchannel" => {
                self.ensure_chan(m, "", at);
            }
            "Newstate" => self.on_newstate(m, at, out),
            "NewCallerid" => self.on_newcallerid(m),
            "DialBegin" => self.on_dial_begin(m, at, out),
            "DialEnd" => self.on_dial_end(m, at, out),
            "Hangup" => self.on_hangup(m, at, out),
            "HangupRequest" => self.on_hangup_request(m, at, out),
            "NewConnectedLine" => {
                if let Some(ch) = self.channels.get_mut(g(m, "Uniqueid")) {
                    let n = unknown_to_empty(g(m, "ConnectedLineNum"));
                    if !n.is_empty() {
                        ch.connected_num = n.to_string();
                    }
                }
                self.track_linkedid(m, "", at, out)
            }
            "BridgeEnter" | "BridgeLeave" | "SoftHangupRequest" => {
                self.track_linkedid(m, "", at, out)
            }
            "Hold" | "Unhold" => self.on_hold(m, ev == "Hold", at, out),
            "QueueCallerJoin" => self.on_queue(m, at, |c, q| {
                c.in_queue = true;
                if c.queue.is_empty() {
                    c.queue = q.to_string();
                }
            }),
            "QueueCallerLeave" => self.on_queue(m, at, |c, _| c.in_queue = false),
            "QueueCallerAbandon" => self.on_queue(m, at, |c, _| {
                c.in_queue = false;
                c.queue_abandoned = true;
            }),
            "BlindTransfer" | "AttendedTransfer" if g(m, "Result") == "Success" => {
                let id = m
                    .get("TransfereeUniqueid")
                    .or_else(|| m.get("TransfererUniqueid"))
                    .or_else(|| m.get("OrigTransfererUniqueid"))
                    .unwrap_or("");
                if let Some(call) = self.call_of(id)
                    && let Some(c) = self.calls.get_mut(&*call)
                {
                    c.pending_via = Some("transfer");
                    c.last_event = at;
                }
            }
            "MixMonitorStart" => {}
            // The resync list can come through here too (see `begin_resync`).
            "CoreShowChannel" if self.resync.is_some() => self.resync_channel(m, at),
            "CoreShowChannelsComplete" if self.resync.is_some() => {
                out.extend(self.end_resync(at));
            }
            "OriginateResponse" => self.on_originate_response(m, at),
            "Pickup" => self.on_pickup(m, at),
            "ParkedCall" => self.on_parked(m, true, at),
            "UnParkedCall" => self.on_unparked(m, at, out),
            "ParkedCallGiveUp" | "ParkedCallTimeOut" => self.on_parked(m, false, at),
            "Rename" => self.refresh_name(g(m, "Uniqueid"), g(m, "Newname")),
            _ => {}
        }
    }

    fn call_of(&self, uniqueid: &str) -> Option<Box<str>> {
        self.channels.get(uniqueid).map(|c| c.call.clone())
    }

    fn remember_ended(&mut self, id: &str) {
        if self.ended.insert(id.into()) {
            self.ended_order.push_back(id.into());
            while self.ended_order.len() > RECENTLY_ENDED {
                if let Some(old) = self.ended_order.pop_front() {
                    self.ended.remove(&old);
                }
            }
        }
    }

    /// Make sure the channel of the event's snapshot (`prefix` "" or "Dest") is known,
    /// creating it (and its call) when first seen. Returns its uniqueid if tracked.
    fn ensure_chan(&mut self, m: &Message, prefix: &str, at: Time) -> Option<Box<str>> {
        let key = |k: &str| -> String { format!("{prefix}{k}") };
        let (id, linkedid, name) = if prefix.is_empty() {
            (g(m, "Uniqueid"), g(m, "Linkedid"), g(m, "Channel"))
        } else {
            (
                m.get(&key("Uniqueid")).unwrap_or(""),
                m.get(&key("Linkedid")).unwrap_or(""),
                m.get(&key("Channel")).unwrap_or(""),
            )
        };
        if id.is_empty() || name.is_empty() {
            return None;
        }
        if let Some(ch) = self.channels.get(id) {
            return Some(ch.id.clone());
        }
        if self.ended.contains(id) {
            return None;
        }
        let linkedid = if linkedid.is_empty() { id } else { linkedid };
        // A straggler of a call that has ended must not start it again.
        if self.ended.contains(linkedid) && !self.calls.contains_key(linkedid) {
            return None;
        }
        let get = |k: &str| -> &str {
            if prefix.is_empty() {
                g(m, k)
            } else {
                m.get(&key(k)).unwrap_or("")
            }
        };
        let context = get("Context");
        let state = get("ChannelStateDesc");
        let exten = get("Exten");
        let caller_num = unknown_to_empty(get("CallerIDNum"));
        let kind = self.classify.classify(name, context);
        let (_, endpoint) = split_channel_name(name);
        let ch = Chan {
            id: id.into(),
            name: name.to_string(),
            call: linkedid.into(),
            seen_linkedid: linkedid.into(),
            kind,
            endpoint: endpoint.to_string(),
            caller_num: caller_num.to_string(),
            caller_name: unknown_to_empty(get("CallerIDName")).to_string(),
            cur_caller_num: caller_num.to_string(),
            context: context.to_string(),
            exten: if exten == "s" {
                String::new()
            } else {
                exten.to_string()
            },
            created_down: state == "Down" && id == linkedid,
            start: at,
            answer: if state == "Up" { Some(at) } else { None },
            end: None,
            hangup_cause: None,
            hangup_cause_txt: String::new(),
            record: String::new(),
            connected_num: unknown_to_empty(get("ConnectedLineNum")).to_string(),
            dial_data: String::new(),
            // A `Newchannel` starts the channel's history; anything else seen first
            // while resyncing means its start (and its DialBegin) went by unseen.
            resync_new: self.resync.is_some() && m.event() != Some("Newchannel"),
            born_in_resync: self.resync.is_some(),
        };
        let rebuilt = ch.resync_new;
        let call = self.calls.entry(linkedid.into()).or_insert_with(|| {
            let mut c = Call::new(linkedid, at);
            c.rebuilt = rebuilt;
            c
        });
        call.channels.push(ch.id.clone());
        call.live += 1;
        call.last_event = at;
        if ch.kind == Kind::Trunk && ch.exten.is_empty() && id == linkedid {
            self.need_did.insert(ch.id.clone());
        }
        // A channel that appears while a resync runs is alive by definition.
        if let Some(seen) = self.resync.as_mut() {
            seen.insert(ch.id.clone());
        }
        let id: Box<str> = ch.id.clone();
        self.channels.insert(id.clone(), ch);
        Some(id)
    }

    /// Follow a Linkedid change of the event's channel (prefix "" or "Dest").
    fn track_linkedid(&mut self, m: &Message, prefix: &str, at: Time, out: &mut Vec<StageEvent>) {
        let (id, linkedid) = if prefix.is_empty() {
            (g(m, "Uniqueid"), g(m, "Linkedid"))
        } else {
            (g(m, "DestUniqueid"), g(m, "DestLinkedid"))
        };
        if linkedid.is_empty() {
            return;
        }
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if let Some(c) = self.calls.get_mut(&*ch.call) {
            c.last_event = at;
        }
        if &*ch.seen_linkedid == linkedid {
            return;
        }
        ch.seen_linkedid = linkedid.into();
        if &*ch.call != linkedid && self.calls.contains_key(linkedid) {
            let id: Box<str> = ch.id.clone();
            self.move_chan(&id, linkedid, at, out);
        }
    }

    /// Move a channel (and its live conversation) into another call; end the old call
    /// if nothing is left of it. The conversation ends in the old call and is
    /// requested (and accepted, if talking) in the new one, so that each call's stages
    /// stay complete.
    fn move_chan(&mut self, id: &str, to: &str, at: Time, out: &mut Vec<StageEvent>) {
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if !self.calls.contains_key(to) {
            return;
        }
        let from: Box<str> = std::mem::replace(&mut ch.call, to.into());
        let live = ch.end.is_none();
        let mut moved = None;
        if let Some(old) = self.calls.get_mut(&*from) {
            old.channels.retain(|c| &**c != id);
            if live {
                old.live = old.live.saturating_sub(1);
            }
            if let Some(conv) = old.conv_mut(id)
                && conv.ended.is_none()
            {
                moved = Some(conv.clone());
                conv.ended = Some(at);
            }
        }
        if moved.is_some() {
            self.emit(&from, Stage::ConversationEnded, Some(id), at, out);
        }
        if let Some(new) = self.calls.get_mut(to) {
            new.channels.push(id.into());
            if live {
                new.live += 1;
            }
            new.last_event = at;
            if let Some(c) = &moved {
                new.convs.retain(|x| x.id != c.id);
                new.convs.push(c.clone());
            }
        }
        if let Some(c) = moved {
            self.emit(to, Stage::ConversationRequested, Some(id), at, out);
            if c.answered.is_some() {
                self.emit(to, Stage::ConversationAccepted, Some(id), at, out);
            }
        }
        tracing::debug!(call_id = %to, channel = %id, from_call = %from, "channel moved between calls");
        let empty = self.calls.get(&*from).is_some_and(|c| c.live == 0);
        if empty {
            if let Some(old) = self.calls.get_mut(&*from) {
                old.merged_into = to.to_string();
            }
            self.finish_call(&from, at, out);
        }
    }

    /// A channel's name can change under the same uniqueid (pickup and other
    /// masquerades): follow it, and who it is.
    fn refresh_name(&mut self, id: &str, name: &str) {
        if name.is_empty() || name.contains("<ZOMBIE>") {
            return;
        }
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if ch.name == name {
            return;
        }
        let kind = self.classify.classify(name, &ch.context);
        let (_, endpoint) = split_channel_name(name);
        ch.name = name.to_string();
        ch.kind = kind;
        ch.endpoint = endpoint.to_string();
    }

    fn on_newexten(&mut self, m: &Message) {
        // Only needed to learn the DID of an inbound trunk channel created with
        // Exten=s; Newexten is among the most frequent events, so skip it fast.
        if self.need_did.is_empty() {
            return;
        }
        let id = g(m, "Uniqueid");
        if !self.need_did.contains(id) {
            return;
        }
        let e = g(m, "Exten");
        if e.is_empty() || e == "s" {
            return;
        }
        if let Some(ch) = self.channels.get_mut(id) {
            ch.exten = e.to_string();
        }
        self.need_did.remove(id);
    }

    fn on_varset(&mut self, m: &Message, at: Time) {
        let var = g(m, "Variable");
        if var == "MIXMONITOR_FILENAME" {
            let value = g(m, "Value");
            if value.is_empty() {
                return;
            }
            let id = g(m, "Uniqueid");
            if let Some(ch) = self.channels.get_mut(id) {
                ch.record = value.to_string();
                let call = ch.call.clone();
                let is_conv = self
                    .calls
                    .get(&*call)
                    .is_some_and(|c| c.convs.iter().any(|cv| &*cv.id == id));
                if let Some(c) = self.calls.get_mut(&*call) {
                    if !is_conv {
                        c.record = value.to_string();
                    }
                    c.last_event = at;
                }
            }
            return;
        }
        let bare = var.trim_start_matches('_');
        let kept = self.keep_vars.iter().any(|(p, prefix)| {
            if *prefix {
                bare.starts_with(p.as_str())
            } else {
                bare == p
            }
        });
        let originate = !kept && g(m, "ChannelStateDesc") == "Down";
        if !kept && !originate {
            return;
        }
        let id = g(m, "Uniqueid");
        let Some(ch) = self.channels.get(id) else {
            return;
        };
        if originate {
            // Variables of an Originate are set on its channel before it rings.
            let asterisk_own = matches!(
                bare,
                "DIALEDPEERNUMBER" | "DIALEDPEERNAME" | "DIALSTATUS" | "SIPDOMAIN" | "SIPCALLID"
            );
            if !(ch.created_down && &*ch.call == id) || asterisk_own {
                return;
            }
        }
        let call = ch.call.clone();
        if let Some(c) = self.calls.get_mut(&*call) {
            c.last_event = at;
            if c.variables.len() >= MAX_VARIABLES && !c.variables.contains_key(var) {
                return;
            }
            let mut value = g(m, "Value");
            if value.len() > MAX_VARIABLE_LEN {
                let mut end = MAX_VARIABLE_LEN;
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                value = &value[..end];
            }
            c.variables
                .insert(var.to_string(), Value::String(value.to_string()));
        }
    }

    fn on_newstate(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        let Some(id) = self.ensure_chan(m, "", at) else {
            return;
        };
        self.track_linkedid(m, "", at, out);
        if let Some(ch) = self.channels.get_mut(&id)
            && g(m, "ChannelStateDesc") == "Up"
            && ch.answer.is_none()
        {
            ch.answer = Some(at);
        }
    }

    fn on_newcallerid(&mut self, m: &Message) {
        let id = g(m, "Uniqueid");
        if let Some(ch) = self.channels.get_mut(id) {
            ch.cur_caller_num = unknown_to_empty(g(m, "CallerIDNum")).to_string();
            let name = unknown_to_empty(g(m, "CallerIDName"));
            // A routing AGI may name the client ("Ivan Petrov") on the inbound channel.
            if !name.is_empty() && ch.kind == Kind::Trunk && &*ch.call == id {
                ch.caller_name = name.to_string();
            }
        }
    }

    fn on_queue(&mut self, m: &Message, at: Time, f: impl FnOnce(&mut Call, &str)) {
        let id = g(m, "Uniqueid");
        if let Some(call) = self.call_of(id)
            && let Some(c) = self.calls.get_mut(&*call)
        {
            f(c, g(m, "Queue"));
            c.last_event = at;
        }
    }

    fn on_originate_response(&mut self, m: &Message, at: Time) {
        if g(m, "Response") != "Success" {
            return;
        }
        let id = g(m, "Uniqueid");
        if let Some(call) = self.call_of(id)
            && let Some(c) = self.calls.get_mut(&*call)
        {
            c.originate_action_id = g(m, "ActionID").to_string();
            c.last_event = at;
        }
    }

    fn on_dial_begin(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        let caller = if m.get("Uniqueid").is_some() {
            self.ensure_chan(m, "", at)
        } else {
            None
        };
        let Some(dest) = self.ensure_chan(m, "Dest", at) else {
            return;
        };
        self.track_linkedid(m, "Dest", at, out);
        let Some(dch) = self.channels.get(&dest) else {
            return;
        };
        if dch.kind == Kind::Local || dch.kind == Kind::Other {
            return;
        }
        let call_id = dch.call.clone();
        let Some(call) = self.calls.get(&*call_id) else {
            return;
        };
        if call.convs.iter().any(|c| c.id == dest) {
            // A resync may have built this leg's conversation before its DialBegin
            // came through: the Dial string still names the client.
            let fill = dch.kind == Kind::Trunk
                && call.trunk_leg.as_deref() == Some(&*dest)
                && call.dialed_number.is_empty();
            let ds = dialed_number(g(m, "DialString"));
            if fill
                && !ds.is_empty()
                && let Some(call) = self.calls.get_mut(&*call_id)
            {
                call.dialed_number = ds;
            }
            return;
        }
        if call.convs.len() >= MAX_CONVERSATIONS {
            tracing::warn!(call_id = %call_id, channel = %dch.name,
                "call has {MAX_CONVERSATIONS} conversations already; not listing more");
            return;
        }
        let caller_ch = caller.as_ref().and_then(|c| self.channels.get(c));
        // Who the employee of this conversation is.
        let user = match dch.kind {
            Kind::Internal => Some(User {
                number: dch.endpoint.clone(),
                name: if dch.caller_num == dch.endpoint {
                    dch.caller_name.clone()
                } else {
                    String::new()
                },
            }),
            _ => {
                let from_caller = caller_ch.and_then(|c| match c.kind {
                    Kind::Internal => Some(c.endpoint.clone()),
                    Kind::Local => {
                        let e = local_exten(&c.name);
                        self.classify.is_internal_number(e).then(|| e.to_string())
                    }
                    _ => None,
                });
                from_caller
                    .or_else(|| self.first_employee(call))
                    .map(|number| User {
                        name: self.employee_name(call, &number),
                        number,
                    })
            }
        };
        let via = if caller.is_none() && *dest == *call_id {
            "originate"
        } else if let Some(v) = call.pending_via {
            v
        } else if call.in_queue {
            "queue"
        } else {
            "dial"
        };
        // Outbound: remember the dialed number and the line presented to the trunk.
        let trunk_leg = dch.kind == Kind::Trunk && call.trunk_leg.is_none() && *dest != *call_id;
        let (dialed, line) = if trunk_leg {
            let ds = dialed_number(g(m, "DialString"));
            let dialed = if ds.is_empty() {
                Some(g(m, "Exten").to_string())
                    .filter(|e| !e.is_empty() && e != "s")
                    .or_else(|| caller_ch.map(|c| c.exten.clone()))
                    .unwrap_or_default()
            } else {
                ds
            };
            let line = caller_ch
                .map(|c| c.cur_caller_num.clone())
                .filter(|n| !n.is_empty() && !self.classify.is_internal_number(n))
                .unwrap_or_default();
            (dialed, line)
        } else {
            (String::new(), String::new())
        };
        let Some(call) = self.calls.get_mut(&*call_id) else {
            return;
        };
        if trunk_leg {
            call.trunk_leg = Some(dest.clone());
            if !dialed.is_empty() {
                call.dialed_number = dialed;
            }
            if !line.is_empty() {
                call.line_from_dial = line;
            }
        }
        if via == "transfer" {
            call.pending_via = None;
        }
        call.last_event = at;
        call.convs.push(Conv {
            id: dest.clone(),
            user,
            requested: at,
            answered: None,
            ended: None,
            dial_status: String::new(),
            result: 0,
            is_parked: false,
            via,
        });
        self.emit(&call_id, Stage::ConversationRequested, Some(&dest), at, out);
    }

    fn first_employee(&self, call: &Call) -> Option<String> {
        call.channels
            .iter()
            .filter_map(|id| self.channels.get(id))
            .find(|c| c.kind == Kind::Internal)
            .map(|c| c.endpoint.clone())
    }

    fn employee_name(&self, call: &Call, number: &str) -> String {
        call.channels
            .iter()
            .filter_map(|id| self.channels.get(id))
            .find(|c| c.kind == Kind::Internal && c.endpoint == number && c.caller_num == number)
            .map(|c| c.caller_name.clone())
            .unwrap_or_default()
    }

    fn on_dial_end(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        let dest = g(m, "DestUniqueid");
        let status = g(m, "DialStatus");
        self.refresh_name(dest, g(m, "DestChannel"));
        let Some(ch) = self.channels.get(dest) else {
            return;
        };
        let call_id = ch.call.clone();
        let cause = ch.hangup_cause;
        let Some(call) = self.calls.get_mut(&*call_id) else {
            return;
        };
        call.last_event = at;
        let Some(conv) = call.conv_mut(dest) else {
            return;
        };
        // Queues repeat the losing member's DialEnd: only the first one counts.
        if !conv.dial_status.is_empty() {
            return;
        }
        if conv.ended.is_some() {
            // The leg's Hangup came first: the DialStatus still tells the outcome
            // better than the hangup cause, but the conversation has ended already.
            if conv.answered.is_none() && status != "ANSWER" {
                conv.dial_status = status.to_string();
                conv.result = result_of_dial_status(status, cause);
            }
            return;
        }
        conv.dial_status = status.to_string();
        conv.result = result_of_dial_status(status, cause);
        let stage = if status == "ANSWER" {
            conv.answered = Some(at);
            Stage::ConversationAccepted
        } else {
            conv.ended = Some(at);
            Stage::ConversationEnded
        };
        self.emit(&call_id, stage, Some(dest), at, out);
    }

    fn on_hangup_request(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        self.track_linkedid(m, "", at, out);
        let id = g(m, "Uniqueid");
        let Some(ch) = self.channels.get(id) else {
            return;
        };
        let side = match ch.kind {
            Kind::Trunk => "client",
            Kind::Internal => "employee",
            _ => return,
        };
        if let Some(c) = self.calls.get_mut(&*ch.call)
            && c.hangup_by.is_empty()
        {
            c.hangup_by = side;
        }
    }

    fn on_hangup(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        self.track_linkedid(m, "", at, out);
        let id = g(m, "Uniqueid");
        let cause = g(m, "Cause").parse::<u16>().ok();
        let txt = g(m, "Cause-txt");
        self.hangup_chan(id, cause, txt, at, out);
    }

    /// A channel is gone: end its conversation, and the call if it was the last one.
    fn hangup_chan(
        &mut self,
        id: &str,
        cause: Option<u16>,
        cause_txt: &str,
        at: Time,
        out: &mut Vec<StageEvent>,
    ) {
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if ch.end.is_some() {
            return;
        }
        ch.end = Some(at);
        ch.hangup_cause = cause;
        ch.hangup_cause_txt = cause_txt.to_string();
        let call_id = ch.call.clone();
        let id: Box<str> = ch.id.clone();
        self.remember_ended(&id);
        let Some(call) = self.calls.get_mut(&*call_id) else {
            return;
        };
        call.live = call.live.saturating_sub(1);
        call.last_event = at;
        let mut ended_conv = false;
        if let Some(conv) = call.conv_mut(&id)
            && conv.ended.is_none()
        {
            conv.ended = Some(at);
            if conv.answered.is_none() && conv.dial_status.is_empty() {
                conv.result = result_of_cause(cause.unwrap_or(0), false);
            }
            ended_conv = true;
        }
        if ended_conv {
            self.emit(&call_id, Stage::ConversationEnded, Some(&id), at, out);
        }
        if self.calls.get(&*call_id).is_some_and(|c| c.live == 0) {
            self.finish_call(&call_id, at, out);
        }
    }

    /// End a call: close its open conversations, emit `call_ended`, drop its state.
    fn finish_call(&mut self, call_id: &str, at: Time, out: &mut Vec<StageEvent>) {
        let open: Vec<Box<str>> = match self.calls.get_mut(call_id) {
            Some(c) => {
                c.end = Some(at);
                c.convs
                    .iter()
                    .filter(|cv| cv.ended.is_none())
                    .map(|cv| cv.id.clone())
                    .collect()
            }
            None => return,
        };
        for id in open {
            if let Some(c) = self.calls.get_mut(call_id)
                && let Some(conv) = c.conv_mut(&id)
            {
                conv.ended = Some(at);
                if conv.answered.is_none() && conv.result == 0 {
                    conv.result = 487;
                }
            }
            self.emit(call_id, Stage::ConversationEnded, Some(&id), at, out);
        }
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        // A call that only existed until its channels joined another call (and never
        // showed a conversation) leaves no trace.
        if call.emitted_any || call.merged_into.is_empty() {
            self.emit(call_id, Stage::CallEnded, None, at, out);
        }
        if let Some(call) = self.calls.remove(call_id) {
            for id in &call.channels {
                if let Some(ch) = self.channels.get(id)
                    && &*ch.call == call_id
                {
                    self.channels.remove(id);
                    self.need_did.remove(id);
                    self.remember_ended(id);
                }
            }
        }
    }

    fn on_hold(&mut self, m: &Message, hold: bool, at: Time, out: &mut Vec<StageEvent>) {
        self.track_linkedid(m, "", at, out);
        let id = g(m, "Uniqueid");
        let Some(ch) = self.channels.get(id) else {
            return;
        };
        let is_client = ch.kind == Kind::Trunk;
        let call_id = ch.call.clone();
        if let Some(call) = self.calls.get_mut(&*call_id) {
            call.last_event = at;
            set_parked(call, id, is_client, hold);
        }
    }

    fn on_parked(&mut self, m: &Message, parked: bool, at: Time) {
        let id = g(m, "ParkeeUniqueid");
        let Some(ch) = self.channels.get(id) else {
            return;
        };
        let call_id = ch.call.clone();
        if let Some(call) = self.calls.get_mut(&*call_id) {
            call.last_event = at;
            set_parked(call, id, true, parked);
        }
    }

    /// Someone took a parked call: the retriever's phone is a new conversation of the
    /// parked call, talking at once.
    fn on_unparked(&mut self, m: &Message, at: Time, out: &mut Vec<StageEvent>) {
        let parkee = g(m, "ParkeeUniqueid");
        let Some(call_id) = self.call_of(parkee) else {
            return;
        };
        if let Some(call) = self.calls.get_mut(&*call_id) {
            set_parked(call, parkee, true, false);
        }
        let Some(ret) = self.ensure_chan(m, "Retriever", at) else {
            return;
        };
        self.adopt_as_talking(&ret, &call_id, "parking", at, out);
    }

    /// Directed/group pickup: the picker answers a ringing phone's conversation.
    fn on_pickup(&mut self, m: &Message, at: Time) {
        let target = g(m, "TargetUniqueid");
        let picker = g(m, "Channel");
        let (_, ep) = split_channel_name(picker);
        let Some(call_id) = self.call_of(target) else {
            return;
        };
        let name = unknown_to_empty(g(m, "CallerIDName")).to_string();
        let is_ext = self.classify.is_internal_number(ep);
        if let Some(call) = self.calls.get_mut(&*call_id) {
            call.last_event = at;
            if let Some(conv) = call.conv_mut(target) {
                conv.via = "pickup";
                if is_ext {
                    conv.user = Some(User {
                        number: ep.to_string(),
                        name,
                    });
                }
            }
        }
    }

    /// Move `chan` into `call_id` as a conversation that is already talking.
    fn adopt_as_talking(
        &mut self,
        chan: &str,
        call_id: &str,
        via: &'static str,
        at: Time,
        out: &mut Vec<StageEvent>,
    ) {
        let Some(ch) = self.channels.get(chan) else {
            return;
        };
        if &*ch.call != call_id {
            self.move_chan(chan, call_id, at, out);
        }
        let Some(ch) = self.channels.get_mut(chan) else {
            return;
        };
        // Its own Linkedid will only catch up later; do not move it back then.
        ch.seen_linkedid = call_id.into();
        if ch.answer.is_none() {
            ch.answer = Some(at);
        }
        let user = (ch.kind == Kind::Internal).then(|| User {
            number: ch.endpoint.clone(),
            name: ch.caller_name.clone(),
        });
        let id: Box<str> = ch.id.clone();
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        if call.convs.iter().any(|c| c.id == id) {
            return;
        }
        call.convs.push(Conv {
            id: id.clone(),
            user,
            requested: at,
            answered: Some(at),
            ended: None,
            dial_status: "ANSWER".into(),
            result: 200,
            is_parked: false,
            via,
        });
        self.emit(call_id, Stage::ConversationRequested, Some(&id), at, out);
        self.emit(call_id, Stage::ConversationAccepted, Some(&id), at, out);
    }

    // ---- resync after an AMI reconnect ----

    /// Start rebuilding from `CoreShowChannels` after an AMI reconnect: call this,
    /// send the action, then pass its `CoreShowChannel` events to
    /// [`Tracker::resync_channel`] and finish with [`Tracker::end_resync`] (or simply
    /// feed everything to [`Tracker::handle`], which does both while a resync runs).
    /// Ordinary events may interleave: channels they create count as alive.
    pub fn begin_resync(&mut self) {
        self.resync = Some(HashSet::new());
    }

    /// Give up a resync whose `CoreShowChannels` failed: nothing is ended.
    pub fn abort_resync(&mut self) {
        self.resync = None;
    }

    /// One `CoreShowChannel` event of the resync.
    pub fn resync_channel(&mut self, m: &Message, at: Time) {
        let id = g(m, "Uniqueid");
        if id.is_empty() {
            return;
        }
        let known = self.channels.contains_key(id);
        // A channel first seen now started `Duration` ago.
        let start = if known {
            at
        } else {
            at - chrono::Duration::seconds(parse_hms(g(m, "Duration")).unwrap_or(0) as i64)
        };
        if let Some(set) = self.resync.as_mut() {
            set.insert(id.into());
        }
        if !known && self.ensure_chan(m, "", start).is_none() {
            return;
        }
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if g(m, "ChannelStateDesc") == "Up" && ch.answer.is_none() {
            ch.answer = Some(at);
        }
        // Known from before the disconnect: whatever made it ring may have been
        // missed meanwhile (end_resync skips it if it has its conversation).
        if known && !ch.born_in_resync {
            ch.resync_new = true;
        }
        // The snapshot is newer than whatever created the channel: keep what it
        // tells about the numbers, never blanking a known one. (`Exten` is left
        // alone: on a known channel it has moved on through the dialplan.)
        let connected = unknown_to_empty(g(m, "ConnectedLineNum"));
        if !connected.is_empty() {
            ch.connected_num = connected.to_string();
        }
        let caller = unknown_to_empty(g(m, "CallerIDNum"));
        if !caller.is_empty() {
            ch.cur_caller_num = caller.to_string();
        }
        if g(m, "Application").eq_ignore_ascii_case("Dial") {
            ch.dial_data = g(m, "ApplicationData").to_string();
        }
        let call = ch.call.clone();
        if let Some(c) = self.calls.get_mut(&*call) {
            c.last_event = at;
        }
    }

    /// Client number and office line of an outbound call whose trunk leg was only
    /// seen in a resync (its `DialBegin` went by unseen). On that leg Asterisk shows
    /// the dialed number as `Exten` and `CallerIDNum` and the office line as
    /// `ConnectedLineNum`; the employee's leg runs `Dial(…/number@trunk)` and shows
    /// the client as `ConnectedLineNum`.
    fn resync_trunk_numbers(&self, call: &Call, trunk: &Chan) -> (String, String) {
        let external = |n: &str| !n.is_empty() && !self.classify.is_internal_number(n);
        let primary = self.primary(call).filter(|p| p.id != trunk.id);
        let from_dial = |p: &Chan| dialed_number(p.dial_data.split(',').next().unwrap_or(""));
        let dialed = [
            dialed_number(&trunk.exten),
            primary.map(from_dial).unwrap_or_default(),
            primary
                .map(|p| dialed_number(&p.connected_num))
                .unwrap_or_default(),
            dialed_number(&trunk.cur_caller_num),
        ]
        .into_iter()
        .find(|n| external(n))
        .unwrap_or_default();
        let line = [
            trunk.connected_num.clone(),
            primary
                .map(|p| p.cur_caller_num.clone())
                .unwrap_or_default(),
        ]
        .into_iter()
        .find(|n| external(n) && *n != dialed)
        .unwrap_or_default();
        (dialed, line)
    }

    /// Finish the resync: calls whose channels vanished while disconnected end with
    /// what is known; channels whose ringing was missed get their conversations.
    pub fn end_resync(&mut self, at: Time) -> Vec<StageEvent> {
        let mut out = Vec::new();
        let Some(seen) = self.resync.take() else {
            return out;
        };
        let mut vanished: Vec<Box<str>> = self
            .channels
            .values()
            .filter(|c| c.end.is_none() && !seen.contains(&c.id))
            .map(|c| c.id.clone())
            .collect();
        vanished.sort();
        for id in vanished {
            if let Some(ch) = self.channels.get(&id) {
                tracing::warn!(call_id = %ch.call, channel = %ch.name,
                    "channel vanished while AMI was disconnected; ending it with what is known");
            }
            self.hangup_chan(&id, None, "vanished during AMI disconnect", at, &mut out);
        }
        // Channels whose DialBegin was missed, by call, in order of appearance.
        let mut fresh: Vec<Box<str>> = self
            .channels
            .values()
            .filter(|c| c.resync_new)
            .map(|c| c.call.clone())
            .collect();
        fresh.sort();
        fresh.dedup();
        for call_id in fresh {
            let members: Vec<Box<str>> = match self.calls.get(&call_id) {
                Some(c) => c.channels.clone(),
                None => continue,
            };
            for id in members {
                let Some(ch) = self.channels.get_mut(&id) else {
                    continue;
                };
                if !std::mem::take(&mut ch.resync_new) || ch.end.is_some() {
                    continue;
                }
                if *ch.id == *call_id || matches!(ch.kind, Kind::Local | Kind::Other) {
                    continue;
                }
                let Some(call) = self.calls.get(&call_id) else {
                    continue;
                };
                if call.convs.iter().any(|c| c.id == id) {
                    continue;
                }
                if call.convs.len() >= MAX_CONVERSATIONS {
                    continue;
                }
                let Some(ch) = self.channels.get(&id) else {
                    continue;
                };
                let answered = ch.answer;
                let trunk = ch.kind == Kind::Trunk && call.trunk_leg.is_none();
                let numbers = trunk.then(|| self.resync_trunk_numbers(call, ch));
                let user = match ch.kind {
                    Kind::Internal => Some(User {
                        number: ch.endpoint.clone(),
                        name: ch.caller_name.clone(),
                    }),
                    _ => self.first_employee(call).map(|number| User {
                        name: self.employee_name(call, &number),
                        number,
                    }),
                };
                let Some(call) = self.calls.get_mut(&call_id) else {
                    continue;
                };
                if let Some((dialed, line)) = numbers {
                    call.trunk_leg = Some(id.clone());
                    if call.dialed_number.is_empty() {
                        call.dialed_number = dialed;
                    }
                    if call.line_from_dial.is_empty() {
                        call.line_from_dial = line;
                    }
                }
                call.last_event = at;
                call.convs.push(Conv {
                    id: id.clone(),
                    user,
                    requested: at,
                    answered,
                    ended: None,
                    dial_status: if answered.is_some() {
                        "ANSWER".into()
                    } else {
                        String::new()
                    },
                    result: if answered.is_some() { 200 } else { 0 },
                    is_parked: false,
                    via: "resync",
                });
                self.emit(
                    &call_id,
                    Stage::ConversationRequested,
                    Some(&id),
                    at,
                    &mut out,
                );
                if answered.is_some() {
                    self.emit(
                        &call_id,
                        Stage::ConversationAccepted,
                        Some(&id),
                        at,
                        &mut out,
                    );
                }
            }
        }
        // Whatever was not listed keeps no resync mark.
        for ch in self.channels.values_mut() {
            ch.resync_new = false;
            ch.born_in_resync = false;
        }
        out
    }

    /// End calls that had no event for `reap_after` (lost hangups, a PBX restart while
    /// disconnected). Call it now and then with the current time.
    pub fn reap(&mut self, now: Time) -> Vec<StageEvent> {
        let mut out = Vec::new();
        let mut stale: Vec<Box<str>> = self
            .calls
            .values()
            .filter(|c| now - c.last_event > self.reap_after)
            .map(|c| c.id.clone())
            .collect();
        stale.sort();
        for call_id in stale {
            tracing::warn!(call_id = %call_id, "no event for too long: ending the call with what is known");
            let live: Vec<Box<str>> = self
                .calls
                .get(&call_id)
                .map(|c| c.channels.clone())
                .unwrap_or_default();
            for id in live {
                if self.calls.contains_key(&call_id) {
                    self.hangup_chan(&id, None, "reaped", now, &mut out);
                }
            }
            if self.calls.contains_key(&call_id) {
                self.finish_call(&call_id, now, &mut out);
            }
        }
        out
    }

    /// The calls going on now, for the admin page.
    pub fn live_calls(&self) -> Vec<LiveCall> {
        let mut v: Vec<LiveCall> = self
            .calls
            .values()
            .map(|c| {
                let parties = self.parties(c);
                let mut ringing = Vec::new();
                let mut talking = Vec::new();
                for cv in c.convs.iter().filter(|cv| cv.ended.is_none()) {
                    let who = cv
                        .user
                        .as_ref()
                        .map(|u| u.number.clone())
                        .unwrap_or_default();
                    if cv.answered.is_some() {
                        talking.push(who);
                    } else {
                        ringing.push(who);
                    }
                }
                LiveCall {
                    id: c.id.to_string(),
                    direction: parties.direction,
                    client_phone: parties.client.number,
                    line_number: parties.line,
                    ringing,
                    talking,
                    started: self.fmt_time(Some(c.start)),
                    started_unix: c.start.timestamp(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.started_unix.cmp(&b.started_unix).then(a.id.cmp(&b.id)));
        v
    }

    // ---- snapshots ----

    fn emit(
        &mut self,
        call_id: &str,
        stage: Stage,
        conv: Option<&str>,
        at: Time,
        out: &mut Vec<StageEvent>,
    ) {
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        let call_full = self.snapshot(call, at);
        tracing::debug!(call_id = %call_id, stage = stage.as_str(), conversation_id = conv.unwrap_or(""), "stage");
        out.push(StageEvent {
            stage,
            conversation_id: conv.map(str::to_string),
            call_full,
        });
        if let Some(c) = self.calls.get_mut(call_id) {
            c.emitted_any = true;
        }
    }

    fn primary<'a>(&'a self, call: &'a Call) -> Option<&'a Chan> {
        self.channels
            .get(&call.id)
            .filter(|c| c.call == call.id)
            .or_else(|| call.channels.first().and_then(|id| self.channels.get(id)))
    }

    /// Direction, client, office line and trunk of a call as known now.
    fn parties(&self, call: &Call) -> Parties {
        let primary = self.primary(call);
        let pkind = primary.map(|p| p.kind).unwrap_or(Kind::Other);
        let trunk_leg = call.trunk_leg.as_ref().and_then(|id| self.channels.get(id));
        if pkind == Kind::Trunk {
            let p = primary.map(|p| {
                (
                    p.caller_num.clone(),
                    p.caller_name.clone(),
                    p.exten.clone(),
                    p.endpoint.clone(),
                )
            });
            let (num, name, did, ep) = p.unwrap_or_default();
            return Parties {
                direction: Direction::Inbound,
                client: Party { number: num, name },
                trunk: Some(Party {
                    number: did.clone(),
                    name: ep,
                }),
                line: did,
                client_chan: primary.map(|p| p.id.clone()),
            };
        }
        if let Some(t) = trunk_leg {
            return Parties {
                direction: Direction::Outbound,
                client: Party {
                    number: call.dialed_number.clone(),
                    name: String::new(),
                },
                trunk: Some(Party {
                    number: call.line_from_dial.clone(),
                    name: t.endpoint.clone(),
                }),
                line: call.line_from_dial.clone(),
                client_chan: Some(t.id.clone()),
            };
        }
        // Click-to-call before the client's leg exists: kolokol's Originate shows the
        // client's number as caller ID on the employee's phone.
        if let Some(p) = primary.filter(|p| p.created_down) {
            let n = &p.cur_caller_num;
            if !n.is_empty() && *n != p.endpoint && !self.classify.is_internal_number(n) {
                return Parties {
                    direction: Direction::Outbound,
                    client: Party {
                        number: n.clone(),
                        name: String::new(),
                    },
                    trunk: None,
                    line: String::new(),
                    client_chan: None,
                };
            }
        }
        // Rebuilt after its trunk leg was gone: an employee's own channel dialing a
        // number that is not internal was an outbound call.
        if call.rebuilt
            && let Some(p) = primary.filter(|p| p.kind == Kind::Internal && p.id == call.id)
        {
            let external = |n: &str| !n.is_empty() && !self.classify.is_internal_number(n);
            let dialed = [
                dialed_number(&p.exten),
                dialed_number(p.dial_data.split(',').next().unwrap_or("")),
            ]
            .into_iter()
            .find(|n| external(n));
            if let Some(number) = dialed {
                let line = Some(p.cur_caller_num.clone())
                    .filter(|n| external(n) && *n != number)
                    .unwrap_or_default();
                return Parties {
                    direction: Direction::Outbound,
                    client: Party {
                        number,
                        name: String::new(),
                    },
                    trunk: None,
                    line,
                    client_chan: None,
                };
            }
        }
        // Internal: the "client" is the called extension.
        let callee = call
            .convs
            .iter()
            .find_map(|c| c.user.as_ref().map(|u| u.number.clone()))
            .filter(|n| primary.is_none_or(|p| *n != p.endpoint))
            .or_else(|| primary.map(|p| p.exten.clone()))
            .unwrap_or_default();
        Parties {
            direction: Direction::Internal,
            client: Party {
                number: callee,
                name: String::new(),
            },
            trunk: None,
            line: String::new(),
            client_chan: None,
        }
    }

    /// `YYYY-MM-DD HH:MM:SS` at the configured offset. Written by hand: this runs
    /// for every time of every channel of every snapshot, and strftime parsing its
    /// pattern each time was a visible share of the tracker's cost.
    fn fmt_time(&self, t: Option<Time>) -> String {
        let Some(t) = t else {
            return UNSET_TIME.to_string();
        };
        let l = t.with_timezone(&self.offset).naive_local();
        let (y, mo, d) = (l.year(), l.month(), l.day());
        let (h, mi, se) = (l.hour(), l.minute(), l.second());
        if !(0..=9999).contains(&y) {
            return UNSET_TIME.to_string();
        }
        let mut b = [0u8; 19];
        let put = |b: &mut [u8], at: usize, v: u32, w: usize| {
            let mut v = v;
            for i in (0..w).rev() {
                b[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(&mut b, 0, y as u32, 4);
        b[4] = b'-';
        put(&mut b, 5, mo, 2);
        b[7] = b'-';
        put(&mut b, 8, d, 2);
        b[10] = b' ';
        put(&mut b, 11, h, 2);
        b[13] = b':';
        put(&mut b, 14, mi, 2);
        b[16] = b':';
        put(&mut b, 17, se, 2);
        String::from_utf8_lossy(&b).into_owned()
    }

    fn channel_data(
        &self,
        ch: &Chan,
        call: &Call,
        parties: &Parties,
        conv: Option<&Conv>,
    ) -> ChannelData {
        let primary = *ch.id == *call.id;
        let me = Party {
            number: if ch.kind == Kind::Internal {
                ch.endpoint.clone()
            } else {
                ch.caller_num.clone()
            },
            name: ch.caller_name.clone(),
        };
        let employee = || {
            conv.and_then(|c| c.user.clone())
                .map(|u| Party {
                    number: u.number,
                    name: u.name,
                })
                .unwrap_or_default()
        };
        let (from, to) = match (primary, ch.kind, parties.direction) {
            (true, Kind::Trunk, _) => (
                parties.client.clone(),
                Party {
                    number: parties.line.clone(),
                    name: String::new(),
                },
            ),
            // The employee's phone rung by a click-to-call Originate.
            (true, Kind::Internal, _) if conv.is_some() => (parties.client.clone(), me),
            (true, _, _) => (me, parties.client.clone()),
            (false, Kind::Trunk, _) => (employee(), parties.client.clone()),
            (false, Kind::Internal, Direction::Internal) => (
                self.primary(call)
                    .map(|p| Party {
                        number: p.endpoint.clone(),
                        name: p.caller_name.clone(),
                    })
                    .unwrap_or_default(),
                me,
            ),
            (false, Kind::Internal, _) => (parties.client.clone(), me),
            _ => (
                me,
                Party {
                    number: ch.exten.clone(),
                    name: String::new(),
                },
            ),
        };
        let answer = match conv {
            Some(c) => c.answered,
            None => ch.answer,
        };
        let state = if ch.end.is_some() || conv.is_some_and(|c| c.ended.is_some()) {
            "ended"
        } else if answer.is_some() {
            "talking"
        } else {
            "ringing"
        };
        let end = ch.end.or(conv.and_then(|c| c.ended));
        let extra = ChannelExtra {
            endpoint: ch.endpoint.clone(),
            context: ch.context.clone(),
            exten: ch.exten.clone(),
            caller_id_num: ch.cur_caller_num.clone(),
            dial_status: conv.map(|c| c.dial_status.clone()),
            hangup_cause: ch.hangup_cause,
            hangup_cause_txt: ch.hangup_cause.map(|_| ch.hangup_cause_txt.clone()),
            rest: serde_json::Map::new(),
        };
        ChannelData {
            id: ch.id.to_string(),
            name: ch.name.clone(),
            from,
            to,
            trunk: parties.trunk.clone(),
            kind: match parties.direction {
                Direction::Inbound => "incoming",
                Direction::Outbound => "outgoing",
                Direction::Internal => "local",
            }
            .into(),
            state: state.into(),
            start_time: self.fmt_time(Some(ch.start)),
            answer_time: self.fmt_time(answer),
            end_time: self.fmt_time(end),
            was_answered: answer.is_some(),
            is_primary: primary,
            extra,
        }
    }

    fn snapshot(&self, call: &Call, at: Time) -> CallFull {
        let parties = self.parties(call);
        let now = call.end.unwrap_or(at);
        let client_up = parties
            .client_chan
            .as_ref()
            .and_then(|id| self.channels.get(id))
            .and_then(|c| c.answer);

        let mut conversations = Vec::with_capacity(call.convs.len());
        let mut talk: Vec<(Time, Time)> = Vec::new();
        let mut first_talk: Option<Time> = None;
        for cv in &call.convs {
            let Some(ch) = self.channels.get(&cv.id) else {
                continue;
            };
            let end = cv.ended.unwrap_or(now);
            if let Some(a) = cv.answered {
                let from = match client_up {
                    Some(u) if u > a => u,
                    _ => a,
                };
                if end > from {
                    talk.push((from, end));
                }
                first_talk = Some(first_talk.map_or(from, |f: Time| f.min(from)));
            }
            let record = if ch.record.is_empty() && cv.answered.is_some() {
                call.record.clone()
            } else {
                ch.record.clone()
            };
            conversations.push((
                cv.id.to_string(),
                Conversation {
                    channel: self.channel_data(ch, call, &parties, Some(cv)),
                    user: cv.user.clone(),
                    is_parked: cv.is_parked,
                    result: cv.result,
                    dial_status: cv.dial_status.clone(),
                    record,
                    ring_duration: secs(cv.requested, cv.answered.or(cv.ended).unwrap_or(now)),
                    talk_duration: cv.answered.map_or(0, |a| secs(a, end)),
                    via: cv.via.to_string(),
                },
            ));
        }
        talk.sort();
        let mut talk_ms = 0i64;
        let mut cur: Option<(Time, Time)> = None;
        for (s, e) in talk {
            match cur {
                Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
                Some((cs, ce)) => {
                    talk_ms += (ce - cs).num_milliseconds();
                    cur = Some((s, e));
                }
                None => cur = Some((s, e)),
            }
        }
        if let Some((cs, ce)) = cur {
            talk_ms += (ce - cs).num_milliseconds();
        }

        // Who talked last: the answered conversation that ended last (still talking
        // counts as latest); ties go to the later answer.
        let answered_by = call
            .convs
            .iter()
            .filter(|c| c.answered.is_some())
            .max_by_key(|c| (c.ended.is_none(), c.ended, c.answered))
            .and_then(|c| c.user.as_ref().map(|u| u.number.clone()))
            .unwrap_or_default();
        let any_answered = call.convs.iter().any(|c| c.answered.is_some());
        let result = if any_answered {
            200
        } else if call.queue_abandoned {
            487
        } else if let Some(last) = call
            .convs
            .iter()
            .filter(|c| c.ended.is_some() && c.result != 0)
            .max_by_key(|c| c.ended)
        {
            last.result
        } else if call.end.is_some() {
            let cause = self.primary(call).and_then(|p| p.hangup_cause).unwrap_or(0);
            result_of_cause(cause, false)
        } else {
            0
        };
        let record = call
            .convs
            .iter()
            .filter(|c| c.answered.is_some())
            .rev()
            .filter_map(|c| self.channels.get(&c.id))
            .map(|ch| ch.record.clone())
            .find(|r| !r.is_empty())
            .or_else(|| {
                call.convs
                    .iter()
                    .filter_map(|c| self.channels.get(&c.id))
                    .map(|ch| ch.record.clone())
                    .find(|r| !r.is_empty())
            })
            .unwrap_or_else(|| call.record.clone());
        let active = call
            .convs
            .iter()
            .rev()
            .find(|c| c.ended.is_none() && c.answered.is_some())
            .or_else(|| call.convs.iter().rev().find(|c| c.ended.is_none()))
            .map(|c| c.id.to_string())
            .unwrap_or_default();
        let channel = self
            .primary(call)
            .map(|p| {
                let conv = call.convs.iter().find(|c| c.id == p.id);
                self.channel_data(p, call, &parties, conv)
            })
            .unwrap_or_default();
        CallFull {
            id: call.id.to_string(),
            direction: parties.direction,
            client_phone: parties.client.number.clone(),
            line_number: parties.line.clone(),
            answered_by,
            result,
            record,
            duration: secs(call.start, now),
            talk_duration: ((talk_ms.max(0) + 500) / 1000) as u64,
            wait_duration: secs(call.start, first_talk.unwrap_or(now)),
            active_conversation_id: active,
            channel,
            conversations: Conversations(conversations),
            queue: call.queue.clone(),
            is_ivr: call.end.is_some() && !any_answered && call.convs.is_empty(),
            variables: call.variables.clone(),
            originate_action_id: call.originate_action_id.clone(),
            hangup_by: call.hangup_by.to_string(),
            merged_into: call.merged_into.clone(),
            entity: Value::Null,
            deal: Value::Null,
            extra: serde_json::Map::new(),
        }
    }
}

struct Parties {
    direction: Direction,
    client: Party,
    trunk: Option<Party>,
    line: String,
    client_chan: Option<Box<str>>,
}

fn set_parked(call: &mut Call, chan: &str, is_client: bool, parked: bool) {
    if let Some(c) = call.conv_mut(chan) {
        c.is_parked = parked;
        return;
    }
    if is_client {
        // The client is held/parked: the conversation they were talking in is.
        let target = if parked {
            call.convs
                .iter_mut()
                .rev()
                .find(|c| c.ended.is_none() && c.answered.is_some())
        } else {
            call.convs.iter_mut().rev().find(|c| c.is_parked)
        };
        if let Some(c) = target {
            c.is_parked = parked;
        }
    }
}

/// The number in a Dial string: `79161234567@trunk` → `79161234567`,
/// `trunk/sip:+7916@host` → `+7916`. "" when it is not a number.
fn dialed_number(dial_string: &str) -> String {
    let s = dial_string.rsplit('/').next().unwrap_or("");
    let s = s.split('@').next().unwrap_or("");
    let s = s
        .strip_prefix("sip:")
        .or_else(|| s.strip_prefix("tel:"))
        .unwrap_or(s);
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'*' | b'#'));
    if ok { s.to_string() } else { String::new() }
}

/// `HH:MM:SS` (CoreShowChannel `Duration`) in seconds.
fn parse_hms(s: &str) -> Option<u64> {
    let mut total = 0u64;
    for part in s.split(':') {
        total = total
            .checked_mul(60)?
            .checked_add(part.parse::<u64>().ok()?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_strings_give_numbers() {
        assert_eq!(dialed_number("79161234567@trunk"), "79161234567");
        assert_eq!(
            dialed_number("trunk/sip:+79161234567@1.2.3.4"),
            "+79161234567"
        );
        assert_eq!(dialed_number("PJSIP/101"), "101");
        assert_eq!(dialed_number("Local/101@from-queue/n"), "");
        assert_eq!(parse_hms("01:02:03"), Some(3723));
    }

    #[test]
    fn results_map_like_sip() {
        assert_eq!(result_of_dial_status("BUSY", None), 486);
        assert_eq!(result_of_dial_status("NOANSWER", Some(0)), 480);
        assert_eq!(result_of_dial_status("CANCEL", Some(19)), 487);
        assert_eq!(result_of_dial_status("CONGESTION", None), 503);
        assert_eq!(result_of_dial_status("CHANUNAVAIL", Some(1)), 404);
        assert_eq!(result_of_cause(17, false), 486);
        assert_eq!(result_of_cause(16, true), 200);
    }
}
