//! What the recordings lack (parking, pickup, nested transfers between calls, resync
//! after a reconnect, reaping), built from the event shapes Asterisk emits in the
//! recordings: the same fields, channel snapshots and `Dest`-prefixed snapshots.

use std::path::PathBuf;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kolokol::ami::Message;
use kolokol::ami::codec::parse_messages;
use kolokol::calls::{CallFull, CallsConfig, Stage, StageEvent, Tracker};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 23, 0, 0).unwrap()
}

/// A channel snapshot as Asterisk puts it in every channel event.
#[derive(Clone)]
struct Ch {
    name: &'static str,
    id: &'static str,
    linkedid: &'static str,
    num: &'static str,
    context: &'static str,
    exten: &'static str,
}

impl Ch {
    fn with_linkedid(&self, linkedid: &'static str) -> Ch {
        Ch {
            linkedid,
            ..self.clone()
        }
    }
    fn fields(&self, prefix: &str, state: &str) -> Vec<(String, String)> {
        vec![
            (format!("{prefix}Channel"), self.name.into()),
            (format!("{prefix}ChannelState"), "0".into()),
            (format!("{prefix}ChannelStateDesc"), state.into()),
            (format!("{prefix}CallerIDNum"), self.num.into()),
            (format!("{prefix}CallerIDName"), "<unknown>".into()),
            (format!("{prefix}Context"), self.context.into()),
            (format!("{prefix}Exten"), self.exten.into()),
            (format!("{prefix}Priority"), "1".into()),
            (format!("{prefix}Uniqueid"), self.id.into()),
            (format!("{prefix}Linkedid"), self.linkedid.into()),
        ]
    }
}

fn ev(name: &str, parts: &[Vec<(String, String)>], extra: &[(&str, &str)]) -> Message {
    let mut pairs: Vec<(String, String)> = vec![
        ("Event".into(), name.into()),
        ("Privilege".into(), "call,all".into()),
    ];
    for p in parts {
        pairs.extend(p.iter().cloned());
    }
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Message::from_pairs(&pairs)
}

struct Run {
    t: Tracker,
    now: DateTime<Utc>,
    out: Vec<StageEvent>,
}

impl Run {
    fn new() -> Self {
        Run {
            t: Tracker::new(&CallsConfig::default()).unwrap(),
            now: t0(),
            out: Vec::new(),
        }
    }
    fn at(&mut self, secs: i64) -> &mut Self {
        self.now = t0() + Duration::seconds(secs);
        self
    }
    fn feed(&mut self, m: Message) -> &mut Self {
        let now = self.now;
        self.t.handle_into(&m, now, &mut self.out);
        self
    }
    fn newchannel(&mut self, c: &Ch, state: &str) -> &mut Self {
        self.feed(ev("Newchannel", &[c.fields("", state)], &[]))
    }
    fn newstate(&mut self, c: &Ch, state: &str) -> &mut Self {
        self.feed(ev("Newstate", &[c.fields("", state)], &[]))
    }
    fn dial_begin(&mut self, caller: &Ch, dest: &Ch, dial: &str) -> &mut Self {
        self.feed(ev(
            "DialBegin",
            &[caller.fields("", "Up"), dest.fields("Dest", "Down")],
            &[("DialString", dial)],
        ))
    }
    fn dial_end(&mut self, caller: &Ch, dest: &Ch, status: &str) -> &mut Self {
        self.feed(ev(
            "DialEnd",
            &[caller.fields("", "Up"), dest.fields("Dest", "Up")],
            &[("DialStatus", status)],
        ))
    }
    fn bridge_enter(&mut self, c: &Ch, bridge: &str) -> &mut Self {
        self.feed(ev(
            "BridgeEnter",
            &[c.fields("", "Up")],
            &[("BridgeUniqueid", bridge), ("BridgeType", "basic")],
        ))
    }
    fn hangup(&mut self, c: &Ch, cause: &str) -> &mut Self {
        self.feed(ev(
            "Hangup",
            &[c.fields("", "Up")],
            &[("Cause", cause), ("Cause-txt", "Normal Clearing")],
        ))
    }
    fn ended(&self) -> Vec<&CallFull> {
        self.out
            .iter()
            .filter(|e| e.stage == Stage::CallEnded)
            .map(|e| &e.call_full)
            .collect()
    }
    fn stages_of(&self, call: &str) -> Vec<(Stage, String)> {
        self.out
            .iter()
            .filter(|e| e.call_full.id == call)
            .map(|e| (e.stage, e.conversation_id.clone().unwrap_or_default()))
            .collect()
    }
}

fn trunk(id: &'static str, linkedid: &'static str) -> Ch {
    Ch {
        name: "PJSIP/trunk-00000001",
        id,
        linkedid,
        num: "79161234567",
        context: "from-trunk",
        exten: "74951234567",
    }
}

fn phone(ext: &'static str, name: &'static str, id: &'static str, linkedid: &'static str) -> Ch {
    Ch {
        name,
        id,
        linkedid,
        num: ext,
        context: "from-internal",
        exten: "s",
    }
}

/// Inbound call answered by 101: trunk `.1`, 101 `.2`.
fn answered_by_101(r: &mut Run) -> (Ch, Ch) {
    let tr = trunk("100.1", "100.1");
    let p101 = phone("101", "PJSIP/101-00000002", "100.2", "100.1");
    r.at(0).newchannel(&tr, "Ring").newchannel(&p101, "Down");
    r.dial_begin(&tr, &p101, "101").newstate(&p101, "Ringing");
    r.at(3).newstate(&p101, "Up").dial_end(&tr, &p101, "ANSWER");
    r.newstate(&tr, "Up")
        .bridge_enter(&p101, "b1")
        .bridge_enter(&tr, "b1");
    (tr, p101)
}

#[test]
fn parked_call_retrieved_by_another_phone() {
    let mut r = Run::new();
    let (tr, p101) = answered_by_101(&mut r);
    // 101 blind-transfers the client to the parking lot (700).
    r.at(10).feed(ev(
        "BlindTransfer",
        &[
            p101.fields("Transferer", "Up"),
            tr.fields("Transferee", "Up"),
        ],
        &[
            ("Result", "Success"),
            ("Extension", "700"),
            ("IsExternal", "No"),
        ],
    ));
    r.feed(ev(
        "ParkedCall",
        &[tr.fields("Parkee", "Up")],
        &[
            ("ParkingSpace", "701"),
            ("ParkingLot", "default"),
            ("ParkingTimeout", "45"),
        ],
    ));
    let parked =
        r.t.live_calls()
            .into_iter()
            .find(|c| c.id == "100.1")
            .unwrap();
    assert_eq!(parked.talking, vec!["101".to_string()]);
    r.hangup(&p101, "16");
    let conv101 = r.out.last().unwrap();
    assert_eq!(conv101.stage, Stage::ConversationEnded);
    assert!(
        conv101
            .call_full
            .conversations
            .get("100.2")
            .unwrap()
            .is_parked
    );
    // 103 dials 701: its own call first, then it joins the parked call.
    let p103 = phone("103", "PJSIP/103-00000003", "200.3", "200.3");
    r.at(20).newchannel(&p103, "Ring").newstate(&p103, "Up");
    r.feed(ev(
        "UnParkedCall",
        &[tr.fields("Parkee", "Up"), p103.fields("Retriever", "Up")],
        &[("ParkingSpace", "701")],
    ));
    r.bridge_enter(&tr, "b2")
        .bridge_enter(&p103.with_linkedid("100.1"), "b2");
    r.at(30)
        .hangup(&p103.with_linkedid("100.1"), "16")
        .hangup(&tr, "16");

    let ended = r.ended();
    assert_eq!(ended.len(), 1, "the retriever's own call leaves no trace");
    let c = ended[0];
    assert_eq!(c.id, "100.1");
    assert_eq!(c.answered_by, "103");
    assert_eq!(c.result, 200);
    let convs: Vec<_> = c
        .conversations
        .iter()
        .map(|(id, cv)| (id, cv.via.as_str()))
        .collect();
    assert_eq!(convs, vec![("100.2", "dial"), ("200.3", "parking")]);
    assert!(!c.conversations.get("200.3").unwrap().is_parked);
    assert_eq!(c.conversations.get("200.3").unwrap().talk_duration, 10);
    assert_eq!(r.t.call_count(), 0);
    assert_eq!(r.t.channel_count(), 0);
}

#[test]
fn pickup_makes_the_picker_the_one_who_answered() {
    let mut r = Run::new();
    let tr = trunk("100.1", "100.1");
    let p101 = phone("101", "PJSIP/101-00000002", "100.2", "100.1");
    r.at(0).newchannel(&tr, "Ring").newchannel(&p101, "Down");
    r.dial_begin(&tr, &p101, "101").newstate(&p101, "Ringing");
    // 103 dials *8 (its own call) and picks up the ringing 101 leg.
    let p103 = phone("103", "PJSIP/103-00000003", "200.3", "200.3");
    r.at(4).newchannel(&p103, "Ring");
    r.feed(ev(
        "Pickup",
        &[p103.fields("", "Up"), p101.fields("Target", "Ringing")],
        &[],
    ));
    // The picker's phone takes over the target channel (masquerade): same uniqueid,
    // the picker's channel name.
    let moved = Ch {
        name: "PJSIP/103-00000003",
        ..p101.clone()
    };
    r.dial_end(&tr, &moved, "ANSWER");
    r.hangup(&p103, "16");
    r.at(12).hangup(&moved, "16").hangup(&tr, "16");
    let ended = r.ended();
    let main = ended.iter().find(|c| c.id == "100.1").unwrap();
    assert_eq!(main.answered_by, "103");
    assert_eq!(main.result, 200);
    let cv = main.conversations.get("100.2").unwrap();
    assert_eq!(cv.via, "pickup");
    assert_eq!(cv.user.as_ref().unwrap().number, "103");
    assert_eq!(cv.talk_duration, 8);
    // The *8 call ends on its own, as an internal call without conversations.
    let own = ended.iter().find(|c| c.id == "200.3").unwrap();
    assert!(own.conversations.is_empty());
    assert_eq!(ended.len(), 2);
}

#[test]
fn nested_transfers_blind_then_attended_across_two_calls() {
    let mut r = Run::new();
    let (tr, p101) = answered_by_101(&mut r);
    // Blind transfer 101 -> 102: the trunk channel dials 102.
    r.at(5).feed(ev(
        "BlindTransfer",
        &[
            p101.fields("Transferer", "Up"),
            tr.fields("Transferee", "Up"),
        ],
        &[
            ("Result", "Success"),
            ("Extension", "102"),
            ("IsExternal", "Yes"),
        ],
    ));
    r.hangup(&p101, "16");
    let p102 = phone("102", "PJSIP/102-00000003", "105.3", "100.1");
    r.newchannel(&p102, "Down").dial_begin(&tr, &p102, "102");
    r.at(8).dial_end(&tr, &p102, "ANSWER");
    // 102 consults 103 on its second line: a separate call 300.4.
    let p102b = Ch {
        name: "PJSIP/102-00000004",
        ..phone("102", "", "300.4", "300.4")
    };
    let p103 = phone("103", "PJSIP/103-00000005", "300.5", "300.4");
    r.at(12)
        .newchannel(&p102b, "Ring")
        .newchannel(&p103, "Down");
    r.dial_begin(&p102b, &p103, "103");
    r.at(14).dial_end(&p102b, &p103, "ANSWER");
    // 102 completes the transfer: 103 joins the client; Asterisk gives it the older
    // Linkedid; both 102 channels hang up.
    r.at(20).feed(ev(
        "AttendedTransfer",
        &[
            p102.fields("OrigTransferer", "Up"),
            p102b.fields("SecondTransferer", "Up"),
            tr.fields("Transferee", "Up"),
            p103.fields("TransferTarget", "Up"),
        ],
        &[("Result", "Success"), ("DestType", "Bridge")],
    ));
    r.bridge_enter(&p103.with_linkedid("100.1"), "b9");
    r.hangup(&p102, "16").hangup(&p102b, "16");
    r.at(30)
        .hangup(&p103.with_linkedid("100.1"), "16")
        .hangup(&tr, "16");

    let ended = r.ended();
    let main = ended.iter().find(|c| c.id == "100.1").unwrap();
    let users: Vec<_> = main
        .conversations
        .iter()
        .map(|(_, cv)| cv.user.as_ref().unwrap().number.as_str())
        .collect();
    assert_eq!(users, vec!["101", "102", "103"]);
    assert_eq!(main.answered_by, "103");
    assert_eq!(main.conversations.get("105.3").unwrap().via, "transfer");
    // The talking conversation joined the call: requested and accepted there too.
    let stages = r.stages_of("100.1");
    assert!(stages.contains(&(Stage::ConversationRequested, "300.5".into())));
    assert!(stages.contains(&(Stage::ConversationAccepted, "300.5".into())));
    assert_eq!(stages.last().unwrap().0, Stage::CallEnded);
    // The consultation call ended with its conversation handed over.
    let consult = ended.iter().find(|c| c.id == "300.4").unwrap();
    assert_eq!(consult.direction.as_str(), "internal");
    assert_eq!(consult.merged_into, "");
    assert_eq!(ended.len(), 2);
    for call in ["100.1", "300.4"] {
        let n = r
            .stages_of(call)
            .iter()
            .filter(|s| s.0 == Stage::CallEnded)
            .count();
        assert_eq!(n, 1, "{call}");
    }
    assert_eq!(r.t.channel_count(), 0);
}

fn fixture(name: &str) -> Vec<Message> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/ami/{name}.ami"));
    parse_messages(&std::fs::read(p).unwrap())
}

#[test]
fn resync_rebuilds_a_live_call_from_core_show_channels() {
    // Connected in the middle of scenario 14's call: only CoreShowChannel tells us.
    let msgs = fixture("14-ami-protocol");
    let mut t = Tracker::new(&CallsConfig::default()).unwrap();
    let now = t0();
    t.begin_resync();
    let mut idx = 0;
    for (i, m) in msgs.iter().enumerate() {
        if m.is_event("CoreShowChannel") {
            t.resync_channel(m, now);
        }
        if m.is_event("CoreShowChannelsComplete") && m.get("ListItems") == Some("2") {
            idx = i;
            break;
        }
    }
    let ev = t.end_resync(now);
    let stages: Vec<_> = ev.iter().map(|e| e.stage).collect();
    assert_eq!(
        stages,
        vec![Stage::ConversationRequested, Stage::ConversationAccepted]
    );
    let c = &ev[1].call_full;
    assert_eq!(c.id, "1795305032.32");
    assert_eq!(c.client_phone, "79161234567");
    assert_eq!(c.line_number, "74951234567");
    assert_eq!(c.answered_by, "101");
    assert_eq!(c.conversations.get("1795305032.33").unwrap().via, "resync");
    // The call started before we connected: CoreShowChannel's Duration says when.
    assert_eq!(c.channel.start_time, "2026-11-21 22:59:58");
    // The rest of the stream ends it normally.
    let mut out = Vec::new();
    for m in &msgs[idx..] {
        t.handle_into(m, now + Duration::seconds(5), &mut out);
    }
    let ended: Vec<_> = out.iter().filter(|e| e.stage == Stage::CallEnded).collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].call_full.result, 200);
    assert_eq!(t.call_count(), 0);
}

#[test]
fn calls_that_vanished_while_disconnected_end_with_what_is_known() {
    // Scenario 01 up to the answer, then the AMI link drops; after the reconnect
    // CoreShowChannels lists nothing.
    let msgs = fixture("01-inbound-answered-recorded");
    let cut = msgs.iter().position(|m| m.is_event("DialEnd")).unwrap();
    let mut t = Tracker::new(&CallsConfig::default()).unwrap();
    let mut out = Vec::new();
    for m in &msgs[..=cut] {
        t.handle_into(m, t0(), &mut out);
    }
    assert_eq!(t.live_calls().len(), 1);
    t.begin_resync();
    let ev = t.end_resync(t0() + Duration::seconds(60));
    let stages: Vec<_> = ev.iter().map(|e| e.stage).collect();
    assert_eq!(stages, vec![Stage::ConversationEnded, Stage::CallEnded]);
    let c = &ev[1].call_full;
    assert_eq!(c.answered_by, "101");
    assert_eq!(c.result, 200);
    assert_eq!(c.duration, 60);
    assert!(c.record.ends_with("1795304861.0.wav"));
    assert_eq!(t.call_count(), 0);
    // Late events of the vanished call do not resurrect it.
    for m in &msgs[cut + 1..] {
        t.handle_into(m, t0() + Duration::seconds(61), &mut out);
    }
    assert_eq!(t.call_count(), 0);
    assert!(out.iter().all(|e| e.stage != Stage::CallEnded));
}

#[test]
fn idle_calls_are_reaped_after_the_configured_time() {
    let cfg = CallsConfig {
        reap_after: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let mut t = Tracker::new(&cfg).unwrap();
    let mut r = Run::new();
    std::mem::swap(&mut r.t, &mut t);
    let tr = trunk("100.1", "100.1");
    let p101 = phone("101", "PJSIP/101-00000002", "100.2", "100.1");
    r.at(0).newchannel(&tr, "Ring").newchannel(&p101, "Down");
    r.dial_begin(&tr, &p101, "101");
    assert!(r.t.reap(t0() + Duration::seconds(3000)).is_empty());
    let ev = r.t.reap(t0() + Duration::seconds(3700));
    let stages: Vec<_> = ev.iter().map(|e| e.stage).collect();
    assert_eq!(stages, vec![Stage::ConversationEnded, Stage::CallEnded]);
    assert_eq!(ev[1].call_full.result, 487);
    assert_eq!(r.t.call_count(), 0);
    assert_eq!(r.t.channel_count(), 0);
}

#[test]
fn orphan_noanswer_never_overwrites_an_answered_call() {
    let mut r = Run::new();
    let tr = trunk("100.1", "100.1");
    let p101 = phone("101", "PJSIP/101-00000002", "100.2", "100.1");
    let p102 = phone("102", "PJSIP/102-00000003", "100.3", "100.1");
    r.at(0)
        .newchannel(&tr, "Ring")
        .newchannel(&p101, "Down")
        .newchannel(&p102, "Down");
    r.dial_begin(&tr, &p101, "101")
        .dial_begin(&tr, &p102, "102");
    r.at(2).dial_end(&tr, &p101, "ANSWER");
    // A late, duplicated NOANSWER for the other leg, after the answer.
    r.at(3)
        .dial_end(&tr, &p102, "NOANSWER")
        .dial_end(&tr, &p102, "NOANSWER");
    r.hangup(&p102, "0");
    r.at(9).hangup(&p101, "16").hangup(&tr, "16");
    let c = r.ended()[0];
    assert_eq!(c.result, 200);
    assert_eq!(c.answered_by, "101");
    assert_eq!(c.conversations.get("100.3").unwrap().result, 480);
    let n = r
        .stages_of("100.1")
        .iter()
        .filter(|s| s.1 == "100.3")
        .count();
    assert_eq!(
        n, 2,
        "requested + ended once, despite the duplicate DialEnd"
    );
}

#[test]
fn congestion_and_unavailable_give_sip_like_results() {
    for (status, cause, want) in [
        ("CONGESTION", "34", 503),
        ("CHANUNAVAIL", "1", 404),
        ("CHANUNAVAIL", "20", 480),
    ] {
        let mut r = Run::new();
        let p101 = phone("101", "PJSIP/101-00000001", "100.1", "100.1");
        let tr = Ch {
            name: "PJSIP/trunk-00000002",
            id: "100.2",
            linkedid: "100.1",
            num: "",
            context: "from-trunk",
            exten: "s",
        };
        r.at(0).newchannel(&p101, "Ring").newchannel(&tr, "Down");
        r.dial_begin(&p101, &tr, "79161234567@trunk");
        r.hangup(&tr, cause);
        r.dial_end(&p101, &tr, status);
        r.at(1).hangup(&p101, "16");
        let c = r.ended()[0];
        assert_eq!(c.direction.as_str(), "outbound");
        assert_eq!(c.client_phone, "79161234567");
        assert_eq!(c.result, want, "{status} {cause}");
    }
}

#[test]
fn times_follow_the_configured_offset() {
    let cfg = CallsConfig {
        time_offset: "+03:00".into(),
        ..Default::default()
    };
    let mut r = Run::new();
    r.t = Tracker::new(&cfg).unwrap();
    answered_by_101(&mut r);
    let last = &r.out.last().unwrap().call_full;
    assert_eq!(last.channel.start_time, "2026-11-22 02:00:00");
    assert_eq!(
        last.conversations.get("100.2").unwrap().channel.answer_time,
        "2026-11-22 02:00:03"
    );
    assert_eq!(last.channel.end_time, kolokol::calls::UNSET_TIME);
    assert_eq!(last.active_conversation_id, "100.2");
}

#[test]
fn a_queue_ringing_agents_for_hours_keeps_bounded_conversations() {
    let mut r = Run::new();
    let tr = trunk("100.1", "100.1");
    r.at(0).newchannel(&tr, "Up");
    r.feed(ev(
        "QueueCallerJoin",
        &[tr.fields("", "Up")],
        &[("Queue", "sales")],
    ));
    let ids: Vec<&'static str> = (0..250)
        .map(|i| &*Box::leak(format!("100.{}", i + 2).into_boxed_str()))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let agent = phone("101", "PJSIP/101-00000002", id, "100.1");
        r.at(i as i64 * 15).newchannel(&agent, "Down");
        r.dial_begin(&tr, &agent, "PJSIP/101");
        r.at(i as i64 * 15 + 14).dial_end(&tr, &agent, "NOANSWER");
        r.hangup(&agent, "0");
    }
    r.feed(ev(
        "QueueCallerAbandon",
        &[tr.fields("", "Up")],
        &[("Queue", "sales")],
    ));
    r.hangup(&tr, "16");
    let c = r.ended()[0];
    assert_eq!(
        c.conversations.len(),
        kolokol::calls::tracker::MAX_CONVERSATIONS
    );
    assert_eq!(c.result, 487, "abandoned in the queue");
    assert_eq!(c.queue, "sales");
    assert_eq!(r.t.channel_count(), 0);
}

#[test]
fn stragglers_after_the_end_do_not_restart_a_call() {
    let mut r = Run::new();
    let (tr, p101) = answered_by_101(&mut r);
    r.at(9).hangup(&p101, "16").hangup(&tr, "16");
    assert_eq!(r.ended().len(), 1);
    // A late snapshot of a channel never seen before, carrying the ended Linkedid.
    let late = phone("102", "PJSIP/102-00000009", "100.9", "100.1");
    r.at(10).newstate(&late, "Up").hangup(&late, "16");
    assert_eq!(r.ended().len(), 1, "exactly one call_ended per call");
    assert_eq!(r.t.call_count(), 0);
}
