//! The Bitrix24 call flow over real HTTP against the sandbox portal, with stage
//! sequences shaped like the recorded fixtures.

mod bitrix24_support;

use std::time::Duration;

use bitrix24_support::*;
use kolokol::calls::{Direction, Stage};
use kolokol::crm::bitrix24::{MissedResponsible, RecordMode, ShowMode};
use kolokol::crm::{CrmError, MemoryJobSteps};
use serde_json::json;

const CLIENT: &str = "79161234567";
const REC_01: &str = "tests/fixtures/recordings/in-20261121-234741-79161234567-1795304861.0.wav";

#[tokio::test]
async fn inbound_answered_recorded_01() {
    let h = harness(|c, _| c.record = RecordMode::Upload).await;
    let mut c = call("1795304861.0", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304861.1", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304861.1"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304861.1", "101", true);
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304861.1"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304861.1"), &c)
        .await
        .unwrap();
    ended(&mut c, "101", 200, 4, 7);
    c.record = REC_01.into();
    let report = h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    assert_eq!(report["status_code"], "200");

    let s = h.sb.snapshot();
    assert_eq!(s.count("telephony.externalcall.register"), 1);
    let reg = s
        .requests
        .iter()
        .find(|r| r.method == "telephony.externalcall.register")
        .unwrap();
    assert_eq!(reg.params["TYPE"], 2);
    assert_eq!(reg.params["EXTERNAL_CALL_ID"], "1795304861.0");
    assert_eq!(reg.params["LINE_NUMBER"], "74951234567");
    assert_eq!(reg.params["USER_ID"], 11);
    assert_eq!(reg.params["SHOW"], 1);
    assert!(
        reg.params["CALL_START_DATE"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-21T23:47:41")
    );
    let call = s.call_by_external("1795304861.0").unwrap();
    let fin = call.finish.as_ref().unwrap();
    assert_eq!(fin["STATUS_CODE"], "200");
    assert_eq!(fin["USER_ID"], 11);
    assert_eq!(fin["DURATION"], 4);
    assert_eq!(call.finish_requests, 1);
    assert_eq!(
        call.records,
        vec![
            json!({"FILENAME": "in-20261121-234741-79161234567-1795304861.0.wav", "BYTES": 64044})
        ]
    );
    // attachRecord strictly after finish
    let pos = |m: &str| {
        s.requests
            .iter()
            .position(|r| r.method.eq_ignore_ascii_case(m))
            .unwrap()
    };
    assert!(pos("telephony.externalCall.attachRecord") > pos("telephony.externalcall.finish"));
    assert_eq!(
        s.created_leads().len(),
        1,
        "unknown number with crm_create → one lead"
    );
    assert_every_show_hidden(&s.cards_of(&call.call_id));
    assert!(h.store.is_empty(), "call state dropped after call_ended");
}

#[tokio::test]
async fn inbound_missed_02_and_busy_03() {
    let h = harness(|_, _| {}).await;
    // 02: 101 rings 20 s, nobody answers.
    let mut c = call("1795304872.2", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304872.3", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304872.3"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304872.3"), &c)
        .await
        .unwrap();
    ended(&mut c, "", 480, 0, 20);
    c.record = "/var/spool/asterisk/monitor/in-20261121-234752-79161234567-1795304872.2.wav".into();
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();

    // 03: 101 busy.
    let mut b = call("1795304895.4", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut b, "1795304895.5", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304895.5"), &b)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304895.5"), &b)
        .await
        .unwrap();
    ended(&mut b, "", 486, 0, 0);
    h.deliver(Stage::CallEnded, None, &b).await.unwrap();

    let s = h.sb.snapshot();
    let missed = s.call_by_external("1795304872.2").unwrap();
    assert_eq!(missed.finish.as_ref().unwrap()["STATUS_CODE"], "304");
    assert_eq!(missed.finish.as_ref().unwrap()["USER_ID"], 11);
    assert_eq!(missed.finish.as_ref().unwrap()["DURATION"], 0);
    assert!(missed.records.is_empty(), "no recording for a missed call");
    let busy = s.call_by_external("1795304895.4").unwrap();
    assert_eq!(busy.finish.as_ref().unwrap()["STATUS_CODE"], "486");
    assert_ne!(
        missed.call_id, busy.call_id,
        "EXTERNAL_CALL_ID keeps calls apart"
    );
    assert_eq!(s.count("telephony.externalCall.attachRecord"), 0);
    for c in [missed, busy] {
        assert_every_show_hidden(&s.cards_of(&c.call_id));
    }
    // The lead created by the first call is found by the second: one lead only.
    assert_eq!(s.created_leads().len(), 1);
}

#[tokio::test]
async fn ring_group_102_answers_04() {
    let h = harness(|_, _| {}).await;
    let mut c = call("1795304899.6", Direction::Inbound, CLIENT, "74951234568");
    conv(&mut c, "1795304899.7", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304899.7"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304899.8", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795304899.8"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304899.8", "102", true);
    c.answered_by = "102".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304899.8"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304899.7"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304899.8"), &c)
        .await
        .unwrap();
    ended(&mut c, "102", 200, 5, 9);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();

    let s = h.sb.snapshot();
    assert_eq!(s.count("telephony.externalcall.register"), 1);
    let call = s.call_by_external("1795304899.6").unwrap();
    assert_eq!(call.user_id, 11, "registered at the first ring");
    assert_eq!(
        s.cards_of(&call.call_id),
        vec![
            ("show".into(), 11),
            ("show".into(), 12),
            ("hide".into(), 11),
            ("finish".into(), 12)
        ]
    );
    let fin = call.finish.as_ref().unwrap();
    assert_eq!(fin["USER_ID"], 12);
    assert_eq!(fin["STATUS_CODE"], "200");
    assert_eq!(fin["DURATION"], 5);
}

#[tokio::test]
async fn queue_101_answers_05_with_duplicate_events() {
    let h = harness(|_, _| {}).await;
    let mut c = call("1795304912.9", Direction::Inbound, CLIENT, "74951234569");
    conv(&mut c, "1795304912.10", "101", false);
    conv(&mut c, "1795304912.11", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795304912.10"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304912.11"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304912.10", "101", true);
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304912.10"), &c)
        .await
        .unwrap();
    // The losing member's DialEnd CANCEL comes twice.
    h.deliver(Stage::ConversationEnded, Some("1795304912.11"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304912.11"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304912.10"), &c)
        .await
        .unwrap();
    ended(&mut c, "101", 200, 5, 8);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    let call = s.call_by_external("1795304912.9").unwrap();
    assert_eq!(
        s.cards_of(&call.call_id),
        vec![
            ("show".into(), 11),
            ("show".into(), 12),
            ("hide".into(), 12),
            ("finish".into(), 11)
        ]
    );
    assert_eq!(
        s.count("telephony.externalcall.hide"),
        1,
        "second CANCEL hides nothing"
    );
    assert_eq!(call.finish.as_ref().unwrap()["USER_ID"], 11);
}

#[tokio::test]
async fn blind_transfer_06_final_owner_finishes() {
    let h = harness(|_, _| {}).await;
    let mut c = call("1795304923.12", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304923.13", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304923.13"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304923.13", "101", true);
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304923.13"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304923.13"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304928.14", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795304928.14"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304928.14", "102", true);
    c.answered_by = "102".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304928.14"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304928.14"), &c)
        .await
        .unwrap();
    ended(&mut c, "102", 200, 8, 16);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    assert_eq!(s.count("telephony.externalcall.register"), 1);
    let call = s.call_by_external("1795304923.12").unwrap();
    assert_eq!(
        s.cards_of(&call.call_id),
        vec![
            ("show".into(), 11),
            ("show".into(), 12),
            ("hide".into(), 11),
            ("finish".into(), 12)
        ]
    );
    assert_eq!(call.finish.as_ref().unwrap()["USER_ID"], 12);
}

#[tokio::test]
async fn outbound_08_and_internal_10() {
    let h = harness(|c, _| c.record = RecordMode::Link).await;
    let mut c = call("1795304959.20", Direction::Outbound, CLIENT, "74951234567");
    conv(&mut c, "1795304959.21", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304959.21"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304959.21", "101", true);
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304959.21"), &c)
        .await
        .unwrap();
    ended(&mut c, "101", 200, 3, 6);
    c.record =
        "/var/spool/asterisk/monitor/out-20261121-234919-79161234567-1795304959.20.wav".into();
    c.extra.insert(
        "record_link".into(),
        json!("https://pbx.example/records/tok.mp3"),
    );
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();

    let mut i = call("1795304970.22", Direction::Internal, "102", "");
    conv(&mut i, "1795304970.23", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795304970.23"), &i)
        .await
        .unwrap();
    ended(&mut i, "102", 200, 3, 5);
    h.deliver(Stage::CallEnded, None, &i).await.unwrap();

    let s = h.sb.snapshot();
    assert_eq!(
        s.count("telephony.externalcall.register"),
        1,
        "internal calls are not registered"
    );
    let reg = s
        .requests
        .iter()
        .find(|r| r.method == "telephony.externalcall.register")
        .unwrap();
    assert_eq!(reg.params["TYPE"], 1);
    assert_eq!(reg.params["USER_ID"], 11);
    let call = s.call_by_external("1795304959.20").unwrap();
    assert_eq!(call.finish.as_ref().unwrap()["STATUS_CODE"], "200");
    assert_eq!(
        call.records,
        vec![json!({"RECORD_URL": "https://pbx.example/records/tok.mp3"})]
    );
}

#[tokio::test]
async fn abandoned_in_queue_never_rang_is_still_registered_as_missed() {
    // Burst caller 79165550102: abandoned in the queue, no agent ever rang.
    let h = harness(|c, _| {
        c.missed_responsible = MissedResponsible::Fixed;
        c.default_user_id = Some(13);
    })
    .await;
    let mut c = call(
        "1795305227.145",
        Direction::Inbound,
        "79165550102",
        "74951234569",
    );
    ended(&mut c, "", 487, 0, 15);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    let call = s.call_by_external("1795305227.145").unwrap();
    assert_eq!(call.user_id, 13);
    assert!(!call.show, "nobody rang: no card");
    let fin = call.finish.as_ref().unwrap();
    assert_eq!(fin["STATUS_CODE"], "304");
    assert_eq!(fin["USER_ID"], 13);
}

#[tokio::test]
async fn leads_created_only_when_configured() {
    let h = harness(|c, _| c.crm_create = false).await;
    let mut c = call("1795304872.2", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304872.3", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304872.3"), &c)
        .await
        .unwrap();
    ended(&mut c, "", 480, 0, 20);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    assert!(s.created_leads().is_empty());
    let reg = s
        .requests
        .iter()
        .find(|r| r.method == "telephony.externalcall.register")
        .unwrap();
    assert_eq!(reg.params["CRM_CREATE"], 0);
}

#[tokio::test]
async fn redelivery_creates_nothing_twice() {
    let h = harness(|c, _| {
        c.record = RecordMode::Upload;
        c.max_retries = 1;
    })
    .await;
    let mut c = call("1795304861.0", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304861.1", "101", true);
    let ring = MemoryJobSteps::default();
    h.deliver_with(
        Stage::ConversationRequested,
        Some("1795304861.1"),
        &c,
        &ring,
    )
    .await
    .unwrap();
    // The same job again (worker crashed before acknowledging it).
    h.deliver_with(
        Stage::ConversationRequested,
        Some("1795304861.1"),
        &c,
        &ring,
    )
    .await
    .unwrap();
    ended(&mut c, "101", 200, 4, 7);
    c.record = REC_01.into();
    // attachRecord keeps failing: the job goes back to the outbox after finish.
    h.sb.fail_next(
        "telephony.externalCall.attachRecord",
        2,
        503,
        "INTERNAL_SERVER_ERROR",
        "try later",
    );
    let end = MemoryJobSteps::default();
    let first = h.deliver_with(Stage::CallEnded, None, &c, &end).await;
    assert!(
        matches!(first, Err(CrmError::Retryable { .. })),
        "{first:?}"
    );
    h.deliver_with(Stage::CallEnded, None, &c, &end)
        .await
        .unwrap();
    h.deliver_with(Stage::CallEnded, None, &c, &end)
        .await
        .unwrap();
    let s = h.sb.snapshot();
    assert_eq!(s.count("telephony.externalcall.register"), 1);
    assert_eq!(s.count("telephony.externalcall.finish"), 1);
    assert_eq!(s.calls.len(), 1);
    assert_eq!(s.created_leads().len(), 1);
    let call = s.call_by_external("1795304861.0").unwrap();
    assert_eq!(call.records.len(), 1, "record attached once");
}

#[tokio::test]
async fn query_limit_exceeded_is_retried() {
    // A refusal empties our bucket too; a faster drain keeps the test short.
    let h = harness(|c, _| c.rate_per_sec = 50.0).await;
    h.sb.fail_next(
        "telephony.externalcall.register",
        2,
        503,
        "QUERY_LIMIT_EXCEEDED",
        "Too many requests",
    );
    h.sb.fail_next(
        "telephony.externalcall.finish",
        1,
        503,
        "QUERY_LIMIT_EXCEEDED",
        "Too many requests",
    );
    let mut c = call("1795304872.2", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304872.3", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304872.3"), &c)
        .await
        .unwrap();
    ended(&mut c, "", 480, 0, 20);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    assert_eq!(
        s.count("telephony.externalcall.register"),
        3,
        "two refusals, then success"
    );
    assert_eq!(s.calls.len(), 1);
    assert_eq!(s.count("telephony.externalcall.finish"), 2);
    assert!(s.calls.values().all(|c| c.finish.is_some()));
}

#[tokio::test]
async fn sandbox_leaky_bucket_overflow_is_absorbed_by_backoff() {
    // Our limiter is set far too high on purpose: the portal's bucket overflows and
    // the 503s are retried until everything went through.
    let h = harness(|c, _| {
        c.rate_per_sec = 1000.0;
        c.burst = 1000;
        c.max_retries = 20;
        c.retry_backoff = Duration::from_millis(20);
    })
    .await;
    h.sb.set_rate(20.0, 5);
    let client = h.b24.client();
    let calls = (0..15).map(|_| {
        let client = client.clone();
        async move { client.call("scope", json!({})).await }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let s = h.sb.snapshot();
    let limited = s
        .requests
        .iter()
        .filter(|r| r.error.as_deref() == Some("QUERY_LIMIT_EXCEEDED"))
        .count();
    assert!(limited > 0, "the sandbox bucket overflowed");
    assert_eq!(s.requests.iter().filter(|r| r.status == 200).count(), 15);
}

#[tokio::test]
async fn show_on_answer_and_never() {
    let h = harness(|c, _| c.show = ShowMode::OnAnswer).await;
    let mut c = call("1795304899.6", Direction::Inbound, CLIENT, "74951234568");
    conv(&mut c, "1795304899.7", "101", false);
    conv(&mut c, "1795304899.8", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795304899.7"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304899.8"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304899.8", "102", true);
    c.answered_by = "102".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304899.8"), &c)
        .await
        .unwrap();
    ended(&mut c, "102", 200, 5, 9);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    let call = s.call_by_external("1795304899.6").unwrap();
    assert!(!call.show);
    assert_eq!(
        s.cards_of(&call.call_id),
        vec![("show".into(), 12), ("finish".into(), 12)]
    );

    let h = harness(|c, _| c.show = ShowMode::Never).await;
    h.deliver(Stage::ConversationRequested, Some("1795304899.7"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304899.8"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationAccepted, Some("1795304899.8"), &c)
        .await
        .unwrap();
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    assert_eq!(
        s.count("telephony.externalcall.show") + s.count("telephony.externalcall.hide"),
        0
    );
    assert_eq!(s.count("telephony.externalcall.finish"), 1);
}

#[tokio::test]
async fn debounced_cards_cancel_out_and_go_in_one_batch() {
    let h = harness(|c, _| c.card_debounce = Duration::from_secs(3600)).await;
    let mut c = call("1795304912.9", Direction::Inbound, CLIENT, "74951234569");
    conv(&mut c, "1795304912.10", "101", false);
    conv(&mut c, "1795304912.11", "102", false);
    conv(&mut c, "1795304912.12", "103", false);
    h.deliver(Stage::ConversationRequested, Some("1795304912.10"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304912.11"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304912.12"), &c)
        .await
        .unwrap();
    // 101 answers before the queued shows for 102/103 were sent: they cancel out.
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304912.10"), &c)
        .await
        .unwrap();
    h.b24.flush_cards().await;
    let s = h.sb.snapshot();
    assert_eq!(
        s.count("telephony.externalcall.show") + s.count("telephony.externalcall.hide"),
        0
    );

    // A second call: two rings queued, flushed together as one batch request.
    let mut d = call(
        "1795304899.6",
        Direction::Inbound,
        "79165550101",
        "74951234568",
    );
    conv(&mut d, "1795304899.7", "101", false);
    conv(&mut d, "1795304899.8", "102", false);
    conv(&mut d, "1795304899.9", "103", false);
    h.deliver(Stage::ConversationRequested, Some("1795304899.7"), &d)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304899.8"), &d)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795304899.9"), &d)
        .await
        .unwrap();
    d.answered_by = "102".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304899.8"), &d)
        .await
        .unwrap();
    let before = h.sb.snapshot().count("batch");
    ended(&mut d, "102", 200, 5, 9);
    h.deliver(Stage::CallEnded, None, &d).await.unwrap(); // flushes the queue first
    ended(&mut c, "101", 200, 5, 9);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    let call = s.call_by_external("1795304899.6").unwrap();
    assert_eq!(
        s.cards_of(&call.call_id),
        vec![
            ("show".into(), 11),
            ("hide".into(), 11),
            ("show".into(), 12),
            ("finish".into(), 12)
        ]
    );
    assert_eq!(s.count("batch"), before + 1, "show + hide in one batch");
    for c in s.calls.values() {
        assert_every_show_hidden(&s.cards_of(&c.call_id));
    }
}

/// Fixture 15's twenty concurrent callers, each call's stages in order, calls in
/// parallel (as the outbox delivers them): our limiter keeps the portal's leaky bucket
/// from overflowing, and every call gets exactly one finish with the right status.
#[tokio::test]
async fn burst_of_20_concurrent_calls_15_stays_under_the_portal_limit() {
    let h = std::sync::Arc::new(
        harness(|c, _| {
            c.rate_per_sec = 60.0;
            c.burst = 10;
        })
        .await,
    );
    h.sb.set_rate(60.0, 25); // margin for scheduling jitter on a loaded machine
    // (linkedid suffix, DID, legs rung, answered_by, result)
    let plan: [(u32, &str, &[&str], &str, u16); 20] = [
        (139, "74951234569", &["101", "102"], "101", 200),
        (142, "74951234568", &["101", "102"], "102", 200),
        (145, "74951234569", &[], "", 487),
        (146, "74951234568", &["101", "102"], "", 487),
        (149, "74951234569", &["101", "102"], "102", 200),
        (150, "74951234568", &["101", "102"], "101", 200),
        (153, "74951234569", &["101"], "101", 200),
        (154, "74951234568", &["101", "102"], "101", 200),
        (157, "74951234569", &["101", "102", "101"], "", 487),
        (158, "74951234568", &["101", "102"], "", 480),
        (161, "74951234569", &[], "", 487),
        (162, "74951234568", &["101", "102"], "", 480),
        (165, "74951234569", &[], "", 487),
        (166, "74951234568", &["101", "102"], "102", 200),
        (169, "74951234569", &[], "", 487),
        (170, "74951234568", &["101", "102"], "", 487),
        (173, "74951234569", &["101", "102"], "", 487),
        (174, "74951234568", &["101", "102"], "101", 200),
        (177, "74951234569", &[], "", 487),
        (178, "74951234568", &["101", "102"], "102", 200),
    ];
    let mut tasks = Vec::new();
    for (n, (seq, did, legs, answered, result)) in plan.iter().enumerate() {
        let h = h.clone();
        let (seq, did, legs, answered, result) = (*seq, *did, legs.to_vec(), *answered, *result);
        tasks.push(tokio::spawn(async move {
            let id = format!("1795305227.{seq}");
            let mut c = call(&id, Direction::Inbound, &format!("791655501{n:02}"), did);
            for (i, ext) in legs.iter().enumerate() {
                let leg = format!("{id}-{i}");
                conv(&mut c, &leg, ext, false);
                h.deliver(Stage::ConversationRequested, Some(&leg), &c)
                    .await
                    .unwrap();
            }
            for (i, ext) in legs.iter().enumerate() {
                let leg = format!("{id}-{i}");
                if *ext == answered && !c.answered_by.eq(answered) {
                    conv(&mut c, &leg, ext, true);
                    c.answered_by = answered.into();
                    h.deliver(Stage::ConversationAccepted, Some(&leg), &c)
                        .await
                        .unwrap();
                } else {
                    h.deliver(Stage::ConversationEnded, Some(&leg), &c)
                        .await
                        .unwrap();
                }
            }
            ended(
                &mut c,
                answered,
                result,
                if answered.is_empty() { 0 } else { 7 },
                20,
            );
            h.deliver(Stage::CallEnded, None, &c).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = h.sb.snapshot();
    assert_eq!(
        s.requests
            .iter()
            .filter(|r| r.error.as_deref() == Some("QUERY_LIMIT_EXCEEDED"))
            .count(),
        0
    );
    assert_eq!(s.calls.len(), 20);
    assert_eq!(s.count("telephony.externalcall.register"), 20);
    assert_eq!(s.count("telephony.externalcall.finish"), 20);
    let mut answered = 0;
    for (seq, _, _, by, _) in plan {
        let call = s.call_by_external(&format!("1795305227.{seq}")).unwrap();
        let fin = call.finish.as_ref().unwrap();
        match by {
            "" => assert_eq!(fin["STATUS_CODE"], "304", "{seq}"),
            ext => {
                answered += 1;
                assert_eq!(fin["STATUS_CODE"], "200", "{seq}");
                assert_eq!(fin["USER_ID"], if ext == "101" { 11 } else { 12 }, "{seq}");
            }
        }
        assert_every_show_hidden(&s.cards_of(&call.call_id));
    }
    assert_eq!(answered, 9);
}

#[tokio::test]
async fn outbound_noanswer_09_registered_for_the_dialler() {
    let h = harness(|c, _| c.crm_create = false).await;
    // Only the call's first channel names the employee (the client leg never rang
    // at an employee).
    let mut c = call("1795304966.24", Direction::Outbound, CLIENT, "74951234567");
    c.extra.insert(
        "channel".into(),
        json!({"from": "101", "to": CLIENT, "type": "outgoing"}),
    );
    ended(&mut c, "", 480, 0, 30);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();
    let s = h.sb.snapshot();
    let call = s.call_by_external("1795304966.24").unwrap();
    assert_eq!((call.call_type, call.user_id), (1, 11));
    let fin = call.finish.as_ref().unwrap();
    assert_eq!(
        (fin["STATUS_CODE"].clone(), fin["USER_ID"].clone()),
        (json!("480"), json!(11))
    );
    assert!(s.created_leads().is_empty());
}

#[tokio::test]
async fn attended_transfer_07_and_local_member_queue_17() {
    let h = harness(|_, _| {}).await;
    // 07: 101 answers, consults 102 (Local legs folded by the tracker), hangs up.
    let mut c = call("1795304940.15", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304940.16", "101", false);
    h.deliver(Stage::ConversationRequested, Some("1795304940.16"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304940.16", "101", true);
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304940.16"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304945.19", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795304945.19"), &c)
        .await
        .unwrap();
    conv(&mut c, "1795304945.19", "102", true);
    c.answered_by = "102".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304945.19"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304940.16"), &c)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795304945.19"), &c)
        .await
        .unwrap();
    ended(&mut c, "102", 200, 9, 17);
    h.deliver(Stage::CallEnded, None, &c).await.unwrap();

    // 17: queue with Local members, 102 answers.
    let mut q = call("1795305120.86", Direction::Inbound, CLIENT, "74951234571");
    conv(&mut q, "1795305120.91", "101", false);
    conv(&mut q, "1795305120.92", "102", false);
    h.deliver(Stage::ConversationRequested, Some("1795305120.91"), &q)
        .await
        .unwrap();
    h.deliver(Stage::ConversationRequested, Some("1795305120.92"), &q)
        .await
        .unwrap();
    conv(&mut q, "1795305120.92", "102", true);
    q.answered_by = "102".into();
    h.deliver(Stage::ConversationAccepted, Some("1795305120.92"), &q)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795305120.91"), &q)
        .await
        .unwrap();
    h.deliver(Stage::ConversationEnded, Some("1795305120.92"), &q)
        .await
        .unwrap();
    ended(&mut q, "102", 200, 6, 9);
    h.deliver(Stage::CallEnded, None, &q).await.unwrap();

    let s = h.sb.snapshot();
    assert_eq!(s.count("telephony.externalcall.register"), 2);
    assert_eq!(s.count("telephony.externalcall.finish"), 2);
    for id in ["1795304940.15", "1795305120.86"] {
        let call = s.call_by_external(id).unwrap();
        assert_eq!(
            s.cards_of(&call.call_id),
            vec![
                ("show".into(), 11),
                ("show".into(), 12),
                ("hide".into(), 11),
                ("finish".into(), 12)
            ],
            "{id}"
        );
        assert_eq!(call.finish.as_ref().unwrap()["USER_ID"], 12, "{id}");
    }
}
