//! kolokol connects an Asterisk PBX (AMI, FastAGI) to the CRMs Kommo (amoCRM) and
//! Bitrix24.
//!
//! Modules depend downward only: `ami` and `phone` at the bottom; `calls` (the pure
//! tracker) on `ami`; `hooks`, `records`, `store` beside it; `crm` on those; `agi` and
//! `http` on `crm`; `daemon` wires everything; `cli` is the command-line edge.

pub mod agi;
pub mod ami;
pub mod calls;
pub mod cli;
pub mod config;
pub mod crm;
pub mod daemon;
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod originate;
pub mod phone;
pub mod records;
pub mod sandbox;
pub mod store;
