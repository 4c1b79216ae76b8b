//! Fuzz the AMI framing: arbitrary bytes, cut at arbitrary points, must never panic,
//! never buffer without bound, and must give the same frames as one whole read.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ami_codec -- -max_total_time=600`
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

// The real sources, compiled in (codec refers to its sibling as `super::message`).
#[allow(dead_code)]
#[path = "../../src/ami/codec.rs"]
mod codec;
#[allow(dead_code)]
#[path = "../../src/ami/message.rs"]
mod message;

use codec::{AmiCodec, Frame, MAX_MESSAGE, parse_all};

fuzz_target!(|data: &[u8]| {
    // First byte picks the read size (1..=256), like a socket handing out pieces.
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(seed) + 1;
    let whole = parse_all(input);

    let mut codec = AmiCodec::new();
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            chunked.push(f);
        }
        // Bounded memory: an incomplete frame never exceeds the message limit by more
        // than one read.
        assert!(buf.len() <= MAX_MESSAGE + step + 2, "buffer grew to {}", buf.len());
    }
    while let Ok(Some(f)) = codec.decode_eof(&mut buf) {
        chunked.push(f);
    }
    assert_eq!(whole, chunked);

    for f in &whole {
        if let Frame::Message(m) = f {
            // Every accessor works on whatever was parsed.
            let _ = m.event();
            let _ = m.get_all("Output").count();
            let json = m.to_json();
            assert!(json.is_object());
            let wire = m.to_wire();
            assert!(wire.ends_with(b"\r\n"));
        }
    }
});
