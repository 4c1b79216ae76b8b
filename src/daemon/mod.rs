//! `kolokol run`: wiring of AMI → tracker → customizations → outbox → CRM workers,
//! plus the HTTP and FastAGI servers.

pub mod outbox_worker;
pub mod systemd;
