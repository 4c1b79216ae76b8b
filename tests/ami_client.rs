//! The AMI client against the fake Asterisk on real loopback TCP: logins, actions,
//! list collection, keepalive, reconnects, garbage.

use std::time::Duration;

use kolokol::ami::codec::parse_messages;
use kolokol::ami::{
    AmiAuth, AmiClient, AmiConfig, AmiError, AmiEvent, AmiHandle, LinkState, Message,
};
use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions, Replay};
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ami");
/// Generous limit for anything that should happen "soon" (CI machines are slow);
/// tests never assert on speed.
const SOON: Duration = Duration::from_secs(10);

fn config(fake: &FakeAmi) -> AmiConfig {
    AmiConfig {
        host: "127.0.0.1".into(),
        port: fake.local_addr().port(),
        username: "crm".into(),
        secret: "crm-secret-123".into(),
        ping_interval: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        action_timeout: Duration::from_secs(5),
        ..AmiConfig::default()
    }
}

async fn next(rx: &mut Receiver<AmiEvent>) -> AmiEvent {
    timeout(SOON, rx.recv())
        .await
        .expect("an event in time")
        .expect("channel open")
}

/// Next event that is a message (skips link signals), failing on a Disconnected.
async fn next_message(rx: &mut Receiver<AmiEvent>) -> Message {
    loop {
        match next(rx).await {
            AmiEvent::Message(m) => return m,
            AmiEvent::Disconnected { reason } => panic!("unexpected disconnect: {reason}"),
            _ => {}
        }
    }
}

async fn connected(rx: &mut Receiver<AmiEvent>) {
    match next(rx).await {
        AmiEvent::Connected { banner } => assert_eq!(banner, "Asterisk Call Manager/13.0.0"),
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn action(pairs: &[(&str, &str)]) -> Message {
    Message::from_pairs(pairs)
}

#[tokio::test]
async fn plain_login_then_every_event_of_a_call_in_order() {
    let replay = Replay::from_fixture(format!("{FIX}/01-inbound-answered-recorded.ami"))
        .expect("fixture")
        .timed(false);
    let expected = parse_messages(replay.bytes());
    // 98 recorded events minus FullyBooted (the server sends its own per login).
    assert_eq!(expected.len(), 97);
    let fake = FakeAmi::start(FakeAmiOptions {
        on_login: Some(replay),
        ..FakeAmiOptions::default()
    })
    .await
    .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(config(&fake));
    connected(&mut rx).await;
    let booted = next_message(&mut rx).await;
    assert!(booted.is_event("FullyBooted"));
    for want in &expected {
        let got = next_message(&mut rx).await;
        assert_eq!(&got, want);
    }
    // The login went out as recorded (fixture 01's .sent, ActionID aside).
    let login = &fake.actions()[0];
    let fields: Vec<(&str, &str)> = login.fields().collect();
    assert_eq!(fields[0], ("Action", "Login"));
    assert_eq!(
        fields[2..],
        [("Username", "crm"), ("Secret", "crm-secret-123")]
    );
    assert!(matches!(ami.state(), LinkState::Up { .. }));
    ami.shutdown().await;
    assert_eq!(ami.state(), LinkState::Stopped);
    // Logoff was sent and the channel closes after the last event.
    assert!(
        fake.actions()
            .iter()
            .any(|m| m.get("Action") == Some("Logoff"))
    );
    while let Some(ev) = timeout(SOON, rx.recv()).await.expect("channel closes") {
        assert!(!matches!(ev, AmiEvent::Message(_)), "{ev:?}");
    }
}

#[tokio::test]
async fn md5_login_uses_the_challenge() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(AmiConfig {
        auth: AmiAuth::Md5,
        ..config(&fake)
    });
    connected(&mut rx).await;
    let actions = fake.actions();
    assert_eq!(actions[0].get("Action"), Some("Challenge"));
    assert_eq!(actions[0].get("AuthType"), Some("MD5"));
    // Same key as recorded in 14c (challenge 205788030, secret crm-secret-123).
    assert_eq!(actions[1].get("Action"), Some("Login"));
    assert_eq!(actions[1].get("AuthType"), Some("MD5"));
    assert_eq!(
        actions[1].get("Key"),
        Some("ee02db17164e6c94d290bf6d5fc96959")
    );
    assert_eq!(actions[1].get("Secret"), None);
    let pong = ami
        .action(action(&[("Action", "Ping")]))
        .await
        .expect("ping");
    assert!(pong.is_success());
    assert_eq!(pong.response.get("Ping"), Some("Pong"));
    ami.shutdown().await;
}

#[tokio::test]
async fn refused_login_names_the_user_and_backs_off() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(AmiConfig {
        secret: "wrong-password".into(),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(400),
        ..config(&fake)
    });
    let err = ami.wait_connected().await.expect_err("login must fail");
    match &err {
        AmiError::LoginRefused { user, message, .. } => {
            assert_eq!(user, "crm");
            assert_eq!(message, "Authentication failed");
        }
        other => panic!("expected LoginRefused, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("'crm'") && text.contains("manager.conf"),
        "{text}"
    );
    match next(&mut rx).await {
        AmiEvent::Disconnected { reason } => assert!(reason.contains("refused"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Actions fail fast while down.
    let r = ami.action(action(&[("Action", "Ping")])).await;
    assert!(matches!(r, Err(AmiError::NotConnected { .. })), "{r:?}");
    // Backoff, not a hot loop: with delays of >= 50, 100, 200, 200 ms, 700 ms allow
    // at most a handful of attempts (a hot loop would make thousands).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let attempts = fake.connections();
    assert!((2..=8).contains(&attempts), "{attempts} attempts");
    ami.shutdown().await;
}

#[tokio::test]
async fn actions_get_their_own_responses_and_lists_are_collected() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(config(&fake));
    connected(&mut rx).await;
    let bytes = std::fs::read(format!("{FIX}/01-inbound-answered-recorded.ami")).expect("fixture");
    let replay = Replay::from_ami_bytes(&bytes, None);
    let msgs = parse_messages(replay.bytes());
    // Everything up to (not including) the first Hangup: both legs are live.
    let cut = msgs
        .iter()
        .position(|m| m.is_event("Hangup"))
        .expect("a Hangup");
    let mut partial = Vec::new();
    for m in &msgs[..cut] {
        partial.extend_from_slice(&m.to_wire());
    }
    fake.push_bytes(partial);
    for _ in 0..cut + 1 {
        next_message(&mut rx).await; // FullyBooted + the pushed events
    }
    // Several actions in flight at once, answered in any order of arrival.
    let (list, version, bad) = tokio::join!(
        ami.action(action(&[("Action", "CoreShowChannels")])),
        ami.action(action(&[
            ("Action", "Command"),
            ("Command", "core show version")
        ])),
        ami.action(action(&[("Action", "NoSuchAction")])),
    );
    let list = list.expect("list");
    assert!(list.is_success());
    assert_eq!(list.events.len(), 2);
    assert!(list.events.iter().all(|e| e.is_event("CoreShowChannel")));
    let complete = list.complete.expect("complete event");
    assert_eq!(complete.get("ListItems"), Some("2"));
    assert_eq!(complete.action_id(), Some(list.action_id.as_str()));
    let linked: Vec<_> = list
        .events
        .iter()
        .map(|e| e.get("Linkedid").unwrap_or(""))
        .collect();
    assert_eq!(linked, ["1795304861.0", "1795304861.0"]);
    let version = version.expect("command");
    assert!(
        version
            .response
            .get("Output")
            .is_some_and(|o| o.starts_with("Asterisk GIT-master-f0c1c1a7b7"))
    );
    let bad = bad.expect("response");
    assert!(!bad.is_success());
    assert!(
        bad.message()
            .is_some_and(|m| m.starts_with("Invalid/unknown command"))
    );
    // The list items did not leak into the event stream; the security event did.
    let ev = next_message(&mut rx).await;
    assert!(ev.is_event("RequestBadFormat"), "{ev:?}");
    // A caller-chosen ActionID is kept (the OriginateResponse event carries it).
    let orig = ami
        .action(action(&[
            ("Action", "Originate"),
            ("ActionID", "crm-originate-1"),
            ("Channel", "PJSIP/101"),
            ("Context", "from-internal"),
            ("Exten", "79161234567"),
            ("Priority", "1"),
            ("Async", "true"),
        ]))
        .await
        .expect("originate");
    assert_eq!(orig.action_id, "crm-originate-1");
    assert_eq!(orig.message(), Some("Originate successfully queued"));
    let ev = next_message(&mut rx).await;
    assert!(ev.is_event("OriginateResponse"));
    assert_eq!(ev.action_id(), Some("crm-originate-1"));
    assert_eq!(ev.response(), Some("Success"));
    // Line breaks in values never reach the wire.
    let r = ami
        .action(action(&[
            ("Action", "Originate"),
            ("Exten", "1\r\nAction: Logoff"),
        ]))
        .await;
    assert!(matches!(r, Err(AmiError::InvalidAction(_))));
    ami.shutdown().await;
}

#[tokio::test]
async fn read_only_user_still_gets_events_but_actions_are_denied() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(AmiConfig {
        username: "crm-ro".into(),
        secret: "ro-secret-456".into(),
        ..config(&fake)
    });
    connected(&mut rx).await;
    let pong = ami
        .action(action(&[("Action", "Ping")]))
        .await
        .expect("ping");
    assert!(pong.is_success());
    let r = ami
        .action(action(&[("Action", "Originate"), ("Channel", "PJSIP/101")]))
        .await
        .expect("answered");
    assert!(!r.is_success());
    assert_eq!(r.message(), Some("Permission denied"));
    let list = ami
        .action(action(&[("Action", "CoreShowChannels")]))
        .await
        .expect("answered");
    assert_eq!(list.message(), Some("Permission denied"));
    assert!(list.events.is_empty());
    fake.push_bytes(&b"Event: Newchannel\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n\r\n"[..]);
    loop {
        let m = next_message(&mut rx).await;
        if m.is_event("Newchannel") {
            break;
        }
    }
    ami.shutdown().await;
}

async fn expect_disconnect_then_reconnect(rx: &mut Receiver<AmiEvent>) {
    loop {
        match next(rx).await {
            AmiEvent::Disconnected { .. } => break,
            AmiEvent::Message(_) => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    loop {
        match next(rx).await {
            AmiEvent::Reconnected => break,
            AmiEvent::Disconnected { .. } => {}
            other => panic!("expected Reconnected, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn server_drops_mid_message_client_reconnects_and_keeps_going() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(config(&fake));
    connected(&mut rx).await;
    assert!(next_message(&mut rx).await.is_event("FullyBooted"));
    fake.push_bytes(&b"Event: Before\r\n\r\nEvent: Half\r\nUniqueid: 17953"[..]);
    assert!(next_message(&mut rx).await.is_event("Before"));
    fake.drop_connections();
    expect_disconnect_then_reconnect(&mut rx).await;
    assert!(fake.wait_logged_in(1, SOON).await);
    let m = next_message(&mut rx).await;
    assert!(
        m.is_event("FullyBooted"),
        "the half message must not surface: {m:?}"
    );
    fake.push_bytes(&b"Event: After\r\n\r\n"[..]);
    assert!(next_message(&mut rx).await.is_event("After"));
    assert_eq!(ami.stats().reconnects, 1);
    // And again: every drop is survived.
    fake.drop_connections();
    expect_disconnect_then_reconnect(&mut rx).await;
    assert!(fake.wait_logged_in(1, SOON).await);
    let pong = ami
        .action(action(&[("Action", "Ping")]))
        .await
        .expect("ping after reconnect");
    assert!(pong.is_success());
    ami.shutdown().await;
}

#[tokio::test]
async fn dead_link_is_noticed_by_keepalive_and_recovered() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let ping = Duration::from_millis(150);
    let (ami, mut rx) = AmiClient::spawn(AmiConfig {
        ping_interval: ping,
        ..config(&fake)
    });
    connected(&mut rx).await;
    // Keepalives flow while the link is healthy: no disconnect over several intervals.
    tokio::time::sleep(ping * 4).await;
    assert!(matches!(ami.state(), LinkState::Up { .. }));
    assert!(
        fake.actions()
            .iter()
            .filter(|m| m.get("Action") == Some("Ping"))
            .count()
            >= 2
    );
    // The server goes silent with the TCP connection open.
    fake.freeze(true);
    let reason = loop {
        match next(&mut rx).await {
            AmiEvent::Disconnected { reason } => break reason,
            AmiEvent::Message(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(reason.contains("keeping the link alive"), "{reason}");
    fake.freeze(false);
    loop {
        match next(&mut rx).await {
            AmiEvent::Reconnected => break,
            AmiEvent::Disconnected { .. } | AmiEvent::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(ami.state(), LinkState::Up { .. }));
    ami.shutdown().await;
}

#[tokio::test]
async fn garbage_and_oversize_frames_are_skipped_and_the_stream_continues() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(config(&fake));
    connected(&mut rx).await;
    assert!(next_message(&mut rx).await.is_event("FullyBooted"));
    let mut junk = Vec::new();
    junk.extend_from_slice(b"Event: One\r\n\r\n");
    // A line over 8 KiB.
    junk.extend_from_slice(b"Event: LongLine\r\nX: ");
    junk.extend(std::iter::repeat_n(b'a', 20_000));
    junk.extend_from_slice(b"\r\n\r\n");
    // A message over 64 KiB made of short lines.
    junk.extend_from_slice(b"Event: Huge\r\n");
    for i in 0..5000 {
        junk.extend_from_slice(format!("Variable: v{i}=xxxxxxxxxx\r\n").as_bytes());
    }
    junk.extend_from_slice(b"\r\n");
    // Not UTF-8, binary noise, stray blank lines.
    junk.extend_from_slice(b"Event: Bin\r\nX: \xff\xfe\x00\x01\r\n\r\n\r\n\n\r\n");
    junk.extend_from_slice(b"no colon at all\r\n\r\n");
    junk.extend_from_slice(b"Event: Two\r\nValue: a: b: c\r\n\r\n");
    fake.push_bytes(junk);
    assert!(next_message(&mut rx).await.is_event("One"));
    let m = next_message(&mut rx).await;
    // A colon-less line reads back as Output (old command output form).
    assert_eq!(m.get("Output"), Some("no colon at all"));
    let two = next_message(&mut rx).await;
    assert!(two.is_event("Two"));
    assert_eq!(two.get("Value"), Some("a: b: c"));
    assert_eq!(ami.stats().malformed, 3);
    // A huge unterminated blob does not grow memory or kill the link.
    fake.push_bytes(vec![b'z'; 300_000]);
    fake.push_bytes(&b"\r\n\r\nEvent: Three\r\n\r\n"[..]);
    assert!(next_message(&mut rx).await.is_event("Three"));
    assert_eq!(ami.stats().malformed, 4);
    assert!(matches!(ami.state(), LinkState::Up { .. }));
    ami.shutdown().await;
}

#[tokio::test]
async fn unreachable_pbx_is_reported_and_retried() {
    // Bind then drop a listener: the port is (almost certainly) closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (ami, mut rx) = AmiClient::spawn(AmiConfig {
        host: "127.0.0.1".into(),
        port,
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
        ..AmiConfig::default()
    });
    let err = ami.wait_connected().await.expect_err("nothing listens");
    assert!(matches!(err, AmiError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")));
    assert!(matches!(next(&mut rx).await, AmiEvent::Disconnected { .. }));
    ami.shutdown().await;
    assert_eq!(ami.state(), LinkState::Stopped);
}

#[tokio::test]
async fn events_and_filters_from_config_are_sent_after_login() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(AmiConfig {
        events: Some("call,cdr,agent".into()),
        filters: vec!["!Event: RTCP*".into(), "!Event: VarSet".into()],
        ..config(&fake)
    });
    connected(&mut rx).await;
    let names: Vec<String> = fake
        .actions()
        .iter()
        .map(|m| m.get("Action").unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["Login", "Filter", "Filter", "Events"]);
    let acts = fake.actions();
    assert_eq!(acts[1].get("Operation"), Some("Add"));
    assert_eq!(acts[1].get("Filter"), Some("!Event: RTCP*"));
    assert_eq!(acts[3].get("EventMask"), Some("call,cdr,agent"));
    ami.shutdown().await;
}

/// A consumer that stops reading does not lose events: the client applies
/// back-pressure and everything arrives, in order, once it reads again.
#[tokio::test]
async fn slow_consumer_loses_nothing() {
    let replay = Replay::from_fixture(format!("{FIX}/15-burst-20-concurrent.ami"))
        .expect("fixture")
        .timed(false);
    let expected = parse_messages(replay.bytes());
    let fake = FakeAmi::start(FakeAmiOptions {
        on_login: Some(replay),
        ..FakeAmiOptions::default()
    })
    .await
    .expect("fake AMI");
    let (ami, mut rx): (AmiHandle, _) = AmiClient::spawn(AmiConfig {
        queue_capacity: 16,
        ..config(&fake)
    });
    connected(&mut rx).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(next_message(&mut rx).await.is_event("FullyBooted"));
    for want in &expected {
        assert_eq!(&next_message(&mut rx).await, want);
    }
    ami.shutdown().await;
}

/// The recorded socket chunking (chunk borders inside messages) and pauses, sped up,
/// through the real client: the same events, in order.
#[tokio::test]
async fn recorded_chunking_and_timing_reach_the_consumer_intact() {
    let replay = Replay::from_fixture(format!("{FIX}/14d-readonly-user.ami"))
        .expect("fixture")
        .timed(true)
        .speed(20.0);
    assert!(replay.duration() > Duration::ZERO);
    let expected = parse_messages(replay.bytes());
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let (ami, mut rx) = AmiClient::spawn(config(&fake));
    connected(&mut rx).await;
    assert!(next_message(&mut rx).await.is_event("FullyBooted"));
    let player = fake.clone();
    let play = tokio::spawn(async move { player.play(&replay).await });
    for want in &expected {
        assert_eq!(&next_message(&mut rx).await, want);
    }
    play.await.expect("play");
    assert_eq!(ami.stats().malformed, 0);
    ami.shutdown().await;
}
