//! A daemon restart (or an AMI reconnect) in the middle of a call: a fresh tracker
//! rebuilds the call from `CoreShowChannels` and must register it exactly as if it
//! had watched the whole call: same direction, client, line and employee.
//!
//! Each recording is cut after every event while its call is up. The new tracker
//! starts its resync, may first see a few live events (the daemon begins the resync
//! as soon as it is logged in, before the `CoreShowChannels` answer), gets the list
//! the fake AMI server derives from the events so far
//! ([`core_show_channels_after`], the same fields Asterisk sends), then the rest of
//! the recording.

use std::path::PathBuf;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kolokol::ami::Message;
use kolokol::ami::codec::parse_messages;
use kolokol::calls::{CallFull, CallsConfig, Direction, Stage, StageEvent, Tracker};
use kolokol::sandbox::ami_server::core_show_channels_after;

fn at(i: usize) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 23, 0, 0).unwrap() + Duration::milliseconds(100 * i as i64)
}

/// The unsolicited events of a recording (what a live daemon receives).
fn events(name: &str) -> Vec<Message> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/ami/{name}.ami"));
    parse_messages(&std::fs::read(p).unwrap())
        .into_iter()
        .filter(|m| m.event().is_some() && m.action_id().is_none())
        .collect()
}

fn ended(out: &[StageEvent]) -> Vec<&CallFull> {
    out.iter()
        .filter(|e| e.stage == Stage::CallEnded)
        .map(|e| &e.call_full)
        .collect()
}

/// The one call of the recording, watched from start to end.
fn baseline(msgs: &[Message]) -> CallFull {
    let mut t = Tracker::new(&CallsConfig::default()).unwrap();
    let mut out = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        t.handle_into(m, at(i), &mut out);
    }
    let calls = ended(&out);
    assert_eq!(calls.len(), 1, "the recording has one call");
    calls[0].clone()
}

/// A new tracker that starts after `msgs[..cut]`, sees `live` events before the
/// `CoreShowChannels` answer, then the rest. Returns what it emitted.
fn restarted(msgs: &[Message], cut: usize, live: usize) -> Vec<StageEvent> {
    let answer_at = cut + live;
    let mut wire = Vec::new();
    for m in &msgs[..answer_at] {
        wire.extend_from_slice(&m.to_wire());
    }
    let list = core_show_channels_after(&wire);
    assert!(
        list.last()
            .is_some_and(|m| m.is_event("CoreShowChannelsComplete")),
        "the list ends with CoreShowChannelsComplete"
    );
    let mut t = Tracker::new(&CallsConfig::default()).unwrap();
    let mut out = Vec::new();
    t.begin_resync();
    for (i, m) in msgs.iter().enumerate().take(answer_at).skip(cut) {
        t.handle_into(m, at(i), &mut out);
    }
    // Through `handle`, as the daemon does: it routes the list to the resync.
    for m in &list {
        t.handle_into(m, at(answer_at), &mut out);
    }
    for (i, m) in msgs.iter().enumerate().skip(answer_at) {
        t.handle_into(m, at(i), &mut out);
    }
    assert_eq!(t.call_count(), 0, "nothing left behind");
    out
}

/// Cut points from the call's first channel until its two last channels hang up.
/// (Between those two hangups only one leg is left to list: who was on the other
/// end is gone with it; `one_leg_left_*` covers what can still be told then.)
fn cut_range(msgs: &[Message]) -> std::ops::Range<usize> {
    let first = msgs.iter().position(|m| m.is_event("Newchannel")).unwrap();
    let hangups: Vec<usize> = msgs
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_event("Hangup"))
        .map(|(i, _)| i)
        .collect();
    first + 1..hangups[hangups.len() - 2] + 1
}

fn check(name: &str, direction: Direction) {
    let msgs = events(name);
    let want = baseline(&msgs);
    assert_eq!(want.direction, direction, "{name}: baseline direction");
    let range = cut_range(&msgs);
    let mut checked = 0;
    for live in [0usize, 1, 3, 8] {
        for cut in range.clone() {
            if cut + live >= range.end {
                continue;
            }
            let out = restarted(&msgs, cut, live);
            let calls = ended(&out);
            let ctx = format!(
                "{name}: cut after event {cut} ({:?}), {live} live event(s) first",
                msgs[cut - 1].event()
            );
            assert_eq!(calls.len(), 1, "{ctx}: exactly one call_ended");
            let got = calls[0];
            assert_eq!(got.id, want.id, "{ctx}: call id");
            assert_eq!(got.direction, want.direction, "{ctx}: direction");
            assert_eq!(got.client_phone, want.client_phone, "{ctx}: client_phone");
            assert_eq!(got.line_number, want.line_number, "{ctx}: line_number");
            assert_eq!(got.answered_by, want.answered_by, "{ctx}: answered_by");
            // Every snapshot of the rebuilt call already names the client.
            for e in &out {
                assert_eq!(
                    e.call_full.client_phone, want.client_phone,
                    "{ctx}: client_phone of {:?}",
                    e.stage
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "{name}: {checked} cut points");
}

#[test]
fn outbound_answered_survives_a_restart_at_any_point() {
    check("08-outbound-101-answered", Direction::Outbound);
    let want = baseline(&events("08-outbound-101-answered"));
    assert_eq!(want.client_phone, "79161234567");
    assert_eq!(want.answered_by, "101");
}

#[test]
fn outbound_noanswer_survives_a_restart_at_any_point() {
    check("09-outbound-101-noanswer", Direction::Outbound);
    let want = baseline(&events("09-outbound-101-noanswer"));
    assert_eq!(want.client_phone, "79161234567");
}

#[test]
fn inbound_answered_survives_a_restart_at_any_point() {
    check("01-inbound-answered-recorded", Direction::Inbound);
}

#[test]
fn inbound_ringgroup_survives_a_restart_at_any_point() {
    check("04-inbound-ringgroup-102-answers", Direction::Inbound);
}

#[test]
fn inbound_queue_survives_a_restart_at_any_point() {
    check("05-inbound-queue-101-answers", Direction::Inbound);
}

#[test]
fn reconnect_after_a_missed_dial_keeps_the_outbound_client() {
    // The link drops after the employee's channel appeared and comes back while
    // the trunk leg rings: the same tracker learns of that leg only from the list.
    let msgs = events("08-outbound-101-answered");
    let dial = msgs.iter().position(|m| m.is_event("DialBegin")).unwrap();
    let ringing = msgs
        .iter()
        .enumerate()
        .skip(dial)
        .find(|(_, m)| m.is_event("Newstate") && m.get("ChannelStateDesc") == Some("Ringing"))
        .map(|(i, _)| i)
        .unwrap();
    let mut t = Tracker::new(&CallsConfig::default()).unwrap();
    let mut out = Vec::new();
    for (i, m) in msgs.iter().enumerate().take(dial - 1) {
        t.handle_into(m, at(i), &mut out);
    }
    let mut wire = Vec::new();
    for m in &msgs[..=ringing] {
        wire.extend_from_slice(&m.to_wire());
    }
    t.begin_resync();
    for m in core_show_channels_after(&wire) {
        t.handle_into(&m, at(ringing), &mut out);
    }
    for (i, m) in msgs.iter().enumerate().skip(ringing + 1) {
        t.handle_into(m, at(i), &mut out);
    }
    let calls = ended(&out);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].direction, Direction::Outbound);
    assert_eq!(calls[0].client_phone, "79161234567");
    assert_eq!(calls[0].line_number, "74951234567");
    assert_eq!(calls[0].answered_by, "101");
    assert_eq!(calls[0].result, 200);
}

#[test]
fn one_leg_left_of_an_outbound_call_is_still_outbound() {
    // Restarted between the trunk leg's hangup and the employee's: only the
    // employee's channel, dialing the client's number, is listed.
    let msgs = events("09-outbound-101-noanswer");
    let hangups: Vec<usize> = msgs
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_event("Hangup"))
        .map(|(i, _)| i)
        .collect();
    let cut = hangups[hangups.len() - 2] + 1;
    let out = restarted(&msgs, cut, 0);
    let calls = ended(&out);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].direction, Direction::Outbound);
    assert_eq!(calls[0].client_phone, "79161234567");
    assert_eq!(calls[0].line_number, "74951234567");
    assert_eq!(calls[0].answered_by, "");
}

#[test]
fn one_leg_left_of_an_inbound_call_is_not_taken_for_outbound() {
    // Restarted after the client hung up, before the employee's leg did: that leg
    // is not the call's own channel, so it says nothing about direction.
    let msgs = events("01-inbound-answered-recorded");
    let hangups: Vec<usize> = msgs
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_event("Hangup"))
        .map(|(i, _)| i)
        .collect();
    let cut = hangups[hangups.len() - 2] + 1;
    let out = restarted(&msgs, cut, 0);
    for e in &out {
        assert_ne!(e.call_full.direction, Direction::Outbound, "{:?}", e.stage);
    }
}
