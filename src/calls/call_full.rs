//! `call_full`: the snapshot of a call that every stage event carries, that every
//! customization receives and that the CRM connectors register.
//!
//! Field names and formats follow Itgrix's documented `call_full` so admins can port
//! their scripts; the top-level fields listed first are relied on by the rest of
//! kolokol (CRM connectors, journal, tools) and must keep their names and types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// The full call snapshot. See `customizations/README.md` for every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CallFull {
    /// The call id: Asterisk's Linkedid of the call.
    pub id: String,
    pub direction: Direction,
    /// The client's phone as Asterisk gave it (normalisation happens per CRM).
    pub client_phone: String,
    /// The DID the client called (inbound) or the office line used (outbound).
    pub line_number: String,
    /// Internal number of the employee who talked last; "" if nobody answered.
    pub answered_by: String,
    /// SIP-like result: 200 answered, 486 busy, 480 no answer, 487 cancelled, ...
    pub result: u16,
    /// Recording file path of the last recorded conversation; "" if none.
    pub record: String,
    /// Seconds from the first channel to the last hangup.
    pub duration: u64,
    /// Seconds of talk (answered conversations).
    pub talk_duration: u64,
    /// Everything else of Itgrix's shape (`active_conversation_id`, `channel`,
    /// `conversations`, channel objects, `entity`, `deal`, ...), owned by the tracker.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}
