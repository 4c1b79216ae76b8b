//! Shared helpers for the Bitrix24 tests: a connector wired to a sandbox portal over
//! real HTTP, and `call_full` snapshots shaped like the fixtures' calls.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use kolokol::calls::{CallFull, Direction, Stage};
use kolokol::crm::bitrix24::{Bitrix24, Bitrix24Config, Deps, MemoryCallIdStore, PathRecords};
use kolokol::crm::{Connector, CrmError, Job, MemoryJobSteps, MemoryTokenStore};
use kolokol::hooks::{Customize, NoCustomizations};
use kolokol::sandbox::bitrix24::{SandboxBitrix24, SandboxHandle};
use serde_json::{Value, json};

pub struct Harness {
    pub sb: SandboxHandle,
    pub b24: Arc<Bitrix24>,
    pub store: Arc<MemoryCallIdStore>,
    pub tokens: Arc<MemoryTokenStore>,
    next_job: std::sync::atomic::AtomicI64,
}

/// Config for tests: webhook auth, no debounce, fast retries.
pub fn test_config(sb: &SandboxHandle) -> Bitrix24Config {
    Bitrix24Config {
        webhook_url: Some(sb.webhook_url()),
        card_debounce: Duration::ZERO,
        retry_backoff: Duration::from_millis(10),
        request_timeout: Duration::from_secs(5),
        ..Bitrix24Config::default()
    }
}

pub async fn harness(tweak: impl FnOnce(&mut Bitrix24Config, &SandboxHandle)) -> Harness {
    harness_with_hooks(tweak, Arc::new(NoCustomizations)).await
}

pub async fn harness_with_hooks(
    tweak: impl FnOnce(&mut Bitrix24Config, &SandboxHandle),
    hooks: Arc<dyn Customize>,
) -> Harness {
    let sb = SandboxBitrix24::start().await.expect("sandbox starts");
    let mut cfg = test_config(&sb);
    tweak(&mut cfg, &sb);
    let store = Arc::new(MemoryCallIdStore::default());
    let tokens = Arc::new(MemoryTokenStore::default());
    let b24 = Bitrix24::new(
        cfg,
        Deps {
            store: store.clone(),
            hooks,
            records: Arc::new(PathRecords),
            tokens: tokens.clone(),
        },
    )
    .expect("connector builds");
    Harness {
        sb,
        b24,
        store,
        tokens,
        next_job: std::sync::atomic::AtomicI64::new(1),
    }
}

impl Harness {
    /// Deliver one job with fresh step storage.
    pub async fn deliver(
        &self,
        stage: Stage,
        conv: Option<&str>,
        call: &CallFull,
    ) -> Result<Value, CrmError> {
        let steps = MemoryJobSteps::default();
        self.deliver_with(stage, conv, call, &steps).await
    }

    /// Deliver with the given step storage (to simulate redelivery of one job).
    pub async fn deliver_with(
        &self,
        stage: Stage,
        conv: Option<&str>,
        call: &CallFull,
        steps: &MemoryJobSteps,
    ) -> Result<Value, CrmError> {
        let id = self
            .next_job
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let job = Job {
            id,
            connector: "bitrix24".into(),
            stage,
            conversation_id: conv.map(str::to_string),
            call_full: call.clone(),
            attempts: 0,
        };
        if !self.b24.wants(stage) {
            return Ok(json!({"not_wanted": stage.as_str()}));
        }
        self.b24.deliver(&job, steps).await
    }
}

/// A call snapshot as the tracker would emit it.
pub fn call(id: &str, direction: Direction, client: &str, line: &str) -> CallFull {
    let mut c = CallFull {
        id: id.into(),
        direction,
        client_phone: client.into(),
        line_number: line.into(),
        ..CallFull::default()
    };
    // The tracker writes the start on the call's main channel.
    c.channel.start_time = "2026-11-21 23:47:41".into();
    c.extra.insert("conversations".into(), json!({}));
    c
}

/// Add (or update) a conversation ringing at `user`.
pub fn conv(c: &mut CallFull, conv_id: &str, user: &str, answered: bool) {
    if let Some(Value::Object(convs)) = c.extra.get_mut("conversations") {
        convs.insert(
            conv_id.into(),
            json!({"user": user, "was_answered": answered, "is_parked": false,
                   "channel": {"id": conv_id, "to": user, "state": if answered {"talking"} else {"ringing"}}}),
        );
    }
}

/// Mark the call as ended with this result.
pub fn ended(c: &mut CallFull, answered_by: &str, result: u16, talk: u64, duration: u64) {
    c.answered_by = answered_by.into();
    c.result = result;
    c.talk_duration = talk;
    c.duration = duration;
}

/// Every card shown in the sandbox was closed by a hide or by the finish.
pub fn assert_every_show_hidden(cards: &[(String, i64)]) {
    let mut open: Vec<i64> = Vec::new();
    for (action, user) in cards {
        match action.as_str() {
            "show" => {
                assert!(
                    !open.contains(user),
                    "card shown twice to {user}: {cards:?}"
                );
                open.push(*user);
            }
            "hide" | "finish" => open.retain(|u| u != user),
            _ => {}
        }
    }
    assert!(open.is_empty(), "cards left open for {open:?}: {cards:?}");
}
