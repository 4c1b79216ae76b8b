//! Stand-ins for the outside world, used by the tests and by `kolokol demo`: a fake
//! Asterisk AMI server that replays recorded fixtures, and stateful sandbox Kommo and
//! Bitrix24 servers that implement the documented API behaviour. Never used by
//! production paths.

pub mod ami_server;
pub mod bitrix24;
pub mod demo;
pub mod kommo;
