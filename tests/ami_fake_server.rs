//! The fake Asterisk answers the recorded actions (fixtures 14, 14b, 14c, 14d) with
//! the recorded bytes, over a raw TCP socket.

use std::time::Duration;

use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions, Replay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ami");
const SOON: Duration = Duration::from_secs(10);

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIX}/{name}")).expect("fixture")
}

/// Blocks (without the closing empty line) of a CRLF stream after the banner.
fn blocks(bytes: &[u8]) -> Vec<Vec<u8>> {
    let body = match bytes.starts_with(b"Asterisk Call Manager") {
        true => &bytes[bytes.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1)..],
        false => bytes,
    };
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(p) = memchr::memmem::find(rest, b"\r\n\r\n") {
        out.push(rest[..p + 2].to_vec());
        rest = &rest[p + 4..];
    }
    out
}

fn action_id(block: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    text.lines()
        .find_map(|l| l.strip_prefix("ActionID: ").map(str::to_string))
}

fn without_line(block: &[u8], key: &str) -> String {
    String::from_utf8_lossy(block)
        .lines()
        .filter(|l| !l.starts_with(key))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(fake: &FakeAmi) -> Raw {
        let s = TcpStream::connect(fake.local_addr())
            .await
            .expect("connect");
        Raw { s, buf: Vec::new() }
    }

    async fn banner(&mut self) -> Vec<u8> {
        while !self.buf.contains(&b'\n') {
            self.fill().await;
        }
        let p = self.buf.iter().position(|b| *b == b'\n').unwrap_or(0);
        self.buf.drain(..=p).collect()
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = timeout(SOON, self.s.read(&mut chunk))
            .await
            .expect("server answers in time")
            .expect("read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Next complete block.
    async fn block(&mut self) -> Vec<u8> {
        loop {
            if let Some(p) = memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                let b = self.buf[..p + 2].to_vec();
                self.buf.drain(..p + 4);
                return b;
            }
            assert!(self.fill().await > 0, "server closed early");
        }
    }

    /// The `n` next blocks carrying ActionID `id` (others, e.g. security events, skipped).
    async fn blocks_for(&mut self, id: &str, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < n {
            let b = self.block().await;
            if action_id(&b).as_deref() == Some(id) {
                got.push(b);
            }
        }
        got
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    async fn closed(&mut self) -> bool {
        matches!(timeout(SOON, self.s.read(&mut [0u8; 64])).await, Ok(Ok(0)))
    }
}

/// Send every recorded action of `name` and compare the answers, block by block, with
/// the recorded ones carrying the same ActionID. `inexact` names keys whose values
/// are clock-dependent.
async fn replay_session(name: &str, skip_actions: &[&str], inexact: &[&str]) -> Raw {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let received = read(&format!("{name}.ami"));
    let sent = read(&format!("{name}.sent"));
    let recorded = blocks(&received);
    let mut raw = Raw::connect(&fake).await;
    assert_eq!(raw.banner().await, b"Asterisk Call Manager/13.0.0\r\n");
    for action in blocks(&sent) {
        let text = String::from_utf8_lossy(&action).to_string();
        if skip_actions.iter().any(|s| text.contains(s)) {
            continue;
        }
        let Some(id) = action_id(&action) else {
            panic!("recorded action without ActionID: {text}")
        };
        let want: Vec<&Vec<u8>> = recorded
            .iter()
            .filter(|b| action_id(b).as_deref() == Some(id.as_str()))
            .collect();
        let mut bytes = action.clone();
        bytes.extend_from_slice(b"\r\n");
        raw.send(&bytes).await;
        let got = raw.blocks_for(&id, want.len()).await;
        for (g, w) in got.iter().zip(&want) {
            if inexact.iter().any(|k| text.contains(k)) {
                assert_eq!(
                    without_line(g, "Timestamp:"),
                    without_line(w, "Timestamp:"),
                    "{name}: {text}"
                );
            } else {
                assert_eq!(
                    String::from_utf8_lossy(g),
                    String::from_utf8_lossy(w),
                    "{name}: {text}"
                );
            }
        }
    }
    raw
}

#[tokio::test]
async fn protocol_session_14_is_answered_as_recorded() {
    // Not simulated: `pjsip show contacts` output, Status, and the Events/Ping pair that
    // depends on a live call. Everything else must match byte for byte.
    let mut raw = replay_session(
        "14-ami-protocol",
        &[
            "pjsip show contacts",
            "Action: Status",
            "ActionID: kolokol-crm-9",
        ],
        &["Action: Ping"],
    )
    .await;
    assert!(raw.closed().await, "Logoff closes the connection");
}

#[tokio::test]
async fn failed_login_14b_is_answered_as_recorded_then_closed() {
    let mut raw = replay_session("14b-login-failure", &[], &[]).await;
    assert!(raw.closed().await, "Asterisk closes after a failed login");
}

#[tokio::test]
async fn md5_login_14c_is_answered_as_recorded() {
    let mut raw = replay_session("14c-md5-challenge-login", &[], &["Action: Ping"]).await;
    assert!(raw.closed().await);
}

#[tokio::test]
async fn read_only_user_14d_gets_permission_denied_as_recorded() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let mut raw = replay_session("14d-readonly-user", &[], &["Action: Ping"]).await;
    assert!(raw.closed().await);
    // The security event follows each denial, like in the recording.
    let mut raw = Raw::connect(&fake).await;
    raw.banner().await;
    raw.send(b"Action: Login\r\nActionID: a\r\nUsername: crm-ro\r\nSecret: ro-secret-456\r\n\r\nAction: Command\r\nActionID: b\r\nCommand: core show version\r\n\r\n")
        .await;
    raw.blocks_for("b", 1).await;
    let ev = raw.block().await;
    let text = String::from_utf8_lossy(&ev);
    assert!(text.starts_with("Event: RequestNotAllowed\r\n"), "{text}");
    assert!(text.contains("AccountID: crm-ro\r\n"), "{text}");
    assert!(text.contains("RequestType: Action: Command\r\n"), "{text}");
}

#[tokio::test]
async fn actions_before_login_are_refused() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let mut raw = Raw::connect(&fake).await;
    raw.banner().await;
    raw.send(b"Action: CoreShowChannels\r\nActionID: x\r\n\r\n")
        .await;
    let b = raw.blocks_for("x", 1).await;
    assert_eq!(
        String::from_utf8_lossy(&b[0]),
        "Response: Error\r\nActionID: x\r\nMessage: Authentication Required\r\n"
    );
    // Garbage from the client is skipped, the session goes on.
    let mut junk = vec![b'q'; 20_000];
    junk.extend_from_slice(b"\r\n\r\nAction: Ping\r\nActionID: y\r\n\r\n");
    raw.send(&junk).await;
    let b = raw.blocks_for("y", 1).await;
    assert!(String::from_utf8_lossy(&b[0]).contains("Ping: Pong"));
}

#[tokio::test]
async fn core_show_channels_lists_the_live_channels_of_the_replayed_call() {
    let replay = Replay::from_fixture(format!("{FIX}/14d-readonly-user.ami"))
        .expect("fixture")
        .timed(false);
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let mut raw = Raw::connect(&fake).await;
    raw.banner().await;
    raw.send(b"Action: Login\r\nActionID: a\r\nUsername: crm\r\nSecret: crm-secret-123\r\n\r\n")
        .await;
    raw.blocks_for("a", 1).await;
    assert!(fake.wait_logged_in(1, SOON).await);
    // Play only while both legs are bridged (up to the first BridgeLeave).
    let msgs = kolokol::ami::codec::parse_messages(replay.bytes());
    let upto = msgs
        .iter()
        .position(|m| m.is_event("BridgeLeave"))
        .expect("BridgeLeave");
    let mut bytes = Vec::new();
    for m in &msgs[..upto] {
        bytes.extend_from_slice(&m.to_wire());
    }
    assert_eq!(fake.push_bytes(bytes), 1);
    raw.send(b"Action: CoreShowChannels\r\nActionID: c\r\n\r\n")
        .await;
    let list = raw.blocks_for("c", 4).await;
    let text: Vec<String> = list
        .iter()
        .map(|b| String::from_utf8_lossy(b).to_string())
        .collect();
    assert!(text[0].contains("EventList: start"));
    assert!(
        text[1].starts_with(
            "Event: CoreShowChannel\r\nActionID: c\r\nChannel: PJSIP/trunk-00000020\r\n"
        ),
        "{}",
        text[1]
    );
    assert!(text[1].contains("Linkedid: 1795305045.34\r\n"));
    assert!(text[1].contains("Application: Dial\r\n"), "{}", text[1]);
    assert!(text[2].contains("Channel: PJSIP/101-00000021\r\n"));
    assert!(
        text[2].contains("BridgeId: ") && !text[2].contains("BridgeId: \r\n"),
        "{}",
        text[2]
    );
    assert!(text[3].ends_with("EventList: Complete\r\nListItems: 2\r\n"));
}

#[tokio::test]
async fn fresh_ids_make_every_play_a_new_call() {
    let replay = Replay::from_fixture(format!("{FIX}/01-inbound-answered-recorded.ami"))
        .expect("fixture")
        .timed(true)
        .speed(1000.0)
        .fresh_ids(true);
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let mut raw = Raw::connect(&fake).await;
    raw.banner().await;
    raw.send(b"Action: Login\r\nActionID: a\r\nUsername: crm\r\nSecret: crm-secret-123\r\n\r\n")
        .await;
    raw.blocks_for("a", 1).await;
    assert!(fake.wait_logged_in(1, SOON).await);
    let _booted = raw.block().await;
    let mut linked = Vec::new();
    for _ in 0..2 {
        fake.play(&replay).await;
        let mut events = Vec::new();
        for _ in 0..replay.event_count() {
            events.push(raw.block().await);
        }
        let mut all = Vec::new();
        for e in &events {
            all.extend_from_slice(e);
            all.extend_from_slice(b"\r\n");
        }
        let msgs = kolokol::ami::codec::parse_messages(&all);
        assert_eq!(msgs.len(), replay.event_count());
        let first = msgs
            .iter()
            .find(|m| m.is_event("Newchannel"))
            .and_then(|m| m.get("Linkedid"))
            .map(str::to_string)
            .expect("Newchannel");
        assert_ne!(first, "1795304861.0");
        // The call stays coherent: every Linkedid of the call is the new one.
        assert!(
            msgs.iter()
                .filter_map(|m| m.get("Linkedid"))
                .all(|l| l == first)
        );
        linked.push(first);
    }
    assert_ne!(linked[0], linked[1]);
}
