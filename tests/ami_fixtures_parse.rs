//! Every recorded AMI stream parses completely: the right number of events and
//! responses, every field intact (compared with a naive line-by-line reading of the
//! recording), and any split of the byte stream gives the same messages.

use bytes::BytesMut;
use kolokol::ami::Message;
use kolokol::ami::codec::{AmiCodec, Frame, parse_all};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ami");

/// (fixture, events, responses), counted in the recordings: blocks starting with
/// `Event:` / `Response:` (an `OriginateResponse` event also has a `Response:` line).
const COUNTS: &[(&str, usize, usize)] = &[
    ("01-inbound-answered-recorded", 98, 2),
    ("02-inbound-noanswer-missed", 46, 2),
    ("03-inbound-busy", 35, 2),
    ("04-inbound-ringgroup-102-answers", 104, 2),
    ("05-inbound-queue-101-answers", 111, 2),
    ("06-inbound-blind-transfer-101-to-102", 169, 2),
    ("07-inbound-attended-transfer-101-to-102", 257, 2),
    ("08-outbound-101-answered", 97, 2),
    ("09-outbound-101-noanswer", 49, 2),
    ("10-internal-101-to-102", 92, 2),
    ("11-click-to-call-originate", 111, 3),
    ("12-inbound-fastagi-autodistribution", 99, 2),
    ("13-inbound-abandoned-while-ringing", 46, 2),
    ("14-ami-protocol", 109, 14),
    ("14b-login-failure", 0, 1),
    ("14c-md5-challenge-login", 2, 4),
    ("14d-readonly-user", 99, 6),
    ("15-burst-20-concurrent", 1463, 2),
    ("16-inbound-blind-transfer-sip-refer", 178, 2),
    ("17-inbound-queue-local-members-102-answers", 216, 2),
];

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DIR}/{name}.ami")).expect("fixture present")
}

fn messages(frames: &[Frame]) -> Vec<Message> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// The recording read the dumbest possible way: split at "\r\n\r\n", then lines at
/// ": ". Used as the oracle for field contents.
fn naive(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8(bytes.to_vec()).expect("fixtures are UTF-8");
    let body = text.split_once("\r\n").map_or("", |(_, rest)| rest);
    body.split("\r\n\r\n")
        .filter(|b| !b.is_empty())
        .map(|b| {
            b.split("\r\n")
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap_or(("Output", l));
                    (k.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string())
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_fixture_has_the_recorded_number_of_events_and_responses() {
    let mut on_disk = 0;
    for entry in std::fs::read_dir(DIR).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("ami") {
            on_disk += 1;
        }
    }
    assert_eq!(on_disk, COUNTS.len(), "a fixture is missing from COUNTS");
    for (name, events, responses) in COUNTS {
        let bytes = read(name);
        let frames = parse_all(&bytes);
        assert!(
            matches!(&frames[0], Frame::Banner(b) if b == "Asterisk Call Manager/13.0.0"),
            "{name}"
        );
        assert!(
            !frames.iter().any(|f| matches!(f, Frame::Malformed(_))),
            "{name}: malformed frame"
        );
        let msgs = messages(&frames);
        assert_eq!(
            msgs.iter().filter(|m| m.event().is_some()).count(),
            *events,
            "{name}: events"
        );
        assert_eq!(
            msgs.iter().filter(|m| m.event().is_none()).count(),
            *responses,
            "{name}: responses"
        );
    }
}

#[test]
fn every_field_of_every_fixture_is_intact_and_in_order() {
    for (name, _, _) in COUNTS {
        let bytes = read(name);
        let msgs = messages(&parse_all(&bytes));
        let oracle = naive(&bytes);
        assert_eq!(msgs.len(), oracle.len(), "{name}");
        for (m, want) in msgs.iter().zip(&oracle) {
            let got: Vec<(String, String)> = m
                .fields()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(&got, want, "{name}");
            // And the wire form is the recorded block.
            let mut block: Vec<u8> = Vec::new();
            for (k, v) in want {
                block.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            block.extend_from_slice(b"\r\n");
            assert_eq!(m.to_wire(), block, "{name}");
        }
    }
}

#[test]
fn recorded_details_survive_parsing() {
    let msgs = messages(&parse_all(&read("14-ami-protocol")));
    // Command output: repeated Output keys in order, empty values kept.
    let contacts = msgs
        .iter()
        .find(|m| m.action_id() == Some("kolokol-crm-4"))
        .expect("pjsip show contacts response");
    let out: Vec<&str> = contacts.get_all("Output").collect();
    assert_eq!(out.len(), 11);
    assert_eq!(out[0], "");
    assert!(out[4].contains("101/sip:101@127.0.0.1:5070"));
    assert_eq!(out[9], "Objects found: 4");
    let json = contacts.to_json();
    assert_eq!(json["Output"].as_array().map(|a| a.len()), Some(11));
    // Values with colons.
    let bad = msgs
        .iter()
        .find(|m| m.action_id() == Some("kolokol-crm-5"))
        .expect("NoSuchAction response");
    assert_eq!(
        bad.get("Message"),
        Some(
            "Invalid/unknown command: NoSuchAction. Use Action: ListCommands to show available commands."
        )
    );
    // An event carrying a Response field is still an event.
    let orig = msgs
        .iter()
        .find(|m| m.is_event("OriginateResponse"))
        .expect("OriginateResponse");
    assert_eq!(orig.response(), Some("Failure"));
    assert_eq!(orig.get("Uniqueid"), Some("<unknown>"));
    // Key spelling varies: lookups are case-insensitive.
    let csc = msgs
        .iter()
        .find(|m| m.is_event("CoreShowChannel"))
        .expect("CoreShowChannel");
    assert_eq!(csc.get("BridgeID"), csc.get("BridgeId"));
    assert_eq!(csc.get("AccountCode"), Some(""));
    let status_complete = msgs
        .iter()
        .find(|m| m.is_event("StatusComplete"))
        .expect("StatusComplete");
    assert_eq!(status_complete.get("ListItems"), Some("2"));
    assert_eq!(status_complete.get("Items"), Some("2"));
}

fn decode_chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut codec = AmiCodec::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let c = c.clamp(last, bytes.len());
        buf.extend_from_slice(&bytes[last..c]);
        last = c;
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            out.push(f);
        }
    }
    while let Ok(Some(f)) = codec.decode_eof(&mut buf) {
        out.push(f);
    }
    out
}

#[test]
fn recorded_socket_chunking_gives_the_same_messages() {
    for (name, _, _) in COUNTS {
        let bytes = read(name);
        let tl = std::fs::read_to_string(format!("{DIR}/{name}.timeline")).expect("timeline");
        let cuts: Vec<usize> = tl
            .lines()
            .filter(|l| l.contains(" recv "))
            .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
            .collect();
        assert_eq!(decode_chunked(&bytes, &cuts), parse_all(&bytes), "{name}");
    }
}

#[test]
fn byte_by_byte_gives_the_same_messages() {
    let bytes = read("14-ami-protocol");
    let cuts: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(decode_chunked(&bytes, &cuts), parse_all(&bytes));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_split_of_any_fixture_gives_the_same_messages(
        idx in 0..COUNTS.len(),
        raw_cuts in proptest::collection::vec(any::<u32>(), 1..64),
    ) {
        let (name, _, _) = COUNTS[idx];
        let bytes = read(name);
        let mut cuts: Vec<usize> = raw_cuts.iter().map(|c| *c as usize % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_chunked(&bytes, &cuts), parse_all(&bytes));
    }

    #[test]
    fn any_split_of_arbitrary_bytes_gives_the_same_frames(
        data in proptest::collection::vec(
            prop_oneof![
                Just(b"\r\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"Event: X\r\n".to_vec()),
                Just(b"Response: Follows\r\n".to_vec()),
                Just(b"--END COMMAND--\r\n".to_vec()),
                Just(vec![0xff, 0xfe]),
                proptest::collection::vec(any::<u8>(), 0..40),
                Just(vec![b'x'; 9000]),
            ],
            0..40,
        ),
        raw_cuts in proptest::collection::vec(any::<u32>(), 0..32),
    ) {
        let bytes: Vec<u8> = data.concat();
        let mut cuts: Vec<usize> = raw_cuts.iter().map(|c| *c as usize % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_chunked(&bytes, &cuts), parse_all(&bytes));
    }
}
