//! Every recorded AMI stream parses completely: the message count equals the number of
//! blank-line-terminated blocks, and nothing is reported malformed.

use kolokol::ami::codec::{Frame, parse_all};

#[test]
fn every_fixture_parses_without_malformed_frames() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ami");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("ami") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let frames = parse_all(&bytes);
        let blocks = bytes.windows(4).filter(|w| w == b"\r\n\r\n").count();
        let messages = frames
            .iter()
            .filter(|f| matches!(f, Frame::Message(_)))
            .count();
        assert!(matches!(frames[0], Frame::Banner(_)), "{path:?}");
        assert!(
            !frames.iter().any(|f| matches!(f, Frame::Malformed(_))),
            "{path:?}"
        );
        assert_eq!(messages, blocks, "{path:?}");
        seen += 1;
    }
    assert!(seen >= 19, "only {seen} fixtures found");
}
