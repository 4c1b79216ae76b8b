//! `kolokol run`: wiring of AMI → tracker → customizations → outbox → CRM workers,
//! plus the HTTP and FastAGI servers. (Being built: issue 6.)

pub mod outbox_worker;
