//! Framing of the AMI byte stream: banner line, then `Key: Value` blocks closed by an
//! empty line.
//!
//! The decoder is incremental: any split of the stream yields the same frames. It never
//! panics and never buffers without bound: a line over [`MAX_LINE`] or a message over
//! [`MAX_MESSAGE`] (or one that is not UTF-8) is skipped up to the next empty line and
//! reported as [`Frame::Malformed`] with a sample, so the caller can count and log it
//! while the stream goes on.

use bytes::{Buf, Bytes, BytesMut};
use memchr::memchr;
use tokio_util::codec::Decoder;

use super::message::{FieldSpan, Message, Span};

/// Longest accepted line, in bytes.
pub const MAX_LINE: usize = 8 * 1024;
/// Longest accepted message, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How many bytes of a rejected frame are kept for the log line.
const SAMPLE_LEN: usize = 160;

const END_COMMAND: &[u8] = b"--END COMMAND--";

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The greeting line, e.g. `Asterisk Call Manager/13.0.0` (without the line end).
    Banner(String),
    /// One complete message.
    Message(Message),
    /// Bytes that were skipped because they break a limit or are not UTF-8.
    Malformed(Malformed),
}

/// Why a frame was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedReason {
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// A message longer than [`MAX_MESSAGE`].
    MessageTooLong,
    /// Bytes that are not valid UTF-8.
    NotUtf8,
}

impl std::fmt::Display for MalformedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MalformedReason::LineTooLong => "line longer than 8 KiB",
            MalformedReason::MessageTooLong => "message longer than 64 KiB",
            MalformedReason::NotUtf8 => "bytes that are not UTF-8",
        })
    }
}

/// A skipped frame: the reason, how many bytes were dropped and the first bytes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub reason: MalformedReason,
    pub bytes_skipped: usize,
    /// Start of the frame, lossily decoded, for the log line.
    pub sample: String,
}

/// Errors of the codec itself: only I/O (the framing never fails, it skips).
pub type CodecError = std::io::Error;

/// Incremental AMI decoder (and encoder for actions, see [`AmiCodec::encode_action`]).
#[derive(Debug, Default)]
pub struct AmiCodec {
    banner_done: bool,
    /// Bytes of the current (incomplete) frame already scanned for its end.
    scanned: usize,
    /// Length of the current line so far, at `scanned`.
    line_len: usize,
    /// When set we are dropping an over-limit frame up to the next empty line.
    skipping: Option<Skipping>,
}

#[derive(Debug)]
struct Skipping {
    reason: MalformedReason,
    dropped: usize,
    sample: String,
    /// Whether the last dropped byte ended a line (so an empty line may follow).
    at_line_start: bool,
}

impl AmiCodec {
    pub fn new() -> Self {
        Self::default()
    }

    /// A codec that expects no banner (for parsing captured message blocks).
    pub fn without_banner() -> Self {
        AmiCodec {
            banner_done: true,
            ..Self::default()
        }
    }

    /// Encode an action (or any message) in wire form.
    pub fn encode_action(msg: &Message, dst: &mut BytesMut) {
        dst.extend_from_slice(&msg.to_wire());
    }

    fn start_skipping(&mut self, reason: MalformedReason, src: &BytesMut) {
        let n = src.len().min(SAMPLE_LEN);
        self.skipping = Some(Skipping {
            reason,
            dropped: 0,
            sample: String::from_utf8_lossy(&src[..n]).into_owned(),
            at_line_start: false,
        });
        self.scanned = 0;
        self.line_len = 0;
    }

    /// Drop bytes of an over-limit frame until an empty line; returns the report when done.
    fn skip(&mut self, src: &mut BytesMut) -> Option<Malformed> {
        let skipping = self.skipping.as_mut()?;
        let mut i = 0;
        while i < src.len() {
            match src[i] {
                b'\n' if skipping.at_line_start => {
                    let dropped = skipping.dropped + i + 1;
                    src.advance(i + 1);
                    let s = self.skipping.take()?;
                    return Some(Malformed {
                        reason: s.reason,
                        bytes_skipped: dropped,
                        sample: s.sample,
                    });
                }
                b'\n' => skipping.at_line_start = true,
                b'\r' => {}
                _ => skipping.at_line_start = false,
            }
            i += 1;
        }
        skipping.dropped += src.len();
        src.clear();
        None
    }

    /// Find the end of the frame at the start of `src`: returns (frame length without
    /// the terminating empty line, total length to consume).
    fn find_end(&mut self, src: &BytesMut) -> Result<Option<(usize, usize)>, MalformedReason> {
        let follows = src.starts_with(b"Response: Follows");
        let mut pos = self.scanned;
        loop {
            let Some(off) = memchr(b'\n', &src[pos..]) else {
                self.line_len += src.len() - pos;
                self.scanned = src.len();
                if self.line_len > MAX_LINE {
                    return Err(MalformedReason::LineTooLong);
                }
                if src.len() > MAX_MESSAGE {
                    return Err(MalformedReason::MessageTooLong);
                }
                return Ok(None);
            };
            let nl = pos + off;
            self.line_len += off;
            if self.line_len > MAX_LINE {
                return Err(MalformedReason::LineTooLong);
            }
            if nl + 1 > MAX_MESSAGE {
                return Err(MalformedReason::MessageTooLong);
            }
            // Is the line that starts after this '\n' empty?
            let next = nl + 1;
            let empty_len = match src.get(next) {
                Some(b'\n') => Some(1),
                Some(b'\r') => match src.get(next + 1) {
                    Some(b'\n') => Some(2),
                    Some(_) => None,
                    // Can't tell yet: rescan from this '\n' when more bytes come.
                    None => {
                        self.scanned = nl;
                        self.line_len = 0;
                        return Ok(None);
                    }
                },
                Some(_) => None,
                None => {
                    self.scanned = nl;
                    self.line_len = 0;
                    return Ok(None);
                }
            };
            if let Some(empty_len) = empty_len {
                // Old-style command output may hold empty lines: it ends only after
                // `--END COMMAND--`.
                if !follows || memchr::memmem::find(&src[..next], END_COMMAND).is_some() {
                    return Ok(Some((next, next + empty_len)));
                }
            }
            self.line_len = 0;
            pos = nl + 1;
        }
    }
}

/// Split a checked frame into field spans. Lines without a colon (old `Follows`
/// command output) become `Output` values; `--END COMMAND--` is dropped.
fn parse_fields(buf: &[u8]) -> Vec<FieldSpan> {
    let mut fields = Vec::with_capacity(24);
    let mut start = 0usize;
    while start < buf.len() {
        let end = match memchr(b'\n', &buf[start..]) {
            Some(off) => start + off,
            None => buf.len(),
        };
        let mut line_end = end;
        if line_end > start && buf[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        let line = &buf[start..line_end];
        if !line.is_empty() {
            match memchr(b':', line) {
                Some(colon) if !is_end_command(line) => {
                    let mut vs = start + colon + 1;
                    if vs < line_end && buf[vs] == b' ' {
                        vs += 1;
                    }
                    fields.push(FieldSpan {
                        key: Span {
                            start: start as u32,
                            end: (start + colon) as u32,
                        },
                        value: Span {
                            start: vs as u32,
                            end: line_end as u32,
                        },
                    });
                }
                _ => push_output(&mut fields, line, start),
            }
        }
        start = end + 1;
    }
    fields
}

fn is_end_command(line: &[u8]) -> bool {
    memchr::memmem::find(line, END_COMMAND).is_some()
}

/// Old-style command output: the line (minus a trailing `--END COMMAND--`) as `Output`.
fn push_output(fields: &mut Vec<FieldSpan>, line: &[u8], start: usize) {
    let text_len = match memchr::memmem::find(line, END_COMMAND) {
        Some(0) => return,
        Some(at) => at,
        None => line.len(),
    };
    fields.push(FieldSpan {
        // An empty key span is read back as the key `Output` (see Message).
        key: Span {
            start: start as u32,
            end: start as u32,
        },
        value: Span {
            start: start as u32,
            end: (start + text_len) as u32,
        },
    });
}

impl Decoder for AmiCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        loop {
            if self.skipping.is_some() {
                match self.skip(src) {
                    Some(bad) => return Ok(Some(Frame::Malformed(bad))),
                    None => return Ok(None),
                }
            }
            if !self.banner_done {
                let Some(nl) = memchr(b'\n', src) else {
                    if src.len() > MAX_LINE {
                        self.banner_done = true;
                        self.start_skipping(MalformedReason::LineTooLong, src);
                        continue;
                    }
                    return Ok(None);
                };
                if src.starts_with(b"Asterisk Call Manager") {
                    let line = src.split_to(nl + 1);
                    self.banner_done = true;
                    let text = String::from_utf8_lossy(&line);
                    return Ok(Some(Frame::Banner(text.trim_end().to_string())));
                }
                // No banner (stream picked up mid-way): parse messages right away.
                self.banner_done = true;
            }
            // Stray empty lines between messages carry nothing.
            if self.scanned == 0 {
                let lead = src
                    .iter()
                    .take_while(|b| **b == b'\r' || **b == b'\n')
                    .count();
                if lead > 0 {
                    // Keep a lone '\r' that may be the start of "\r\n" ... of nothing: safe to drop.
                    src.advance(lead);
                }
            }
            if src.is_empty() {
                return Ok(None);
            }
            match self.find_end(src) {
                Ok(None) => return Ok(None),
                Ok(Some((frame_len, consume))) => {
                    self.scanned = 0;
                    self.line_len = 0;
                    let mut frame = src.split_to(consume);
                    frame.truncate(frame_len);
                    let frame: Bytes = frame.freeze();
                    if std::str::from_utf8(&frame).is_err() {
                        let n = frame.len().min(SAMPLE_LEN);
                        return Ok(Some(Frame::Malformed(Malformed {
                            reason: MalformedReason::NotUtf8,
                            bytes_skipped: consume,
                            sample: String::from_utf8_lossy(&frame[..n]).into_owned(),
                        })));
                    }
                    let fields = parse_fields(&frame);
                    return Ok(Some(Frame::Message(Message::from_checked(frame, fields))));
                }
                Err(reason) => {
                    self.start_skipping(reason, src);
                    // The bytes scanned so far belong to the bad frame: drop them and keep
                    // looking for its end in what remains.
                    continue;
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None => {
                // A connection closed mid-message leaves a partial frame: it is dropped,
                // not an error, since the reconnect starts a fresh stream.
                src.clear();
                self.scanned = 0;
                self.line_len = 0;
                self.skipping = None;
                Ok(None)
            }
        }
    }
}

/// Parse a whole captured byte stream (e.g. a fixture) into frames.
pub fn parse_all(bytes: &[u8]) -> Vec<Frame> {
    let mut codec = AmiCodec::new();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        out.push(frame);
    }
    if let Ok(Some(frame)) = codec.decode_eof(&mut buf) {
        out.push(frame);
    }
    out
}

/// Only the messages of a captured byte stream.
pub fn parse_messages(bytes: &[u8]) -> Vec<Message> {
    parse_all(bytes)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_then_messages_with_crlf_and_lf() {
        let frames = parse_all(
            b"Asterisk Call Manager/13.0.0\r\nResponse: Success\r\nMessage: ok\r\n\r\nEvent: X\nA: b: c\n\n",
        );
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0],
            Frame::Banner("Asterisk Call Manager/13.0.0".into())
        );
        let Frame::Message(m) = &frames[2] else {
            panic!("not a message")
        };
        assert_eq!(m.event(), Some("X"));
        assert_eq!(m.get("A"), Some("b: c"));
    }

    #[test]
    fn old_follows_output_keeps_empty_lines_until_end_command() {
        let frames = parse_all(
            b"Response: Follows\r\nPrivilege: Command\r\nline one\r\n\r\nline two\r\n--END COMMAND--\r\n\r\nEvent: Y\r\n\r\n",
        );
        let msgs: Vec<_> = frames
            .into_iter()
            .filter_map(|f| {
                if let Frame::Message(m) = f {
                    Some(m)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0].get_all("Output").collect::<Vec<_>>(),
            vec!["line one", "line two"]
        );
        assert_eq!(msgs[1].event(), Some("Y"));
    }

    #[test]
    fn oversize_and_non_utf8_frames_are_skipped_and_stream_goes_on() {
        let mut input = Vec::new();
        input.extend_from_slice(b"Event: Big\r\nData: ");
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\r\n\r\nEvent: Bad\r\nV: \xff\xfe\r\n\r\nEvent: Good\r\n\r\n");
        let frames = parse_all(&input);
        assert!(
            matches!(&frames[0], Frame::Malformed(m) if m.reason == MalformedReason::LineTooLong)
        );
        assert!(matches!(&frames[1], Frame::Malformed(m) if m.reason == MalformedReason::NotUtf8));
        assert!(matches!(&frames[2], Frame::Message(m) if m.event() == Some("Good")));
        assert_eq!(frames.len(), 3);
    }
}
