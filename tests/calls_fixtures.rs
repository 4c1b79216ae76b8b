//! Every real call recording replays to the calls the fixtures README describes.
//!
//! Expectations come from two places: `tests/fixtures/expected/*.json` (what a CRM
//! must register) and the per-scenario details of `tests/fixtures/README.md`
//! (conversations in order, result codes, recordings, durations within one second).

mod fixture_support;

use std::collections::HashMap;
use std::path::PathBuf;

use kolokol::calls::replay::{Chunk, parse_timeline, replay_chunks};
use kolokol::calls::{CallFull, CallsConfig, Stage, StageEvent, Tracker, replay_bytes};
use proptest::prelude::*;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str) -> (Vec<u8>, String) {
    let dir = fixture_dir().join("ami");
    let bytes = std::fs::read(dir.join(format!("{name}.ami"))).unwrap();
    let timeline = std::fs::read_to_string(dir.join(format!("{name}.timeline"))).unwrap();
    (bytes, timeline)
}

fn replay(name: &str) -> Vec<StageEvent> {
    let (bytes, timeline) = load(name);
    replay_bytes(&bytes, Some(&timeline), &CallsConfig::default()).unwrap()
}

/// Checks that hold for every stream: one `call_ended` per call and nothing after it,
/// conversation stages in order (requested, optionally accepted, ended), each once.
/// Returns the final snapshots in order of call end.
fn check_invariants(events: &[StageEvent]) -> Vec<CallFull> {
    let mut ended_calls: HashMap<String, usize> = HashMap::new();
    let mut conv_stages: HashMap<(String, String), Vec<Stage>> = HashMap::new();
    let mut finals = Vec::new();
    for ev in events {
        let id = ev.call_full.id.clone();
        assert!(
            !ended_calls.contains_key(&id),
            "event {:?} after call_ended of {id}",
            ev.stage
        );
        match ev.stage {
            Stage::CallEnded => {
                assert!(ev.conversation_id.is_none());
                ended_calls.insert(id.clone(), finals.len());
                finals.push(ev.call_full.clone());
            }
            s => {
                let conv = ev
                    .conversation_id
                    .clone()
                    .expect("conversation stage without id");
                assert!(
                    ev.call_full.conversations.get(&conv).is_some(),
                    "{conv} not in call_full.conversations"
                );
                conv_stages.entry((id, conv)).or_default().push(s);
            }
        }
    }
    for ((call, conv), stages) in &conv_stages {
        assert!(ended_calls.contains_key(call), "call {call} never ended");
        let ok = stages.as_slice() == [Stage::ConversationRequested, Stage::ConversationEnded]
            || stages.as_slice()
                == [
                    Stage::ConversationRequested,
                    Stage::ConversationAccepted,
                    Stage::ConversationEnded,
                ];
        assert!(ok, "conversation {conv} of {call}: stages {stages:?}");
    }
    for c in &finals {
        for (conv, _) in c.conversations.iter() {
            assert!(
                conv_stages.contains_key(&(c.id.clone(), conv.to_string())),
                "conversation {conv} of {} has no stage events",
                c.id
            );
        }
    }
    finals
}

/// The expected/*.json contract.
fn check_expected(name: &str, finals: &[CallFull]) {
    let path = fixture_dir().join(format!("expected/{name}.json"));
    let want: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want = want["calls"].as_array().unwrap();
    let mut got: Vec<&CallFull> = finals.iter().collect();
    // Scenario 15 lists its calls in caller order.
    got.sort_by(|a, b| a.client_phone.cmp(&b.client_phone));
    assert_eq!(got.len(), want.len(), "{name}: number of calls");
    for (g, w) in got.iter().zip(want) {
        let ctx = format!("{name} call {}", g.id);
        assert_eq!(g.direction.as_str(), w["direction"], "{ctx}: direction");
        assert_eq!(g.client_phone, w["client_phone"], "{ctx}: client_phone");
        assert_eq!(g.answered_by, w["answered_by"], "{ctx}: answered_by");
        assert_eq!(g.result == 200, w["answered"], "{ctx}: answered");
        let min = w["min_conversations"].as_u64().unwrap() as usize;
        assert!(
            g.conversations.len() >= min,
            "{ctx}: conversations {} < {min}",
            g.conversations.len()
        );
        if let Some(line) = w.get("line_number") {
            assert_eq!(g.line_number, *line, "{ctx}: line_number");
        }
        let recorded = w.get("record").and_then(Value::as_bool).unwrap_or(false);
        assert_eq!(
            !g.record.is_empty(),
            recorded,
            "{ctx}: record {:?}",
            g.record
        );
    }
}

/// README details of a one-call scenario.
struct Want {
    direction: &'static str,
    client: &'static str,
    line: &'static str,
    answered_by: &'static str,
    result: u16,
    /// (employee, conversation result, ring s, talk s) in order.
    convs: &'static [(&'static str, u16, u64, u64)],
    record: &'static str,
    duration: u64,
    talk: u64,
}

fn within_1s(got: u64, want: u64, what: &str) {
    assert!(got.abs_diff(want) <= 1, "{what}: got {got}, want {want} ±1");
}

fn check_one(name: &str, w: Want) -> CallFull {
    let events = replay(name);
    let finals = check_invariants(&events);
    check_expected(name, &finals);
    assert_eq!(finals.len(), 1, "{name}: one call");
    let c = finals.into_iter().next().unwrap();
    assert_eq!(c.direction.as_str(), w.direction, "{name}");
    assert_eq!(c.client_phone, w.client, "{name}");
    assert_eq!(c.line_number, w.line, "{name}");
    assert_eq!(c.answered_by, w.answered_by, "{name}");
    assert_eq!(c.result, w.result, "{name}: result");
    assert_eq!(
        c.conversations.len(),
        w.convs.len(),
        "{name}: conversations"
    );
    for ((id, conv), (user, result, ring, talk)) in c.conversations.iter().zip(w.convs) {
        let u = conv.user.as_ref().map(|u| u.number.as_str()).unwrap_or("");
        assert_eq!(u, *user, "{name} conversation {id}: user");
        assert_eq!(conv.result, *result, "{name} conversation {id}: result");
        within_1s(conv.ring_duration, *ring, &format!("{name} {id} ring"));
        within_1s(conv.talk_duration, *talk, &format!("{name} {id} talk"));
        assert_eq!(conv.channel.state, "ended");
        assert_eq!(conv.channel.was_answered, *result == 200, "{name} {id}");
    }
    if w.record.is_empty() {
        assert_eq!(c.record, "", "{name}: record");
    } else {
        assert_eq!(
            c.record,
            format!("/var/spool/asterisk/monitor/{}", w.record),
            "{name}: record"
        );
    }
    within_1s(c.duration, w.duration, &format!("{name} duration"));
    within_1s(c.talk_duration, w.talk, &format!("{name} talk"));
    assert_eq!(c.channel.id, c.id, "{name}: main channel is the linkedid");
    assert!(c.channel.is_primary);
    assert_eq!(
        c.active_conversation_id, "",
        "{name}: nothing active after the end"
    );
    c
}

#[test]
fn s01_inbound_answered_recorded() {
    let c = check_one(
        "01-inbound-answered-recorded",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "101",
            result: 200,
            convs: &[("101", 200, 3, 4)],
            record: "in-20261121-234741-79161234567-1795304861.0.wav",
            duration: 7,
            talk: 4,
        },
    );
    // The recording named in call_full is one of the recorded files.
    let base = c.record.rsplit('/').next().unwrap();
    assert!(fixture_dir().join("recordings").join(base).exists());
    assert_eq!(c.hangup_by, "client");
    assert_eq!(c.channel.kind, "incoming");
    assert_eq!(c.channel.start_time, "2026-11-21 23:47:41");
    let conv = c.conversations.get("1795304861.1").unwrap();
    assert_eq!(conv.channel.name, "PJSIP/101-00000001");
    assert_eq!(conv.channel.answer_time, "2026-11-21 23:47:44");
    assert_eq!(conv.channel.to.number, "101");
    assert_eq!(conv.channel.from.number, "79161234567");
    assert_eq!(conv.channel.trunk.as_ref().unwrap().name, "trunk");
}

#[test]
fn s02_inbound_noanswer_missed() {
    let c = check_one(
        "02-inbound-noanswer-missed",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "",
            result: 480,
            convs: &[("101", 480, 20, 0)],
            // UserField names a file, but MixMonitor never ran: no record.
            record: "",
            duration: 20,
            talk: 0,
        },
    );
    assert_eq!(
        c.conversations.iter().next().unwrap().1.dial_status,
        "NOANSWER"
    );
}

#[test]
fn s03_inbound_busy() {
    check_one(
        "03-inbound-busy",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "",
            result: 486,
            convs: &[("101", 486, 0, 0)],
            record: "",
            duration: 0,
            talk: 0,
        },
    );
}

#[test]
fn s04_ringgroup_102_answers_and_101_is_not_missed() {
    let c = check_one(
        "04-inbound-ringgroup-102-answers",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234568",
            answered_by: "102",
            result: 200,
            convs: &[("101", 487, 4, 0), ("102", 200, 4, 5)],
            record: "",
            duration: 9,
            talk: 5,
        },
    );
    assert_eq!(c.wait_duration, 4);
}

#[test]
fn s05_queue_101_answers() {
    let c = check_one(
        "05-inbound-queue-101-answers",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234569",
            answered_by: "101",
            result: 200,
            convs: &[("101", 200, 3, 5), ("102", 487, 3, 0)],
            record: "",
            duration: 8,
            talk: 5,
        },
    );
    assert_eq!(c.queue, "sales");
    within_1s(c.wait_duration, 3, "queue wait");
    assert_eq!(c.hangup_by, "employee");
    assert!(c.conversations.iter().all(|(_, cv)| cv.via == "queue"));
}

#[test]
fn s06_blind_transfer_ami() {
    let c = check_one(
        "06-inbound-blind-transfer-101-to-102",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "102",
            result: 200,
            convs: &[("101", 200, 2, 3), ("102", 200, 3, 5)],
            record: "in-20261121-234843-79161234567-1795304923.12.wav",
            duration: 13,
            talk: 8,
        },
    );
    assert_eq!(
        c.conversations.get("1795304928.14").unwrap().via,
        "transfer"
    );
}

#[test]
fn s07_attended_transfer_local_legs_are_folded() {
    let c = check_one(
        "07-inbound-attended-transfer-101-to-102",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "102",
            result: 200,
            // 101 talks 3 s, holds the client 6 s while consulting; 102 consults 3 s
            // then talks 3 s with the client.
            convs: &[("101", 200, 2, 9), ("102", 200, 3, 7)],
            record: "in-20261121-234900-79161234567-1795304940.15.wav",
            duration: 15,
            talk: 13,
        },
    );
    for (_, cv) in c.conversations.iter() {
        assert!(cv.channel.name.starts_with("PJSIP/"), "{}", cv.channel.name);
    }
}

#[test]
fn s08_outbound_answered() {
    let c = check_one(
        "08-outbound-101-answered",
        Want {
            direction: "outbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "101",
            result: 200,
            convs: &[("101", 200, 3, 3)],
            record: "out-20261121-234919-79161234567-1795304959.20.wav",
            duration: 6,
            talk: 3,
        },
    );
    let base = c.record.rsplit('/').next().unwrap();
    assert!(fixture_dir().join("recordings").join(base).exists());
    // The extension comes from the channel name, not the rewritten caller ID.
    assert_eq!(c.channel.from.number, "101");
    assert_eq!(c.channel.kind, "outgoing");
    assert_eq!(c.hangup_by, "employee");
}

#[test]
fn s09_outbound_noanswer() {
    check_one(
        "09-outbound-101-noanswer",
        Want {
            direction: "outbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "",
            result: 487,
            convs: &[("101", 487, 12, 0)],
            record: "",
            duration: 12,
            talk: 0,
        },
    );
}

#[test]
fn s10_internal() {
    let c = check_one(
        "10-internal-101-to-102",
        Want {
            direction: "internal",
            client: "102",
            line: "",
            answered_by: "102",
            result: 200,
            convs: &[("102", 200, 2, 4)],
            record: "",
            duration: 6,
            talk: 4,
        },
    );
    assert_eq!(c.channel.kind, "local");
    assert!(c.channel.trunk.is_none());
}

#[test]
fn s11_click_to_call_keeps_originate_variables() {
    let c = check_one(
        "11-click-to-call-originate",
        Want {
            direction: "outbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "101",
            result: 200,
            convs: &[("101", 200, 2, 8), ("101", 200, 3, 5)],
            record: "out-20261121-234956-79161234567-1795304994.26.wav",
            duration: 10,
            talk: 5,
        },
    );
    assert_eq!(c.variables["CRM_CALL_ID"], "abc123");
    assert_eq!(c.originate_action_id, "crm-originate-abc123");
    assert_eq!(
        c.conversations.get("1795304994.26").unwrap().via,
        "originate"
    );
    assert_eq!(c.hangup_by, "client");
    // Already at the first stage the call is known as an outbound call to the client.
    let first = &replay("11-click-to-call-originate")[0];
    assert_eq!(first.stage, Stage::ConversationRequested);
    assert_eq!(first.call_full.direction.as_str(), "outbound");
    assert_eq!(first.call_full.client_phone, "79161234567");
    assert_eq!(first.call_full.variables["CRM_CALL_ID"], "abc123");
}

#[test]
fn s12_fastagi_autodistribution() {
    let c = check_one(
        "12-inbound-fastagi-autodistribution",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234570",
            answered_by: "102",
            result: 200,
            convs: &[("102", 200, 2, 6)],
            record: "",
            duration: 8,
            talk: 6,
        },
    );
    assert_eq!(c.channel.from.name, "Ivan Petrov");
    assert_eq!(c.variables["KOLOKOL_DST"], "102");
}

#[test]
fn s13_abandoned_while_ringing() {
    check_one(
        "13-inbound-abandoned-while-ringing",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "",
            result: 487,
            convs: &[("101", 487, 6, 0)],
            record: "",
            duration: 6,
            talk: 0,
        },
    );
}

#[test]
fn s16_blind_transfer_sip_refer() {
    check_one(
        "16-inbound-blind-transfer-sip-refer",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234567",
            answered_by: "102",
            result: 200,
            convs: &[("101", 200, 2, 4), ("102", 200, 3, 5)],
            record: "in-20261121-235142-79161234567-1795305102.83.wav",
            duration: 14,
            talk: 9,
        },
    );
}

#[test]
fn s17_queue_with_local_members() {
    let c = check_one(
        "17-inbound-queue-local-members-102-answers",
        Want {
            direction: "inbound",
            client: "79161234567",
            line: "74951234571",
            answered_by: "102",
            result: 200,
            convs: &[("101", 487, 3, 0), ("102", 200, 3, 6)],
            record: "",
            duration: 9,
            talk: 6,
        },
    );
    assert_eq!(c.queue, "support");
    for (_, cv) in c.conversations.iter() {
        assert!(
            cv.channel.name.starts_with("PJSIP/10"),
            "{}",
            cv.channel.name
        );
    }
}

#[test]
fn s15_burst_of_20_concurrent_calls() {
    let events = replay("15-burst-20-concurrent");
    let finals = check_invariants(&events);
    check_expected("15-burst-20-concurrent", &finals);
    let by_client: HashMap<&str, &CallFull> = finals
        .iter()
        .map(|c| (c.client_phone.as_str(), c))
        .collect();
    // caller suffix, linkedid, answered_by, result, conversations, wait s, talk s
    // (wait/talk for queue calls from the README table; None where it gives none).
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        u16,
        usize,
        Option<u64>,
        Option<u64>,
    );
    let table: &[Row] = &[
        ("00", "1795305227.139", "101", 200, 2, Some(4), Some(7)),
        ("01", "1795305227.142", "102", 200, 2, None, None),
        ("02", "1795305227.145", "", 487, 0, Some(15), Some(0)),
        ("03", "1795305227.146", "", 487, 2, None, Some(0)),
        ("04", "1795305227.149", "102", 200, 2, Some(23), Some(11)),
        ("05", "1795305227.150", "101", 200, 2, None, None),
        ("06", "1795305228.153", "101", 200, 1, Some(27), Some(11)),
        ("07", "1795305228.154", "101", 200, 2, None, None),
        ("08", "1795305228.157", "", 487, 3, Some(52), Some(0)),
        ("09", "1795305228.158", "", 480, 2, Some(20), Some(0)),
        ("10", "1795305228.161", "", 487, 0, Some(18), Some(0)),
        ("11", "1795305228.162", "", 480, 2, Some(20), Some(0)),
        ("12", "1795305228.165", "", 487, 0, Some(49), Some(0)),
        ("13", "1795305228.166", "102", 200, 2, None, None),
        ("14", "1795305228.169", "", 487, 0, Some(52), Some(0)),
        ("15", "1795305229.170", "", 487, 2, None, Some(0)),
        ("16", "1795305229.173", "", 487, 2, Some(55), Some(0)),
        ("17", "1795305229.174", "101", 200, 2, None, None),
        ("18", "1795305229.177", "", 487, 0, Some(37), Some(0)),
        ("19", "1795305229.178", "102", 200, 2, None, None),
    ];
    assert_eq!(finals.len(), 20);
    for (suffix, id, by, result, convs, wait, talk) in table {
        let client = format!("791655501{suffix}");
        let c = by_client[client.as_str()];
        assert_eq!(c.id, *id, "{client}");
        assert_eq!(c.answered_by, *by, "{client}");
        assert_eq!(c.result, *result, "{client}");
        assert_eq!(c.conversations.len(), *convs, "{client}");
        assert_eq!(c.is_ivr, *convs == 0, "{client}");
        if let Some(w) = wait {
            within_1s(c.wait_duration, *w, &format!("{client} wait"));
        }
        if let Some(t) = talk {
            within_1s(c.talk_duration, *t, &format!("{client} talk"));
        }
    }
    let answered = finals.iter().filter(|c| c.result == 200).count();
    assert_eq!(answered, 9, "9 answered, 11 missed");
}

#[test]
fn sessions_without_calls_emit_nothing_and_live_calls_empty_at_the_end() {
    for name in ["14b-login-failure", "14c-md5-challenge-login"] {
        assert!(replay(name).is_empty(), "{name}");
    }
    for name in ["14-ami-protocol", "14d-readonly-user"] {
        let (bytes, timeline) = load(name);
        let mut t = Tracker::new(&CallsConfig::default()).unwrap();
        let ev = kolokol::calls::replay::replay(&bytes, Some(&timeline), &mut t).unwrap();
        let finals = check_invariants(&ev);
        assert_eq!(finals.len(), 1, "{name}");
        assert_eq!(finals[0].answered_by, "101");
        assert!(t.live_calls().is_empty());
        assert_eq!(t.channel_count(), 0, "{name}: channel state dropped");
    }
}

use fixture_support::CALL_FIXTURES;

#[test]
fn without_timeline_the_outcome_is_the_same() {
    // Coarse times (Uniqueid epochs) change durations, not who/what/result.
    for name in CALL_FIXTURES {
        let (bytes, timeline) = load(name);
        let a = check_invariants(
            &replay_bytes(&bytes, Some(&timeline), &CallsConfig::default()).unwrap(),
        );
        let b = check_invariants(&replay_bytes(&bytes, None, &CallsConfig::default()).unwrap());
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (
                    &x.id,
                    x.direction,
                    &x.client_phone,
                    &x.answered_by,
                    x.result,
                    &x.record
                ),
                (
                    &y.id,
                    y.direction,
                    &y.client_phone,
                    &y.answered_by,
                    y.result,
                    &y.record
                ),
                "{name}"
            );
        }
    }
}

/// Split every timeline chunk further at the given fractions; each piece keeps its
/// chunk's time, so a message's time (the read that completed it) is unchanged.
fn resplit<'a>(bytes: &'a [u8], chunks: &[Chunk], cuts: &[u16]) -> Vec<(&'a [u8], Option<f64>)> {
    let mut out = Vec::new();
    let mut k = 0usize;
    for c in chunks {
        let mut start = c.offset;
        let end = c.offset + c.len;
        // A varying number of cuts per chunk.
        let n = cuts.get(k).map_or(0, |v| (*v % 4) as usize);
        k += 1;
        for _ in 0..n {
            let Some(v) = cuts.get(k) else { break };
            k += 1;
            let remaining = end - start;
            if remaining < 2 {
                break;
            }
            let cut = start + 1 + (*v as usize % (remaining - 1));
            out.push((&bytes[start..cut], Some(c.at)));
            start = cut;
        }
        out.push((&bytes[start..end], Some(c.at)));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_split_gives_identical_output(
        which in 0..CALL_FIXTURES.len(),
        cuts in proptest::collection::vec(any::<u16>(), 0..4000),
    ) {
        let name = CALL_FIXTURES[which];
        let (bytes, timeline) = load(name);
        let chunks = parse_timeline(&timeline, bytes.len()).unwrap();
        let whole = replay(name);
        let mut t = Tracker::new(&CallsConfig::default()).unwrap();
        let split = replay_chunks(resplit(&bytes, &chunks, &cuts), &mut t);
        prop_assert_eq!(&whole, &split);

        // Without a timeline: arbitrary byte splits of the whole stream.
        let mut pieces: Vec<(&[u8], Option<f64>)> = Vec::new();
        let mut start = 0usize;
        for v in cuts.iter().take(200) {
            if start >= bytes.len() { break; }
            let end = (start + 1 + (*v as usize % 997)).min(bytes.len());
            pieces.push((&bytes[start..end], None));
            start = end;
        }
        pieces.push((&bytes[start..], None));
        let mut t1 = Tracker::new(&CallsConfig::default()).unwrap();
        let a = replay_chunks([(&bytes[..], None)], &mut t1);
        let mut t2 = Tracker::new(&CallsConfig::default()).unwrap();
        let b = replay_chunks(pieces, &mut t2);
        prop_assert_eq!(a, b);
    }
}
