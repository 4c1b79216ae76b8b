//! Bitrix24 access, lookup, options and click-to-call over real HTTP against the
//! sandbox portal.

mod bitrix24_support;

use std::sync::Arc;
use std::time::Duration;

use bitrix24_support::*;
use kolokol::calls::{Direction, Stage};
use kolokol::crm::bitrix24::events::{self, Accepted, ClickToCallIntake, EventSource};
use kolokol::crm::bitrix24::{Bitrix24, Deps, LookupMethod, MemoryCallIdStore, PathRecords};
use kolokol::crm::{Connector, CrmError, MemoryTokenStore, TokenStore};
use kolokol::hooks::{Customize, HookOutcome};
use kolokol::sandbox::bitrix24::{SandboxBitrix24, User};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const CLIENT: &str = "79161234567";

#[tokio::test]
async fn oauth_refreshes_on_expired_token_and_saves_rotated_token() {
    let sb = SandboxBitrix24::start().await.unwrap();
    let (id, secret) = sb.client_credentials();
    let tokens = Arc::new(MemoryTokenStore::default());
    let mut cfg = test_config(&sb);
    cfg.webhook_url = None;
    cfg.base_url = Some(sb.base_url());
    cfg.client_id = Some(id.into());
    cfg.client_secret = Some(secret.into());
    cfg.oauth_url = sb.oauth_url();
    cfg.refresh_token = Some("refresh-1".into());
    cfg.default_user_id = Some(11);
    let b24 = Bitrix24::new(
        cfg,
        Deps {
            store: Arc::new(MemoryCallIdStore::default()),
            hooks: Arc::new(kolokol::hooks::NoCustomizations),
            records: Arc::new(PathRecords),
            tokens: tokens.clone(),
        },
    )
    .unwrap();
    // No token stored yet: the configured refresh token bootstraps.
    assert_eq!(b24.check_access().await.unwrap(), 3);
    assert_eq!(tokens.get("bitrix24").unwrap().refresh_token, "refresh-2");
    sb.expire_access_token();
    let r = b24.client().call("scope", json!({})).await.unwrap();
    assert!(r.as_array().unwrap().contains(&json!("telephony")));
    let s = sb.snapshot();
    assert_eq!(s.refreshes, 2);
    assert_eq!(s.count("scope"), 3, "expired attempt + retry after refresh");
    assert!(
        s.requests
            .iter()
            .any(|r| r.error.as_deref() == Some("expired_token"))
    );
    assert_eq!(tokens.get("bitrix24").unwrap().refresh_token, "refresh-3");
    assert_eq!(tokens.get("bitrix24").unwrap().access_token, s.access_token);

    // Ten requests see the same expiry: one refresh (a second one would present the
    // already rotated refresh token and lock the account out).
    sb.expire_access_token();
    let client = b24.client();
    let all = futures::future::join_all((0..10).map(|_| {
        let c = client.clone();
        async move { c.call("scope", json!({})).await }
    }))
    .await;
    assert!(all.iter().all(|r| r.is_ok()), "{all:?}");
    assert_eq!(sb.snapshot().refreshes, 3);
}

#[tokio::test]
async fn revoked_oauth_is_blocked_with_a_clear_message() {
    let sb = SandboxBitrix24::start().await.unwrap();
    let mut cfg = test_config(&sb);
    cfg.webhook_url = None;
    cfg.base_url = Some(sb.base_url());
    cfg.client_id = Some("sandbox.app".into());
    cfg.client_secret = Some("sandbox-secret".into());
    cfg.oauth_url = sb.oauth_url();
    cfg.refresh_token = Some("stale".into());
    let b24 = Bitrix24::new(
        cfg,
        Deps {
            store: Arc::new(MemoryCallIdStore::default()),
            hooks: Arc::new(kolokol::hooks::NoCustomizations),
            records: Arc::new(PathRecords),
            tokens: Arc::new(MemoryTokenStore::default()),
        },
    )
    .unwrap();
    let e = b24.check_access().await.unwrap_err();
    assert!(e.to_string().contains("invalid_grant"), "{e}");
    assert!(matches!(e.into_crm(), CrmError::Blocked { .. }));
}

#[tokio::test]
async fn missing_scope_is_reported_at_startup() {
    let h = harness(|_, _| {}).await;
    h.sb.set_scopes(&["crm", "im"]);
    let e = h.b24.check_access().await.unwrap_err().to_string();
    assert!(e.contains("telephony, user"), "{e}");
    assert!(e.contains("tick telephony, crm, user"), "{e}");
}

#[tokio::test]
async fn bad_webhook_secret_is_blocked() {
    let h =
        harness(|c, sb| c.webhook_url = Some(sb.webhook_url().replace("sandboxsecret", "wrong")))
            .await;
    let e = h.b24.check_access().await.unwrap_err();
    assert!(e.to_string().contains("INVALID_CREDENTIALS"), "{e}");
    assert!(matches!(e.into_crm(), CrmError::Blocked { .. }));
}

#[tokio::test]
async fn directory_pages_and_skips_users_without_internal_number() {
    let h = harness(|_, _| {}).await;
    for n in 0..120 {
        h.sb.add_user(User {
            id: 1000 + n,
            name: format!("U{n}"),
            last_name: String::new(),
            active: n % 10 != 0,
            uf_phone_inner: format!("{}", 2000 + n),
        });
    }
    let n = h.b24.check_access().await.unwrap();
    assert_eq!(n, 3 + 108, "3 sandbox employees + 108 active new ones");
    let d = h.b24.directory();
    assert_eq!(d.by_extension("101").await.unwrap().unwrap().id, 11);
    assert_eq!(d.by_extension("2119").await.unwrap().unwrap().id, 1119);
    assert!(d.by_extension("2010").await.unwrap().is_none(), "inactive");
    assert!(d.by_id(14).await.unwrap().is_none(), "no internal number");
    let s = h.sb.snapshot();
    assert_eq!(s.count("user.get"), 3, "pages of 50");
}

#[tokio::test]
async fn find_responsible_follows_callgate_chain() {
    let h = harness(|_, _| {}).await;
    // A converted lead (ignored), an open lead, a company and a contact.
    h.sb.add_entity("LEAD", "Old lead", &["+7 916 123-45-67"], 13, "CONVERTED");
    h.sb.add_entity(
        "LEAD",
        "Open lead",
        &["8 916 123 45 67", "79161234567"],
        11,
        "NEW",
    );
    let r = h.b24.find_responsible(CLIENT).await.unwrap().unwrap();
    assert_eq!(r.extension, "101", "unconverted lead");
    assert_eq!(r.entity["type"], "LEAD");
    h.sb.add_entity("COMPANY", "ACME", &["+79161234567"], 13, "");
    let r = h.b24.find_responsible(CLIENT).await.unwrap().unwrap();
    assert_eq!((r.extension.as_str(), r.name.as_str()), ("103", "ACME"));
    h.sb.add_entity("CONTACT", "Ivan", &["+7 (916) 123-45-67"], 12, "");
    let r = h
        .b24
        .find_responsible("+7 916 123-45-67")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.extension.as_str(), r.name.as_str()), ("102", "Ivan"));
    assert!(
        h.b24
            .find_responsible("74990000000")
            .await
            .unwrap()
            .is_none()
    );
    // Responsible without an internal number: nothing to route to.
    h.sb.add_entity("CONTACT", "Orphan", &["74991112233"], 14, "");
    assert!(
        h.b24
            .find_responsible("74991112233")
            .await
            .unwrap()
            .is_none()
    );
    // Two requests per lookup: one batch of searches, one batch of gets.
    let s = h.sb.snapshot();
    assert!(
        s.requests
            .iter()
            .filter(|r| !r.in_batch)
            .all(|r| r.method == "batch" || r.method == "user.get")
    );

    let h2 = harness(|c, _| c.lookup = LookupMethod::SearchCrmEntities).await;
    h2.sb
        .add_entity("CONTACT", "Ivan", &["+79161234567"], 12, "");
    let r = h2.b24.find_responsible(CLIENT).await.unwrap().unwrap();
    assert_eq!(r.extension, "102");
}

#[tokio::test]
async fn call_id_reuse_within_30_minutes_without_external_id() {
    let h = harness(|_, _| {}).await;
    let c = h.b24.client();
    let p = json!({"USER_ID": 11, "PHONE_NUMBER": CLIENT, "TYPE": 2, "CRM_CREATE": 0, "SHOW": 0});
    let a = c
        .call("telephony.externalcall.register", p.clone())
        .await
        .unwrap();
    let b = c
        .call("telephony.externalcall.register", p.clone())
        .await
        .unwrap();
    assert_eq!(a["CALL_ID"], b["CALL_ID"], "the documented quirk");
    // ... which is why the connector always sends EXTERNAL_CALL_ID.
    let mut q = p.clone();
    q["EXTERNAL_CALL_ID"] = json!("1795304861.0");
    let d = c.call("telephony.externalcall.register", q).await.unwrap();
    assert_ne!(a["CALL_ID"], d["CALL_ID"]);
    h.sb.advance(Duration::from_secs(31 * 60));
    let e = c.call("telephony.externalcall.register", p).await.unwrap();
    assert_ne!(a["CALL_ID"], e["CALL_ID"]);

    // attachRecord before finish is refused with the documented text.
    let err = c
        .call(
            "telephony.externalCall.attachRecord",
            json!({"CALL_ID": e["CALL_ID"], "RECORD_URL": "https://x/y.mp3"}),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "Call is not found in the statistic table. Looks like it is not finished yet."
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("telephony.externalCall.attachRecord"),
        "{err}"
    );

    // Two overlapping calls from one number through the connector stay apart.
    for (id, leg) in [
        ("1795305227.139", "1795305227.140"),
        ("1795305227.142", "1795305227.143"),
    ] {
        let mut call = call(id, Direction::Inbound, CLIENT, "74951234569");
        conv(&mut call, leg, "101", false);
        h.deliver(Stage::ConversationRequested, Some(leg), &call)
            .await
            .unwrap();
        ended(&mut call, "", 480, 0, 15);
        h.deliver(Stage::CallEnded, None, &call).await.unwrap();
    }
    let s = h.sb.snapshot();
    let x = s.call_by_external("1795305227.139").unwrap();
    let y = s.call_by_external("1795305227.142").unwrap();
    assert_ne!(x.call_id, y.call_id);
    assert!(x.finish.is_some() && y.finish.is_some());
}

#[tokio::test]
async fn missed_call_todo_and_responsible_update() {
    let h = harness(|c, _| {
        c.todo_on_missed = true;
        c.set_responsible_on_answer = true;
    })
    .await;
    let contact =
        h.sb.add_entity("CONTACT", "Ivan", &["+79161234567"], 12, "");
    // Missed: the contact's responsible (102) gets the call and a to-do.
    let mut m = call("1795304872.2", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut m, "1795304872.3", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304872.3"), &m)
        .await
        .unwrap();
    ended(&mut m, "", 480, 0, 20);
    h.deliver(Stage::CallEnded, None, &m).await.unwrap();
    let s = h.sb.snapshot();
    let fin = s
        .call_by_external("1795304872.2")
        .unwrap()
        .finish
        .clone()
        .unwrap();
    assert_eq!(fin["USER_ID"], 12);
    assert_eq!(s.activities.len(), 1);
    let a = &s.activities[0];
    assert_eq!(
        (
            a["ownerTypeId"].clone(),
            a["ownerId"].clone(),
            a["responsibleId"].clone()
        ),
        (json!(3), json!(contact), json!(12))
    );
    assert!(a["title"].as_str().unwrap().contains(CLIENT));

    // Answered by 101: 101 becomes the contact's responsible.
    let mut c = call("1795304861.0", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304861.1", "101", true);
    h.deliver(Stage::ConversationRequested, Some("1795304861.1"), &c)
        .await
        .unwrap();
    ended(&mut c, "101", 200, 4, 7);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    assert_eq!(
        s.entities
            .iter()
            .find(|e| e.id == contact)
            .unwrap()
            .assigned_by_id,
        11
    );
    assert_eq!(s.activities.len(), 1, "no to-do for answered calls");
}

#[tokio::test]
async fn unregistrable_number_notifies_supervisor() {
    let h = harness(|c, _| {
        c.notify_unregistered = true;
        c.notify_user_id = Some(1);
    })
    .await;
    h.sb.fail_next(
        "telephony.externalcall.register",
        1,
        400,
        "ERROR_ARGUMENT",
        "Wrong phone number",
    );
    let mut c = call(
        "1795304861.0",
        Direction::Inbound,
        "anonymous",
        "74951234567",
    );
    conv(&mut c, "1795304861.1", "101", false);
    let r = h
        .deliver(Stage::ConversationRequested, Some("1795304861.1"), &c)
        .await;
    match r {
        Err(CrmError::Rejected { message }) => {
            assert!(
                message.contains("telephony.externalcall.register"),
                "{message}"
            );
            assert!(message.contains("Wrong phone number"), "{message}");
            assert!(message.contains("anonymous"), "params shown: {message}");
        }
        other => panic!("{other:?}"),
    }
    let s = h.sb.snapshot();
    assert_eq!(s.notifications.len(), 1);
    assert_eq!(s.notifications[0]["USER_ID"], 1);
    assert!(
        s.notifications[0]["MESSAGE"]
            .as_str()
            .unwrap()
            .contains("anonymous")
    );
}

struct CancelRegistration;
impl Customize for CancelRegistration {
    fn run<'a>(
        &'a self,
        hook: &'a str,
        input: Value,
        _call_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = HookOutcome> + Send + 'a>> {
        Box::pin(async move {
            match hook {
                "process_call_params"
                    if input["method"] == "telephony.externalcall.register"
                        && input["call_full"]["line_number"] == "74950000000" =>
                {
                    HookOutcome::Cancelled
                }
                "process_client_phone" => HookOutcome::Data(
                    json!({"phone": format!("+{}", input["phone"].as_str().unwrap_or(""))}),
                ),
                _ => HookOutcome::Default {
                    reason: "not installed".into(),
                },
            }
        })
    }
}

#[tokio::test]
async fn hooks_rewrite_phone_and_cancel_registration() {
    let h = harness_with_hooks(|_, _| {}, Arc::new(CancelRegistration)).await;
    let mut c = call("1795304861.0", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304861.1", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304861.1"), &c)
        .await
        .unwrap();
    let mut x = call("1795304999.0", Direction::Inbound, CLIENT, "74950000000");
    conv(&mut x, "1795304999.1", "101", false);
    let r = h
        .deliver(Stage::ConversationRequested, Some("1795304999.1"), &x)
        .await
        .unwrap();
    assert_eq!(r["cancelled"], true);
    let s = h.sb.snapshot();
    assert_eq!(s.count("telephony.externalcall.register"), 1);
    assert_eq!(s.calls.values().next().unwrap().phone, "+79161234567");
}

async fn intake(h: &Harness) -> (Arc<ClickToCallIntake>, mpsc::Receiver<events::ClickToCall>) {
    let (tx, rx) = mpsc::channel(16);
    let i = ClickToCallIntake::new(
        "app-token-123".into(),
        Duration::from_secs(30),
        tx,
        h.b24.pending_click_to_calls(),
        h.b24.directory(),
    );
    (i, rx)
}

#[tokio::test]
async fn online_click_to_call_event_checked_deduplicated_and_not_registered_again() {
    let h = harness(|_, _| {}).await;
    // Bitrix24 registers the call itself when the user clicks the number.
    let reg = h
        .b24
        .client()
        .call(
            "telephony.externalcall.register",
            json!({"USER_ID": 11, "PHONE_NUMBER": CLIENT, "TYPE": 1, "SHOW": 1}),
        )
        .await
        .unwrap();
    let crm_call_id = reg["CALL_ID"].as_str().unwrap().to_string();
    let (intake, mut rx) = intake(&h).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, events::router(intake)).await;
    });
    let http = reqwest::Client::new();
    let body = |token: &str| {
        format!(
            "event=ONEXTERNALCALLSTART&data%5BPHONE_NUMBER%5D=%2B7%20916%20123-45-67&data%5BPHONE_NUMBER_INTERNATIONAL%5D=%2B79161234567&data%5BEXTENSION%5D=101&data%5BUSER_ID%5D=11&data%5BCALL_ID%5D={}&data%5BCRM_ENTITY_TYPE%5D=CONTACT&data%5BCRM_ENTITY_ID%5D=5&data%5BIS_MOBILE%5D=N&ts=1795304950&auth%5Bdomain%5D=portal.bitrix24.ru&auth%5Bapplication_token%5D={token}",
            crm_call_id
        )
    };
    let post = |b: String| {
        http.post(format!("http://{addr}/bitrix24/events"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(b)
            .send()
    };
    let bad = post(body("forged")).await.unwrap();
    assert_eq!(bad.status(), 401);
    let ok = post(body("app-token-123")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let dup = post(body("app-token-123")).await.unwrap();
    assert_eq!(dup.text().await.unwrap(), "duplicate");
    let c2c = rx.recv().await.unwrap();
    assert_eq!(
        (
            c2c.extension.as_str(),
            c2c.phone.as_str(),
            c2c.crm_call_id.as_str()
        ),
        ("101", "+7 916 123-45-67", crm_call_id.as_str())
    );
    assert_eq!(c2c.crm_entity_id, Some(5));
    assert_eq!(c2c.source, EventSource::Online);
    assert!(rx.try_recv().is_err(), "duplicate dropped");

    // The originated call carries CRM_CALL_ID: finished, never registered again.
    let mut c = call("1795305000.50", Direction::Outbound, CLIENT, "74951234567");
    c.extra
        .insert("variables".into(), json!({"CRM_CALL_ID": crm_call_id}));
    conv(&mut c, "1795305000.51", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795305000.51"), &c)
        .await
        .unwrap();
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795305000.51"), &c)
        .await
        .unwrap();
    ended(&mut c, "101", 200, 12, 20);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    assert_eq!(
        s.count("telephony.externalcall.register"),
        1,
        "only Bitrix24's own"
    );
    assert_eq!(
        s.calls[&crm_call_id].finish.as_ref().unwrap()["DURATION"],
        12
    );
    assert_every_show_hidden(&s.cards_of(&crm_call_id));
}

#[tokio::test]
async fn offline_click_to_call_events_are_polled() {
    let h = harness(|_, _| {}).await;
    let (intake, mut rx) = intake(&h).await;
    let data = json!({"PHONE_NUMBER": "79161234567", "USER_ID": "12", "CALL_ID": "externalCall.aaa.1", "CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": "7"});
    h.sb.push_offline_event("ONEXTERNALCALLSTART", data.clone());
    h.sb.push_offline_event("ONCRMLEADADD", json!({"FIELDS": {"ID": 1}}));
    h.sb.push_offline_event("ONEXTERNALCALLSTART", data);
    let n = events::poll_offline_once(&h.b24.client(), &intake)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let c2c = rx.recv().await.unwrap();
    // No EXTENSION in the event: taken from the user's UF_PHONE_INNER.
    assert_eq!(
        (c2c.extension.as_str(), c2c.user_id, c2c.source),
        ("102", 12, EventSource::Offline)
    );
    assert!(rx.try_recv().is_err(), "repeat within 30 s dropped");
    let s = h.sb.snapshot();
    assert_eq!(s.offline_events.len(), 1, "other events stay queued");
    assert_eq!(
        events::poll_offline_once(&h.b24.client(), &intake)
            .await
            .unwrap(),
        0
    );

    // The fallback match: an outbound call from 102 to that number adopts the CALL_ID.
    let mut c = call(
        "1795305100.60",
        Direction::Outbound,
        "+7 916 123 45 67",
        "74951234567",
    );
    conv(&mut c, "1795305100.61", "102", false);
    let r = h
        .deliver(Stage::ConversationRequested, Some("1795305100.61"), &c)
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(h.sb.snapshot().count("telephony.externalcall.register"), 0);
    assert_eq!(
        h.store.get_call("1795305100.60").unwrap(),
        "externalCall.aaa.1"
    );

    // A user without an internal number cannot be rung.
    let r = intake
        .accept(
            &json!({"PHONE_NUMBER": "1", "USER_ID": 14, "CALL_ID": "externalCall.bbb.2"}),
            EventSource::Offline,
        )
        .await;
    assert!(r.is_err());
    let r = intake
        .accept(
            &json!({"PHONE_NUMBER": "1", "USER_ID": 11, "CALL_ID": "externalCall.ccc.3"}),
            EventSource::Offline,
        )
        .await;
    assert!(matches!(r, Ok(Accepted::Queued(_))));
}

trait GetCall {
    fn get_call(&self, id: &str) -> Option<String>;
}
impl GetCall for MemoryCallIdStore {
    fn get_call(&self, id: &str) -> Option<String> {
        kolokol::crm::bitrix24::CallIdStore::get(self, id).map(|r| r.call_id)
    }
}

#[tokio::test]
async fn daemon_wiring_polls_offline_events_until_stopped() {
    let h = harness(|c, _| {
        c.offline_events = true;
        c.offline_poll_interval = Duration::from_millis(20);
        c.application_token = "app-token-123".into();
    })
    .await;
    let (tx, mut rx) = mpsc::channel(4);
    let stop = tokio_util::sync::CancellationToken::new();
    let (_router, poller) = h.b24.click_to_call(tx, stop.clone());
    let poller = poller.expect("offline_events = true starts a poller");
    h.sb.push_offline_event(
        "ONEXTERNALCALLSTART",
        json!({"PHONE_NUMBER": "79161234567", "USER_ID": "11", "CALL_ID": "externalCall.ddd.4"}),
    );
    let c2c = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (c2c.extension.as_str(), c2c.crm_call_id.as_str()),
        ("101", "externalCall.ddd.4")
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), poller)
        .await
        .unwrap()
        .unwrap();
    let s = h.sb.snapshot();
    assert_eq!(s.bound_events.len(), 1);
    assert_eq!(s.bound_events[0]["event_type"], "offline");
}

#[tokio::test]
async fn unreachable_portal_is_retryable_and_never_leaks_the_webhook_secret() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = harness(move |c, _| {
        c.webhook_url = Some(format!("http://127.0.0.1:{port}/rest/1/supersecret42/"));
        c.max_retries = 1;
    })
    .await;
    let e = h.b24.check_access().await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("scope") && text.contains("connection failed"),
        "{text}"
    );
    assert!(!text.contains("supersecret42"), "{text}");
    assert!(matches!(e.into_crm(), CrmError::Retryable { .. }));
}

#[tokio::test]
async fn oversized_or_foreign_events_are_refused_or_ignored() {
    let h = harness(|_, _| {}).await;
    let (intake, mut rx) = intake(&h).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, events::router(intake)).await;
    });
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/bitrix24/events");
    let huge = format!(
        "event=ONEXTERNALCALLSTART&auth%5Bapplication_token%5D=app-token-123&data%5BX%5D={}",
        "a".repeat(200_000)
    );
    let r = http.post(&url).body(huge).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let other =
        "event=ONCRMLEADADD&data%5BFIELDS%5D%5BID%5D=1&auth%5Bapplication_token%5D=app-token-123";
    let r = http.post(&url).body(other).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let no_id = "event=ONEXTERNALCALLSTART&data%5BPHONE_NUMBER%5D=1&auth%5Bapplication_token%5D=app-token-123";
    let r = http.post(&url).body(no_id).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn double_click_is_dropped_and_its_bitrix_call_closed_as_cancelled() {
    let h = harness(|_, _| {}).await;
    let client = h.b24.client();
    let mut ids = Vec::new();
    for ext in ["click-1", "click-2"] {
        let r = client
            .call(
                "telephony.externalcall.register",
                json!({"USER_ID": 11, "PHONE_NUMBER": CLIENT, "TYPE": 1, "SHOW": 1, "EXTERNAL_CALL_ID": ext}),
            )
            .await
            .unwrap();
        ids.push(r["CALL_ID"].as_str().unwrap().to_string());
    }
    let (tx, mut rx) = mpsc::channel(4);
    let intake = ClickToCallIntake::with_closer(
        "t".into(),
        Duration::from_secs(30),
        tx,
        h.b24.pending_click_to_calls(),
        h.b24.directory(),
        client.clone(),
    );
    let ev = |id: &str| json!({"PHONE_NUMBER": "+7 916 123-45-67", "USER_ID": "11", "CALL_ID": id});
    assert!(matches!(
        intake.accept(&ev(&ids[0]), EventSource::Online).await,
        Ok(Accepted::Queued(_))
    ));
    assert_eq!(
        intake.accept(&ev(&ids[1]), EventSource::Online).await,
        Ok(Accepted::Duplicate)
    );
    assert_eq!(rx.recv().await.unwrap().crm_call_id, ids[0]);
    assert!(rx.try_recv().is_err());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = h.sb.snapshot();
        if let Some(f) = s.calls[&ids[1]].finish.as_ref() {
            assert_eq!(f["STATUS_CODE"], "603-S");
            assert!(
                s.calls[&ids[0]].finish.is_none(),
                "the first click goes ahead"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "duplicate never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn slow_portal_times_out_as_retryable() {
    let h = harness(|c, _| {
        c.request_timeout = Duration::from_millis(100);
        c.max_retries = 0;
    })
    .await;
    h.sb.set_latency(Duration::from_millis(400));
    let e = h.b24.client().call("scope", json!({})).await.unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(matches!(e.into_crm(), CrmError::Retryable { .. }));
    h.sb.set_latency(Duration::ZERO);
    assert!(h.b24.client().call("scope", json!({})).await.is_ok());
}
