//! The call tracker: a pure state machine that folds AMI events into calls and their
//! conversations and emits stage changes. No I/O, no clock reads. (Being built: issue 3.)

pub mod call_full;
pub mod config;

pub use call_full::{CallFull, Direction, Stage, StageEvent};
pub use config::CallsConfig;
