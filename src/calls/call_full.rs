//! `call_full`: the snapshot of a call that every stage event carries, that every
//! customization receives and that the CRM connectors register.
//!
//! Field names and formats follow Itgrix's documented `call_full` so admins can port
//! their scripts; the top-level fields listed first are relied on by the rest of
//! kolokol (CRM connectors, journal, tools) and must keep their names and types.
//! Every field is documented for admins in `customizations/README.md (section call_full)`.

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The value Itgrix uses for a time that has not happened (yet).
pub const UNSET_TIME: &str = "0001-01-01 00:00:00";

/// Which way the call went, seen from the office.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Inbound,
    Outbound,
    Internal,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Internal => "internal",
        }
    }
}

/// A stage of a call's life, as Itgrix names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    ConversationRequested,
    ConversationAccepted,
    ConversationEnded,
    CallEnded,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::ConversationRequested => "conversation_requested",
            Stage::ConversationAccepted => "conversation_accepted",
            Stage::ConversationEnded => "conversation_ended",
            Stage::CallEnded => "call_ended",
        }
    }
}

/// One stage change emitted by the tracker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEvent {
    pub stage: Stage,
    /// The conversation (its uniqueid) for conversation stages; `None` for `call_ended`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub conversation_id: Option<String>,
    pub call_full: CallFull,
}

/// The full call snapshot. See `customizations/README.md (section call_full)` for every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CallFull {
    /// The call id: Asterisk's Linkedid of the call.
    pub id: String,
    pub direction: Direction,
    /// The client's phone as Asterisk gave it (normalisation happens per CRM). For
    /// internal calls: the called extension.
    pub client_phone: String,
    /// The DID the client called (inbound) or the office line used (outbound).
    pub line_number: String,
    /// Internal number of the employee who talked last; "" if nobody answered.
    pub answered_by: String,
    /// SIP-like result: 200 answered, 486 busy, 480 no answer, 487 cancelled, ...
    pub result: u16,
    /// Recording file path of the last recorded conversation; "" if none.
    pub record: String,
    /// Seconds from the first channel to the last hangup (so far, while live).
    pub duration: u64,
    /// Seconds during which the client talked with an employee (union of the answered
    /// conversations' talk time, counted from when the client's own leg was up).
    pub talk_duration: u64,
    /// Seconds from the start of the call to the first answer (or to the end if
    /// nobody answered).
    pub wait_duration: u64,
    /// Uniqueid of the conversation going on now (talking first, else the latest
    /// ringing one); "" when none.
    pub active_conversation_id: String,
    /// The call's main channel (its uniqueid is the Linkedid).
    pub channel: ChannelData,
    /// Every conversation of the call, keyed by the uniqueid of the ringing leg, in the
    /// order they started.
    pub conversations: Conversations,
    /// Queue the call went through ("" if none).
    pub queue: String,
    /// Itgrix's `is_ivr`: the call ended unanswered without ever ringing a phone.
    pub is_ivr: bool,
    /// Variables set on the call by the Originate that started it (click-to-call, e.g.
    /// a CRM call id) and any variable named in `calls.keep_variables`.
    pub variables: serde_json::Map<String, Value>,
    /// `ActionID` of the Originate that started this call ("" if not originated).
    pub originate_action_id: String,
    /// Who hung up first: "client", "employee" or "" (unknown / not yet).
    pub hangup_by: String,
    /// The call whose channels this call was merged into (attended transfer between
    /// two calls, call pickup, parking retrieval); "" normally.
    pub merged_into: String,
    /// CRM entity found for the client; filled by the CRM side, `null` from the tracker.
    pub entity: Value,
    /// CRM deal/lead of the call; filled by the CRM side, `null` from the tracker.
    pub deal: Value,
    /// Fields added by others (customizations, connectors) are kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl CallFull {
    /// When the call started, Unix seconds: `start_timestamp` when the daemon stamped
    /// it, else the earliest channel `start_time` (`YYYY-MM-DD HH:MM:SS`), read at
    /// `offset`, the `[calls] time_offset` the tracker wrote it with. `None` when no
    /// time is known yet (Itgrix's `0001-01-01 00:00:00`).
    pub fn started_at(&self, offset: chrono::FixedOffset) -> Option<i64> {
        use chrono::TimeZone;
        if let Some(t) = self.extra.get("start_timestamp").and_then(Value::as_i64) {
            return Some(t);
        }
        let parse = |s: &str| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
                .ok()
                .and_then(|t| offset.from_local_datetime(&t).single())
                .map(|t| t.timestamp())
                .filter(|t| *t > 0)
        };
        std::iter::once(self.channel.start_time.as_str())
            .chain(
                self.conversations
                    .0
                    .iter()
                    .map(|(_, c)| c.channel.start_time.as_str()),
            )
            .filter_map(parse)
            .min()
    }
}

/// A number with the name shown with it (caller ID, endpoint or trunk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Party {
    pub number: String,
    pub name: String,
}

/// Itgrix's channel object: one Asterisk channel as the call sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelData {
    /// The channel's uniqueid.
    pub id: String,
    /// The channel name, e.g. `PJSIP/101-00000001`.
    pub name: String,
    /// Who calls on this channel.
    pub from: Party,
    /// Who is called on this channel.
    pub to: Party,
    /// The trunk the call uses: endpoint name and office line number; `null` for calls
    /// that never touch a trunk.
    pub trunk: Option<Party>,
    /// `incoming`, `outgoing`, `local` or `unknown`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `ringing`, `talking`, `ended` (`processed` is the connector's).
    pub state: String,
    pub start_time: String,
    pub answer_time: String,
    pub end_time: String,
    pub was_answered: bool,
    /// True for the call's main channel (uniqueid = linkedid).
    pub is_primary: bool,
    /// Asterisk details of the channel.
    pub extra: ChannelExtra,
}

/// Asterisk details of a channel (Itgrix's `extra`: more fields from the PBX).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ChannelExtra {
    /// Endpoint from the channel name (`101`, `trunk`, `101@from-queue` for Local).
    pub endpoint: String,
    /// Dialplan context the channel was created in.
    pub context: String,
    /// Extension: the DID on an inbound trunk channel; "" if only `s` was seen.
    pub exten: String,
    /// Caller ID number now (after dialplan rewrites).
    pub caller_id_num: String,
    /// Asterisk's DialStatus (conversation channels only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dial_status: Option<String>,
    /// Q.850 hangup cause, once hung up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hangup_cause: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hangup_cause_txt: Option<String>,
    /// Anything else (kept when a customization adds fields).
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

impl Default for ChannelData {
    fn default() -> Self {
        ChannelData {
            id: String::new(),
            name: String::new(),
            from: Party::default(),
            to: Party::default(),
            trunk: None,
            kind: "unknown".into(),
            state: "ringing".into(),
            start_time: UNSET_TIME.into(),
            answer_time: UNSET_TIME.into(),
            end_time: UNSET_TIME.into(),
            was_answered: false,
            is_primary: false,
            extra: ChannelExtra::default(),
        }
    }
}

/// The employee of a conversation as the PBX knows them (CRM user data is added by the
/// connectors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct User {
    /// Internal number (extension).
    pub number: String,
    /// Caller ID name of the extension, "" if unknown.
    pub name: String,
}

/// One conversation: a phone ringing at an employee (or at the client, outbound).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Conversation {
    /// The ringing leg's channel.
    pub channel: ChannelData,
    /// The employee of this conversation; `null` when there is none.
    pub user: Option<User>,
    /// On hold or parked right now.
    pub is_parked: bool,
    /// SIP-like result of this conversation (200, 486, 480, 487, ...).
    pub result: u16,
    /// Asterisk's DialStatus for this leg (ANSWER, BUSY, NOANSWER, CANCEL, ...; "" while ringing).
    pub dial_status: String,
    /// Recording of this conversation ("" if none).
    pub record: String,
    /// Seconds it rang.
    pub ring_duration: u64,
    /// Seconds it talked.
    pub talk_duration: u64,
    /// How it came to be: `dial`, `queue`, `transfer`, `originate`, `pickup`, `resync`.
    pub via: String,
}

/// Conversations keyed by uniqueid, in start order. Serialized as a JSON object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversations(pub Vec<(String, Conversation)>);

impl Conversations {
    pub fn get(&self, id: &str) -> Option<&Conversation> {
        self.0.iter().find(|(k, _)| k == id).map(|(_, c)| c)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Conversation)> {
        self.0.iter().map(|(k, c)| (k.as_str(), c))
    }
}

impl Serialize for Conversations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Conversations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Conversations;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of conversations keyed by uniqueid")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Conversations, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Conversation>()? {
                    out.push((k, v));
                }
                Ok(Conversations(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_read_at_the_configured_offset() {
        let mut c: CallFull = serde_json::from_value(serde_json::json!({
            "id": "1.0",
            "channel": {"start_time": "2026-11-21 23:47:41"},
            "conversations": {
                "1.1": {"channel": {"start_time": "2026-11-21 23:47:45"}},
                "1.2": {"channel": {"start_time": "0001-01-01 00:00:00"}},
            },
        }))
        .unwrap();
        let utc = chrono::FixedOffset::east_opt(0).unwrap();
        let msk = chrono::FixedOffset::east_opt(3 * 3600).unwrap();
        assert_eq!(c.started_at(utc), Some(1795304861));
        // The same wall-clock time written at +03:00 is three hours earlier.
        assert_eq!(c.started_at(msk), Some(1795304861 - 3 * 3600));
        c.extra
            .insert("start_timestamp".into(), serde_json::json!(5));
        assert_eq!(c.started_at(msk), Some(5), "the daemon's stamp wins");
        assert_eq!(CallFull::default().started_at(utc), None);
    }

    #[test]
    fn round_trips_and_keeps_unknown_fields() {
        let mut c = CallFull {
            id: "1.0".into(),
            result: 200,
            ..Default::default()
        };
        c.conversations.0.push((
            "1.1".into(),
            Conversation {
                user: Some(User {
                    number: "101".into(),
                    name: String::new(),
                }),
                ..Default::default()
            },
        ));
        c.extra.insert("custom".into(), Value::from(5));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["conversations"]["1.1"]["user"]["number"], "101");
        assert_eq!(v["channel"]["start_time"], UNSET_TIME);
        assert_eq!(v["custom"], 5);
        let back: CallFull = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }
}
