//! The Kommo connector against the sandbox Kommo over real HTTP: call outcomes shaped
//! like the recorded fixtures' (see tests/fixtures/expected) must leave the account as
//! a manager expects, with redelivery, token refresh, limits and errors handled.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kolokol::calls::{CallFull, Direction, Stage};
use kolokol::crm::kommo::{KommoConfig, KommoConnector};
use kolokol::crm::{
    Connector, CrmError, Job, JobSteps, MemoryJobSteps, MemoryTokenStore, TokenStore,
};
use kolokol::hooks::{Customize, HookOutcome, NoCustomizations};
use kolokol::sandbox::kommo::{self as sb, SandboxKommo};
use serde_json::{Map, Value, json};

const CLIENT: &str = "79161234567";
const LINE: &str = "74951234567";
const RECORD_LINK: &str = "https://pbx.example.com/records/1795304861.0.mp3?sig=abc";

fn config(sandbox: &SandboxKommo) -> KommoConfig {
    let mut c = KommoConfig {
        base_url: sandbox.base_url(),
        long_lived_token: Some(sb::LONG_LIVED_TOKEN.into()),
        rate_limit: 1000.0,
        default_responsible_user_id: Some(sb::ADMIN_USER_ID),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    c.users.insert("101".into(), 5002);
    c.users.insert("102".into(), 5003);
    c
}

async fn sandbox() -> SandboxKommo {
    let s = SandboxKommo::start().await.expect("sandbox starts");
    s.set_rate_limit(1000.0);
    s
}

fn connector(cfg: KommoConfig) -> KommoConnector {
    KommoConnector::new(
        cfg,
        Arc::new(MemoryTokenStore::default()),
        Arc::new(NoCustomizations),
    )
    .expect("connector")
}

fn conversations(users: &[&str], from: &str) -> Value {
    let mut m = Map::new();
    for (i, u) in users.iter().enumerate() {
        m.insert(
            format!("1795304861.{}", i + 1),
            json!({"user": u, "is_parked": false,
                   "channel": {"from": from, "to": u, "trunk": "trunk", "type": "incoming"}}),
        );
    }
    Value::Object(m)
}

/// Fixture 01: inbound, 101 answers, recorded.
fn inbound_answered(id: &str) -> CallFull {
    let mut extra = Map::new();
    extra.insert("conversations".into(), conversations(&["101"], CLIENT));
    extra.insert("record_link".into(), json!(RECORD_LINK));
    CallFull {
        id: id.into(),
        direction: Direction::Inbound,
        client_phone: CLIENT.into(),
        line_number: LINE.into(),
        answered_by: "101".into(),
        result: 200,
        record: "/var/spool/asterisk/monitor/2026/11/21/in-101.wav".into(),
        duration: 26,
        talk_duration: 20,
        extra,
        ..Default::default()
    }
}

/// Fixture 02 / 13: inbound, rang 101 then 102, nobody answered.
fn inbound_missed(id: &str, phone: &str) -> CallFull {
    let mut extra = Map::new();
    extra.insert(
        "conversations".into(),
        conversations(&["101", "102"], phone),
    );
    CallFull {
        id: id.into(),
        direction: Direction::Inbound,
        client_phone: phone.into(),
        line_number: LINE.into(),
        result: 480,
        duration: 30,
        extra,
        ..Default::default()
    }
}

/// Fixture 03: inbound, busy, no phone rang.
fn inbound_busy(id: &str) -> CallFull {
    CallFull {
        id: id.into(),
        direction: Direction::Inbound,
        client_phone: CLIENT.into(),
        line_number: LINE.into(),
        result: 486,
        duration: 2,
        ..Default::default()
    }
}

/// Fixtures 08 / 09: 101 dials the client.
fn outbound(id: &str, answered: bool) -> CallFull {
    let mut extra = Map::new();
    extra.insert(
        "channel".into(),
        json!({"from": "101", "to": CLIENT, "type": "outgoing"}),
    );
    extra.insert("conversations".into(), {
        let mut m = Map::new();
        m.insert(
            "1795304900.2".into(),
            json!({"user": CLIENT, "channel": {"from": "101", "to": CLIENT, "trunk": "trunk"}}),
        );
        Value::Object(m)
    });
    if answered {
        extra.insert("record_link".into(), json!(RECORD_LINK));
    }
    CallFull {
        id: id.into(),
        direction: Direction::Outbound,
        client_phone: CLIENT.into(),
        answered_by: if answered {
            "101".into()
        } else {
            String::new()
        },
        result: if answered { 200 } else { 480 },
        record: if answered {
            "/rec/out.wav".into()
        } else {
            String::new()
        },
        duration: 40,
        talk_duration: if answered { 31 } else { 0 },
        extra,
        ..Default::default()
    }
}

fn job(call: CallFull) -> Job {
    Job {
        id: 1,
        connector: "kommo".into(),
        stage: Stage::CallEnded,
        conversation_id: None,
        call_full: call,
        attempts: 0,
    }
}

async fn deliver(c: &KommoConnector, call: CallFull) -> Result<Value, CrmError> {
    let steps = MemoryJobSteps::default();
    c.deliver(&job(call), &steps).await
}

#[tokio::test]
async fn inbound_answered_creates_contact_lead_and_call() {
    let s = sandbox().await;
    let c = connector(config(&s));
    assert!(c.wants(Stage::CallEnded));
    assert!(!c.wants(Stage::ConversationRequested));
    let report = deliver(&c, inbound_answered("1795304861.0")).await.unwrap();
    assert_eq!(report["registered"], json!(true));

    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1, "{:#?}", snap.contacts);
    let contact = &snap.contacts[0];
    assert_eq!(contact.phones, vec!["+79161234567"]);
    assert_eq!(contact.responsible_user_id, 5002, "who answered (101)");
    assert_eq!(contact.tags, vec!["kolokol"]);
    assert_eq!(snap.leads.len(), 1);
    let lead = &snap.leads[0];
    assert_eq!(lead.name, "+79161234567 - incoming");
    assert_eq!(lead.contact_ids, vec![contact.id]);
    assert_eq!(lead.responsible_user_id, 5002);
    assert_eq!(snap.calls.len(), 1);
    let call = &snap.calls[0];
    assert_eq!(call.uniq.as_deref(), Some("1795304861.0"));
    assert_eq!(call.direction, "inbound");
    assert_eq!(call.call_status, Some(4));
    assert_eq!(call.duration, 20);
    assert_eq!(call.link.as_deref(), Some(RECORD_LINK));
    assert_eq!(call.responsible_user_id, 5002);
    assert_eq!(call.created_by, Some(5002));
    assert_eq!(call.source, "kolokol");
    assert_eq!(
        (call.entity_type.as_str(), call.entity_id),
        ("lead", lead.id)
    );
    assert!(snap.tasks.is_empty(), "no task for an answered call");
}

#[tokio::test]
async fn missed_inbound_gets_a_task_for_the_last_employee_who_rang() {
    let s = sandbox().await;
    let c = connector(config(&s));
    deliver(&c, inbound_missed("1795304870.0", "8 (916) 123-45-67"))
        .await
        .unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1);
    assert_eq!(
        snap.contacts[0].phones,
        vec!["+79161234567"],
        "8… normalised"
    );
    assert_eq!(snap.leads[0].name, "+79161234567 - missed incoming");
    let call = &snap.calls[0];
    assert_eq!(call.call_status, Some(6));
    assert_eq!(call.duration, 0);
    assert_eq!(call.link, None);
    assert_eq!(snap.tasks.len(), 1);
    let t = &snap.tasks[0];
    assert_eq!(t.responsible_user_id, 5003, "102 rang last");
    assert_eq!(t.entity_type.as_deref(), Some("leads"));
    assert_eq!(t.entity_id, Some(snap.leads[0].id));
    assert_eq!(t.task_type_id, 1);
    assert!(t.text.contains("+79161234567"), "{}", t.text);
    assert!(!t.is_completed);
}

#[tokio::test]
async fn missed_call_of_a_known_client_goes_to_the_clients_manager() {
    let s = sandbox().await;
    let cid = s.add_contact("Ivan Petrov", "+7 916 123-45-67", 5001);
    let c = connector(config(&s));
    deliver(&c, inbound_missed("1795304870.0", CLIENT))
        .await
        .unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1, "no new contact for a known number");
    assert!(snap.leads.is_empty(), "no lead for a known contact");
    assert_eq!(snap.calls[0].entity_type, "contact");
    assert_eq!(snap.calls[0].entity_id, cid);
    assert_eq!(snap.calls[0].responsible_user_id, 5001);
    let t = &snap.tasks[0];
    assert_eq!(t.responsible_user_id, 5001, "entity's responsible first");
    assert_eq!(
        (t.entity_type.as_deref(), t.entity_id),
        (Some("contacts"), Some(cid))
    );
    assert!(t.text.contains("Ivan Petrov"), "{}", t.text);
}

#[tokio::test]
async fn busy_inbound_is_status_7_with_a_task_for_the_default_user() {
    let s = sandbox().await;
    let c = connector(config(&s));
    deliver(&c, inbound_busy("1795304880.0")).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.calls[0].call_status, Some(7));
    assert_eq!(snap.tasks.len(), 1);
    assert_eq!(snap.tasks[0].responsible_user_id, sb::ADMIN_USER_ID);
    assert_eq!(snap.contacts[0].responsible_user_id, sb::ADMIN_USER_ID);
}

#[tokio::test]
async fn outbound_answered_and_unanswered() {
    let s = sandbox().await;
    let c = connector(config(&s));
    deliver(&c, outbound("1795304900.0", true)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.leads[0].name, "+79161234567 - outgoing");
    let call = &snap.calls[0];
    assert_eq!(call.direction, "outbound");
    assert_eq!(call.call_status, Some(4));
    assert_eq!(call.duration, 31);
    assert_eq!(call.responsible_user_id, 5002);
    assert_eq!(call.link.as_deref(), Some(RECORD_LINK));
    assert!(snap.tasks.is_empty());

    deliver(&c, outbound("1795304950.0", false)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1, "same client, same contact");
    assert_eq!(snap.leads.len(), 1, "no second lead");
    assert_eq!(snap.calls.len(), 2);
    let call = &snap.calls[1];
    assert_eq!(call.call_status, Some(6));
    assert_eq!(call.responsible_user_id, 5002, "the employee who dialled");
    assert_eq!(
        (call.entity_type.as_str(), call.entity_id),
        ("lead", snap.leads[0].id)
    );
    assert_eq!(snap.tasks.len(), 1);
    assert_eq!(snap.tasks[0].responsible_user_id, 5002);
    assert!(snap.tasks[0].text.contains("outgoing"));
}

#[tokio::test]
async fn internal_calls_are_not_registered() {
    let s = sandbox().await;
    let c = connector(config(&s));
    let call = CallFull {
        id: "1795305000.0".into(),
        direction: Direction::Internal,
        client_phone: "102".into(),
        answered_by: "102".into(),
        result: 200,
        ..Default::default()
    };
    let r = deliver(&c, call).await.unwrap();
    assert_eq!(r["registered"], json!(false));
    assert!(s.snapshot().requests.is_empty(), "no request at all");
}

#[tokio::test]
async fn black_and_white_lists() {
    let s = sandbox().await;
    let mut cfg = config(&s);
    cfg.ignore_internal_numbers = vec!["102".into()];
    let c = connector(cfg);
    let r = deliver(&c, inbound_missed("a", CLIENT)).await.unwrap();
    assert_eq!(r["registered"], json!(false));
    let mut cfg = config(&s);
    cfg.only_trunks = vec!["other-line".into()];
    let c = connector(cfg);
    let r = deliver(&c, inbound_answered("b")).await.unwrap();
    assert_eq!(r["registered"], json!(false));
    let mut cfg = config(&s);
    cfg.only_trunks = vec![LINE.into()];
    let c = connector(cfg);
    let r = deliver(&c, inbound_answered("c")).await.unwrap();
    assert_eq!(r["registered"], json!(true));
    assert_eq!(s.snapshot().calls.len(), 1);
}

#[tokio::test]
async fn redelivery_after_a_crash_creates_no_duplicates() {
    let s = sandbox().await;
    let c = connector(config(&s));
    let steps = MemoryJobSteps::default();
    let j = job(inbound_missed("1795304870.0", CLIENT));
    // The calls endpoint fails through every inline retry: the job stops after the
    // contact and lead were created, as if the daemon had died there.
    s.fail_path("/api/v4/calls", 3, 503);
    let err = c.deliver(&j, &steps).await.unwrap_err();
    assert!(matches!(err, CrmError::Retryable { .. }), "{err}");
    let snap = s.snapshot();
    assert_eq!(
        (snap.contacts.len(), snap.leads.len(), snap.calls.len()),
        (1, 1, 0)
    );

    c.deliver(&j, &steps).await.unwrap();
    c.deliver(&j, &steps).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1);
    assert_eq!(snap.leads.len(), 1);
    assert_eq!(snap.calls.len(), 1);
    assert_eq!(snap.tasks.len(), 1);
    assert_eq!(snap.count("POST", "/api/v4/contacts", 200), 1);
    assert_eq!(snap.count("POST", "/api/v4/calls", 200), 1);

    // A fresh connector (daemon restarted) with the persisted steps: still nothing new.
    let c2 = connector(config(&s));
    c2.deliver(&j, &steps).await.unwrap();
    let snap2 = s.snapshot();
    assert_eq!(snap2.calls.len(), 1);
    assert_eq!(snap2.tasks.len(), 1);
}

fn oauth_config(s: &SandboxKommo) -> KommoConfig {
    KommoConfig {
        long_lived_token: None,
        client_id: sb::CLIENT_ID.into(),
        client_secret: sb::CLIENT_SECRET.into(),
        redirect_uri: "https://pbx.example.com/kommo/oauth".into(),
        ..config(s)
    }
}

#[tokio::test]
async fn oauth_code_exchange_then_refresh_on_401() {
    let s = sandbox().await;
    s.add_auth_code("code-1");
    let store = Arc::new(MemoryTokenStore::default());
    let c =
        KommoConnector::new(oauth_config(&s), store.clone(), Arc::new(NoCustomizations)).unwrap();
    // Without tokens: blocked with a hint to authorize.
    let err = deliver(&c, inbound_answered("x")).await.unwrap_err();
    assert!(
        matches!(&err, CrmError::Blocked { message } if message.contains("kommo auth")),
        "{err}"
    );
    let t = c.client().exchange_code("code-1").await.unwrap();
    assert_eq!(store.get("kommo"), Some(t.clone()));
    assert!(
        c.client().exchange_code("code-1").await.is_err(),
        "codes are single-use"
    );

    deliver(&c, inbound_answered("1")).await.unwrap();
    s.expire_access_tokens();
    deliver(&c, outbound("2", true)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.refreshes, 1);
    assert_eq!(snap.calls.len(), 2);
    let stored = store.get("kommo").unwrap();
    assert_ne!(stored.refresh_token, t.refresh_token, "rotated");
    assert_eq!(Some(stored.refresh_token), snap.refresh_token);
    assert_eq!(
        snap.requests.iter().filter(|r| r.status == 401).count(),
        1,
        "one 401, then the refreshed token"
    );
}

#[tokio::test]
async fn token_refreshed_before_expiry_and_concurrent_refreshes_serialised() {
    let s = sandbox().await;
    s.add_auth_code("code-2");
    s.set_token_ttl(60); // below the 300 s refresh margin
    let store = Arc::new(MemoryTokenStore::default());
    let c = Arc::new(
        KommoConnector::new(oauth_config(&s), store.clone(), Arc::new(NoCustomizations)).unwrap(),
    );
    c.client().exchange_code("code-2").await.unwrap();
    s.set_token_ttl(86400);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            deliver(
                &c,
                inbound_missed(&format!("p{i}"), &format!("7916000000{i}")),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let snap = s.snapshot();
    assert_eq!(snap.refreshes, 1, "one refresh for four concurrent jobs");
    assert!(snap.requests.iter().all(|r| r.status != 401));
    assert_eq!(snap.calls.len(), 4);
}

#[tokio::test]
async fn revoked_refresh_token_blocks_with_a_hint() {
    let s = sandbox().await;
    let store = Arc::new(MemoryTokenStore::default());
    store
        .put(
            "kommo",
            &kolokol::crm::TokenSet {
                access_token: "old".into(),
                refresh_token: "revoked".into(),
                expires_at: 0,
            },
        )
        .unwrap();
    let c = KommoConnector::new(oauth_config(&s), store, Arc::new(NoCustomizations)).unwrap();
    let err = deliver(&c, inbound_answered("r")).await.unwrap_err();
    assert!(
        matches!(&err, CrmError::Blocked { message } if message.contains("kommo auth --code")),
        "{err}"
    );
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let s = sandbox().await;
    let c = connector(config(&s));
    s.fail_next(1, 429);
    s.set_retry_after(1);
    let started = tokio::time::Instant::now();
    deliver(&c, inbound_answered("1")).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited Retry-After"
    );
    let snap = s.snapshot();
    assert_eq!(snap.requests.iter().filter(|r| r.status == 429).count(), 1);
    assert_eq!(snap.calls.len(), 1);

    // A long Retry-After goes back to the outbox with the delay.
    s.set_retry_after(30);
    s.fail_next(1, 429);
    match deliver(&c, inbound_answered("2")).await {
        Err(CrmError::Retryable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(30)))
        }
        other => panic!("expected retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn pacing_stays_under_the_accounts_limit() {
    let s = SandboxKommo::start().await.unwrap(); // 7 req/s like Kommo
    let mut cfg = config(&s);
    cfg.rate_limit = 7.0;
    let c = Arc::new(connector(cfg));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            deliver(
                &c,
                inbound_missed(&format!("r{i}"), &format!("7916111111{i}")),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let snap = s.snapshot();
    assert!(snap.requests.len() > 7, "{} requests", snap.requests.len());
    assert!(
        snap.requests.iter().all(|r| r.status != 429),
        "{:?}",
        snap.requests
    );
    assert_eq!(snap.calls.len(), 3);
}

#[tokio::test]
async fn server_errors_are_retried_then_handed_back() {
    let s = sandbox().await;
    let c = connector(config(&s));
    s.fail_next(2, 503);
    s.set_retry_after(0);
    deliver(&c, inbound_answered("1")).await.unwrap();
    assert_eq!(s.snapshot().calls.len(), 1);
    s.fail_next(10, 500);
    let err = deliver(&c, inbound_answered("2")).await.unwrap_err();
    assert!(matches!(err, CrmError::Retryable { .. }), "{err}");
}

#[tokio::test]
async fn validation_errors_are_rejected_with_the_detail() {
    let s = sandbox().await;
    let mut cfg = config(&s);
    cfg.lead_status_id = Some(999);
    let c = connector(cfg);
    match deliver(&c, inbound_answered("1")).await {
        Err(CrmError::Rejected { message }) => {
            assert!(message.contains("status_id"), "{message}");
            assert!(message.contains("NotSupportedChoice"), "{message}");
            assert!(message.contains("/api/v4/leads"), "{message}");
        }
        other => panic!("expected rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn blocked_account_is_blocked() {
    let s = sandbox().await;
    let c = connector(config(&s));
    s.set_blocked(true);
    match deliver(&c, inbound_answered("1")).await {
        Err(CrmError::Blocked { message }) => assert!(message.contains("403"), "{message}"),
        other => panic!("expected blocked, got {other:?}"),
    }
    s.set_blocked(false);
    deliver(&c, inbound_answered("1")).await.unwrap();
}

#[tokio::test]
async fn unsorted_mode_creates_an_incoming_lead() {
    let s = sandbox().await;
    let mut cfg = config(&s);
    cfg.unsorted = true;
    let c = connector(cfg);
    deliver(&c, inbound_answered("1795304861.0")).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.unsorted.len(), 1);
    let u = &snap.unsorted[0];
    assert_eq!(u.source_uid, "1795304861.0");
    assert_eq!(u.metadata["phone"], json!("+79161234567"));
    assert_eq!(snap.leads.len(), 1);
    assert_eq!(snap.leads[0].status_id, sb::STATUS_UNSORTED);
    assert_eq!(snap.contacts.len(), 1);
    assert_eq!(snap.calls.len(), 1, "one call note, ours");
    assert_eq!(snap.calls[0].entity_type, "lead");
    assert_eq!(snap.calls[0].entity_id, snap.leads[0].id);
    // Outbound calls never go to unsorted.
    deliver(&c, outbound("2", false)).await.unwrap();
    assert_eq!(s.snapshot().unsorted.len(), 1);
}

#[tokio::test]
async fn no_contact_creation_means_the_call_is_not_added() {
    let s = sandbox().await;
    let mut cfg = config(&s);
    cfg.create_contact = false;
    let c = connector(cfg);
    let r = deliver(&c, inbound_answered("1")).await.unwrap();
    assert_eq!(r["call"]["added"], json!(false));
    let snap = s.snapshot();
    assert!(snap.calls.is_empty() && snap.contacts.is_empty());
}

#[tokio::test]
async fn responsible_updated_from_who_answered_and_tasks_completed() {
    let s = sandbox().await;
    let cid = s.add_contact("Ivan Petrov", CLIENT, 5001);
    let lid = s.add_lead("Deal", cid, sb::STATUS_FIRST, 5001);
    let mut cfg = config(&s);
    cfg.update_responsible_on_answer = true;
    cfg.complete_tasks_on_answer = true;
    let c = connector(cfg);
    deliver(&c, inbound_missed("1", CLIENT)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.tasks.len(), 1);
    assert_eq!(snap.tasks[0].entity_id, Some(lid));
    assert_eq!(
        snap.contacts[0].responsible_user_id, 5001,
        "nobody answered"
    );

    deliver(&c, inbound_answered("2")).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts[0].responsible_user_id, 5002);
    assert_eq!(snap.leads[0].responsible_user_id, 5002);
    assert!(snap.tasks[0].is_completed, "call-back done");
    assert_eq!(snap.leads.len(), 1);
}

#[tokio::test]
async fn closed_leads_are_left_alone() {
    let s = sandbox().await;
    let cid = s.add_contact("Ivan", CLIENT, 5003);
    s.add_lead("Won", cid, 142, 5003);
    let c = connector(config(&s));
    deliver(&c, inbound_missed("1", CLIENT)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.calls[0].entity_type, "contact");
    assert_eq!(snap.tasks[0].entity_type.as_deref(), Some("contacts"));
    assert_eq!(snap.tasks[0].responsible_user_id, 5003);
}

#[tokio::test]
async fn account_check_and_responsible_lookup() {
    let s = sandbox().await;
    let mut cfg = config(&s);
    cfg.users.insert("103".into(), 9999);
    let c = connector(cfg.clone());
    let check = c.check_account().await.unwrap();
    assert_eq!(check.phone_field_id, sb::PHONE_FIELD_ID);
    assert_eq!(check.users.len(), 3);
    assert_eq!(check.unknown_mapped, vec![("103".to_string(), 9999)]);

    s.add_contact("Ivan Petrovich Sidorov-Longname", "+7 916 123 45 67", 5003);
    let r = c.find_responsible("89161234567").await.unwrap().unwrap();
    assert_eq!(r.extension, "102");
    assert_eq!(r.name.chars().count(), 20);
    assert!(c.find_responsible("79990000000").await.unwrap().is_none());

    s.remove_phone_field();
    let c = connector(cfg);
    let err = c.check_account().await.unwrap_err().to_string();
    assert!(err.contains("PHONE"), "{err}");
    // A known client still gets the call; a new number needs the field.
    deliver(&c, inbound_answered("1")).await.unwrap();
    let err = deliver(&c, inbound_missed("2", "79990001122"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CrmError::Blocked { message } if message.contains("PHONE")),
        "{err}"
    );
}

#[tokio::test]
async fn update_hooks_patch_known_clients() {
    let s = sandbox().await;
    let cid = s.add_contact("Ivan", CLIENT, 5001);
    s.add_lead("Deal", cid, sb::STATUS_FIRST, 5001);
    let mut h = Scripted::default();
    h.answers.insert(
        "process_contact_update_params",
        HookOutcome::Data(json!({"name": "Ivan (called twice)"})),
    );
    h.answers.insert(
        "process_lead_update_params",
        HookOutcome::Data(json!({"status_id": sb::STATUS_SECOND, "responsible_user_id": 5003})),
    );
    let h = Arc::new(h);
    let c = with_hooks(&s, h.clone());
    deliver(&c, inbound_answered("1")).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts[0].name, "Ivan (called twice)");
    assert_eq!(snap.leads[0].status_id, sb::STATUS_SECOND);
    assert_eq!(snap.leads[0].responsible_user_id, 5003);
    let seen = h.seen.lock().unwrap();
    let upd = seen
        .iter()
        .find(|(h, _)| h == "process_contact_update_params")
        .unwrap();
    assert_eq!(upd.1["id"], json!(cid));
}

// ------------------------------------------------------------------ hooks

/// Customizations decided per hook by the test; records every input.
#[derive(Default)]
struct Scripted {
    answers: HashMap<&'static str, HookOutcome>,
    seen: Mutex<Vec<(String, Value)>>,
}

impl Customize for Scripted {
    fn run<'a>(
        &'a self,
        hook: &'a str,
        input: Value,
        _call_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = HookOutcome> + Send + 'a>> {
        Box::pin(async move {
            self.seen
                .lock()
                .unwrap()
                .push((hook.to_string(), input.clone()));
            self.answers
                .get(hook)
                .cloned()
                .unwrap_or(HookOutcome::Default {
                    reason: "not installed".into(),
                })
        })
    }
}

fn with_hooks(s: &SandboxKommo, h: Arc<Scripted>) -> KommoConnector {
    KommoConnector::new(config(s), Arc::new(MemoryTokenStore::default()), h).unwrap()
}

#[tokio::test]
async fn hooks_change_every_request() {
    let s = sandbox().await;
    let mut h = Scripted::default();
    h.answers.insert(
        "process_client_phone",
        HookOutcome::Data(json!({"phone": "+7 916 123-45-67"})),
    );
    h.answers.insert(
        "process_contact_creation_params",
        HookOutcome::Data(json!({
            "name": "Caller from site",
            "custom_fields_values": [{"field_id": sb::PHONE_FIELD_ID, "values": [{"enum_code": "MOB", "value": "+7 916 123-45-67"}]}],
            "_embedded": {"tags": [{"name": "from-hook"}]},
        })),
    );
    h.answers.insert(
        "process_lead_creation_params",
        HookOutcome::Data(json!({"name": "Hook lead", "status_id": sb::STATUS_SECOND, "responsible_user_id": 5003})),
    );
    h.answers.insert(
        "process_task_creation_params",
        HookOutcome::Data(json!({"text": "Hook task", "complete_till": 2000000000, "task_type": 2, "responsible_user_id": 5002})),
    );
    h.answers.insert(
        "process_call_params",
        HookOutcome::Data(json!({"direction": "inbound", "duration": 7, "source": "hooked", "phone": "+79161234567", "call_status": 3, "uniq": "custom"})),
    );
    let h = Arc::new(h);
    let c = with_hooks(&s, h.clone());
    deliver(&c, inbound_missed("1795304870.0", CLIENT))
        .await
        .unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts[0].name, "Caller from site");
    assert_eq!(snap.contacts[0].tags, vec!["from-hook"]);
    assert_eq!(snap.contacts[0].phones, vec!["+7 916 123-45-67"]);
    assert_eq!(snap.leads[0].name, "Hook lead");
    assert_eq!(snap.leads[0].status_id, sb::STATUS_SECOND);
    assert_eq!(snap.calls[0].source, "hooked");
    assert_eq!(snap.calls[0].call_status, Some(3));
    assert_eq!(snap.tasks[0].text, "Hook task");
    assert_eq!(snap.tasks[0].task_type_id, 2);
    assert_eq!(snap.tasks[0].responsible_user_id, 5002);

    let seen = h.seen.lock().unwrap().clone();
    let hooks: Vec<&str> = seen.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        hooks,
        vec![
            "need_registration",
            "process_client_phone",
            "process_contact_creation_params",
            "process_lead_creation_params",
            "process_call_params",
            "process_task_creation_params",
            "post_registration",
        ]
    );
    for (hook, input) in &seen {
        assert_eq!(
            input["call_full"]["id"],
            json!("1795304870.0"),
            "{hook} gets call_full"
        );
    }
    let (_, phone_in) = &seen[1];
    assert_eq!(phone_in["phone"], json!("+79161234567"));
    assert_eq!(phone_in["call_stage"], json!("call_ended"));
    let (_, post) = &seen[6];
    assert_eq!(post["crm"], json!("kommo"));
    assert_eq!(post["call_stage"], json!("call_ended"));
    assert_eq!(post["result"]["call"]["added"], json!(true));
    assert_eq!(post["result"]["contact"]["id"], json!(snap.contacts[0].id));
}

#[tokio::test]
async fn cancelled_hooks_cancel_their_request() {
    let s = sandbox().await;
    let mut h = Scripted::default();
    h.answers
        .insert("process_lead_creation_params", HookOutcome::Cancelled);
    h.answers
        .insert("process_task_creation_params", HookOutcome::Cancelled);
    let c = with_hooks(&s, Arc::new(h));
    deliver(&c, inbound_missed("1", CLIENT)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1);
    assert!(snap.leads.is_empty());
    assert!(snap.tasks.is_empty());
    assert_eq!(snap.calls.len(), 1);
    assert_eq!(snap.calls[0].entity_type, "contact");

    let mut h = Scripted::default();
    h.answers.insert(
        "need_registration",
        HookOutcome::Data(json!({"need_registration": false})),
    );
    let c = with_hooks(&s, Arc::new(h));
    let r = deliver(&c, inbound_missed("2", CLIENT)).await.unwrap();
    assert_eq!(r["registered"], json!(false));

    let mut h = Scripted::default();
    h.answers
        .insert("process_call_params", HookOutcome::Cancelled);
    let c = with_hooks(&s, Arc::new(h));
    deliver(&c, inbound_answered("3")).await.unwrap();
    assert_eq!(s.snapshot().calls.len(), 1, "call 3 not added");
}

#[tokio::test]
async fn failing_hooks_fall_back_to_defaults() {
    let s = sandbox().await;
    let mut h = Scripted::default();
    for hook in [
        "need_registration",
        "process_client_phone",
        "process_contact_creation_params",
        "process_lead_creation_params",
        "process_call_params",
        "process_task_creation_params",
        "post_registration",
    ] {
        h.answers.insert(
            hook,
            HookOutcome::Default {
                reason: "exit status 1: boom".into(),
            },
        );
    }
    // Data that is not an object is ignored too.
    h.answers
        .insert("process_call_params", HookOutcome::Data(json!("garbage")));
    let c = with_hooks(&s, Arc::new(h));
    deliver(&c, inbound_missed("1", CLIENT)).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts[0].name, "Contact +79161234567");
    assert_eq!(snap.leads[0].name, "+79161234567 - missed incoming");
    assert_eq!(snap.calls[0].call_status, Some(6));
    assert_eq!(snap.tasks.len(), 1);
}

#[tokio::test]
async fn hook_returning_invalid_params_dead_letters_with_kommos_detail() {
    let s = sandbox().await;
    let mut h = Scripted::default();
    h.answers.insert(
        "process_call_params",
        HookOutcome::Data(
            json!({"direction": "sideways", "duration": 1, "source": "x", "phone": CLIENT}),
        ),
    );
    let c = with_hooks(&s, Arc::new(h));
    match deliver(&c, inbound_answered("1")).await {
        Err(CrmError::Rejected { message }) => assert!(message.contains("direction"), "{message}"),
        other => panic!("expected rejected, got {other:?}"),
    }
}

/// Steps that fail to persist, as a full disk would.
struct BrokenSteps;
impl JobSteps for BrokenSteps {
    fn get(&self, _: &str) -> Option<Value> {
        None
    }
    fn put(&self, _: &str, _: &Value) -> Result<(), String> {
        Err("disk full".into())
    }
}

#[tokio::test]
async fn unrecordable_steps_stop_before_any_request() {
    let s = sandbox().await;
    let c = connector(config(&s));
    let err = c
        .deliver(&job(inbound_answered("1")), &BrokenSteps)
        .await
        .unwrap_err();
    assert!(matches!(err, CrmError::Retryable { .. }), "{err}");
    assert!(s.snapshot().requests.is_empty());
}

/// Steps that "crash" once: the first `put` of `fail_step` fails, as if the daemon
/// died right after Kommo accepted the request.
#[derive(Default)]
struct CrashOnce {
    inner: MemoryJobSteps,
    fail_step: &'static str,
    crashed: Mutex<bool>,
}
impl JobSteps for CrashOnce {
    fn get(&self, step: &str) -> Option<Value> {
        self.inner.get(step)
    }
    fn put(&self, step: &str, v: &Value) -> Result<(), String> {
        let mut crashed = self.crashed.lock().unwrap();
        if step == self.fail_step && !*crashed {
            *crashed = true;
            return Err("killed".into());
        }
        self.inner.put(step, v)
    }
}

#[tokio::test]
async fn crash_after_kommo_accepted_the_call_does_not_duplicate_it() {
    for (call, entity) in [
        (inbound_answered("1795304861.0"), "lead"),
        (outbound("1795304900.0", true), "lead"),
    ] {
        let s = sandbox().await;
        let mut cfg = config(&s);
        cfg.create_lead = entity == "lead";
        let c = connector(cfg);
        let steps = CrashOnce {
            fail_step: "call",
            ..Default::default()
        };
        let j = job(call);
        let err = c.deliver(&j, &steps).await.unwrap_err();
        assert!(matches!(err, CrmError::Retryable { .. }), "{err}");
        assert_eq!(s.snapshot().calls.len(), 1, "Kommo has the call");
        let r = c.deliver(&j, &steps).await.unwrap();
        assert_eq!(r["call"]["recovered"], json!(true));
        let snap = s.snapshot();
        assert_eq!(snap.calls.len(), 1, "not sent twice");
        assert_eq!(snap.count("POST", "/api/v4/calls", 200), 1);
    }
    // Same for a crash after the contact was created: found by phone next time.
    let s = sandbox().await;
    let c = connector(config(&s));
    let steps = CrashOnce {
        fail_step: "contact",
        ..Default::default()
    };
    let j = job(inbound_missed("1795304870.0", CLIENT));
    assert!(c.deliver(&j, &steps).await.is_err());
    c.deliver(&j, &steps).await.unwrap();
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 1);
    assert_eq!(snap.leads.len(), 1, "the new client still gets a lead");
    assert_eq!(snap.calls.len(), 1);
    assert_eq!(snap.tasks.len(), 1);

    // ... and after the lead and the task.
    for step in ["lead", "task"] {
        let s = sandbox().await;
        let c = connector(config(&s));
        let steps = CrashOnce {
            fail_step: step,
            ..Default::default()
        };
        let j = job(inbound_missed("1795304870.0", CLIENT));
        assert!(c.deliver(&j, &steps).await.is_err());
        c.deliver(&j, &steps).await.unwrap();
        let snap = s.snapshot();
        assert_eq!(
            (
                snap.contacts.len(),
                snap.leads.len(),
                snap.calls.len(),
                snap.tasks.len()
            ),
            (1, 1, 1, 1),
            "crash after {step}"
        );
        assert_eq!(snap.calls[0].entity_type, "lead");
        assert_eq!(snap.tasks[0].entity_id, Some(snap.leads[0].id));
    }
}

// ------------------------------------------------------------------ batching

/// Calls from `n` new numbers, each missed (contact, lead, call note and task).
fn missed_calls(n: usize) -> Vec<CallFull> {
    (0..n)
        .map(|i| inbound_missed(&format!("1795305000.{i}"), &format!("7916555{i:04}")))
        .collect()
}

#[tokio::test]
async fn concurrent_registrations_share_array_requests() {
    let s = sandbox().await;
    // Kommo answering in 60 ms lets the next items gather behind a request in flight.
    s.set_latency(Duration::from_millis(60));
    let c = connector(config(&s));
    let calls = missed_calls(12);
    let results =
        futures::future::join_all(calls.iter().map(|call| deliver(&c, call.clone()))).await;
    for r in &results {
        assert_eq!(r.as_ref().unwrap()["registered"], json!(true), "{r:?}");
    }
    let snap = s.snapshot();
    assert_eq!(snap.contacts.len(), 12);
    assert_eq!(snap.leads.len(), 12);
    assert_eq!(snap.calls.len(), 12);
    assert_eq!(snap.tasks.len(), 12);
    // Every item reached its own entity, whatever batch it travelled in.
    for call in &calls {
        let phone = format!("+{}", call.client_phone);
        let note = snap
            .calls
            .iter()
            .find(|n| n.uniq.as_deref() == Some(call.id.as_str()))
            .unwrap_or_else(|| panic!("call note of {}", call.id));
        assert_eq!(note.phone, phone);
        let contact = snap.contacts_with_phone(&phone);
        assert_eq!(contact.len(), 1, "one contact for {phone}");
        let lead = snap
            .leads
            .iter()
            .find(|l| l.contact_ids == vec![contact[0].id])
            .expect("lead of the contact");
        assert_eq!(
            (note.entity_type.as_str(), note.entity_id),
            ("lead", lead.id)
        );
        let task = snap
            .tasks
            .iter()
            .find(|t| t.entity_id == Some(lead.id))
            .expect("task on the lead");
        assert_eq!(task.entity_type.as_deref(), Some("leads"));
    }
    let posts = |path| s.snapshot().count("POST", path, 200);
    for path in [
        "/api/v4/contacts",
        "/api/v4/leads",
        "/api/v4/calls",
        "/api/v4/tasks",
    ] {
        let n = posts(path);
        assert!(n >= 1 && n < 12, "{path}: 12 items in {n} requests");
    }
}

#[tokio::test]
async fn batch_size_one_sends_every_item_alone() {
    let s = sandbox().await;
    s.set_latency(Duration::from_millis(30));
    let mut cfg = config(&s);
    cfg.batch_size = 1;
    let c = connector(cfg);
    let calls = missed_calls(5);
    let results =
        futures::future::join_all(calls.iter().map(|call| deliver(&c, call.clone()))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(s.snapshot().count("POST", "/api/v4/calls", 200), 5);
}

#[tokio::test]
async fn a_batch_split_after_a_400_keeps_every_good_item() {
    // Within one connector: two of five call notes are made invalid by the hook.
    struct BadFor(&'static [&'static str]);
    impl Customize for BadFor {
        fn run<'a>(
            &'a self,
            hook: &'a str,
            input: Value,
            call_id: &'a str,
        ) -> Pin<Box<dyn Future<Output = HookOutcome> + Send + 'a>> {
            Box::pin(async move {
                if hook == "process_call_params" && self.0.contains(&call_id) {
                    let mut p = input;
                    p["call_status"] = json!(42);
                    return HookOutcome::Data(p);
                }
                HookOutcome::Default {
                    reason: "not installed".into(),
                }
            })
        }
    }
    let s = sandbox().await;
    s.set_latency(Duration::from_millis(60));
    let c = KommoConnector::new(
        config(&s),
        Arc::new(MemoryTokenStore::default()),
        Arc::new(BadFor(&["1795305000.1", "1795305000.3"])),
    )
    .unwrap();
    let calls = missed_calls(5);
    let results =
        futures::future::join_all(calls.iter().map(|call| deliver(&c, call.clone()))).await;
    for (call, r) in calls.iter().zip(&results) {
        let bad = call.id.ends_with(".1") || call.id.ends_with(".3");
        match r {
            Err(CrmError::Rejected { message }) if bad => {
                assert!(message.contains("call_status"), "{message}")
            }
            Ok(v) if !bad => assert_eq!(v["registered"], json!(true)),
            other => panic!("{}: {other:?}", call.id),
        }
    }
    let uniqs: Vec<_> = s
        .snapshot()
        .calls
        .iter()
        .filter_map(|n| n.uniq.clone())
        .collect();
    assert_eq!(uniqs.len(), 3, "{uniqs:?}");
}
