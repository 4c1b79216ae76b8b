//! The Asterisk Manager Interface: framing ([`codec`]), messages ([`message`]) and the
//! long-lived client ([`client`]: login, actions, keepalive, reconnect).
//!
//! Nothing outside this folder parses AMI bytes.

pub mod client;
pub mod codec;
pub mod config;
pub mod message;

pub use client::{ActionResponse, AmiClient, AmiError, AmiEvent, AmiHandle, AmiStats, LinkState};
pub use codec::{AmiCodec, Frame, Malformed, MalformedReason};
pub use config::{AmiAuth, AmiConfig};
pub use message::Message;
