//! The call tracker: a pure state machine that folds AMI events into calls and their
//! conversations and emits stage changes (`conversation_requested`,
//! `conversation_accepted`, `conversation_ended`, `call_ended`), each with a
//! `call_full` snapshot. No I/O, no clock reads: the same bytes always replay to the
//! same result.
//!
//! ```no_run
//! use kolokol::calls::{CallsConfig, Tracker};
//! # fn demo(msg: &kolokol::ami::Message) -> anyhow::Result<()> {
//! let mut tracker = Tracker::new(&CallsConfig::default())?;
//! for ev in tracker.handle(msg, chrono::Utc::now()) {
//!     println!("{} {}", ev.stage.as_str(), ev.call_full.id);
//! }
//! # Ok(()) }
//! ```

pub mod call_full;
pub mod classify;
pub mod config;
pub mod replay;
pub mod tracker;

pub use call_full::{
    CallFull, ChannelData, ChannelExtra, Conversation, Conversations, Direction, Party, Stage,
    StageEvent, UNSET_TIME, User,
};
pub use config::{CallsConfig, CallsConfigError};
pub use replay::{ReplayError, replay_bytes};
pub use tracker::{LiveCall, Tracker};
