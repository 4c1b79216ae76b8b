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
///
/// One pass over the bytes: each line is found once (`memchr` for `\n`, then for
/// `:`) and its key/value spans are recorded while looking for the end of the
/// frame, in a scratch vector reused across frames. A finished message costs one
/// exact-size allocation for its spans and none per field.
#[derive(Debug, Default)]
pub struct AmiCodec {
    banner_done: bool,
    /// Start of the first line of the current frame not yet split into fields.
    line_start: usize,
    /// Bytes of that line already searched for `\n` (resumes `memchr`).
    scanned: usize,
    /// Field spans of the current frame so far (offsets from the frame start).
    fields: Vec<FieldSpan>,
    /// The current frame is old-style command output (`Response: Follows`): it may
    /// hold empty lines and ends only after `--END COMMAND--`.
    follows: bool,
    end_command_seen: bool,
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

    /// Forget the frame in progress.
    fn reset_frame(&mut self) {
        self.line_start = 0;
        self.scanned = 0;
        self.fields.clear();
        self.follows = false;
        self.end_command_seen = false;
    }

    fn start_skipping(&mut self, reason: MalformedReason, src: &BytesMut) {
        let n = src.len().min(SAMPLE_LEN);
        self.skipping = Some(Skipping {
            reason,
            dropped: 0,
            sample: String::from_utf8_lossy(&src[..n]).into_owned(),
            at_line_start: false,
        });
        self.reset_frame();
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

    /// Scan complete lines of the frame at the start of `src`, recording fields.
    /// Returns (frame length without the closing empty line, bytes to consume) once
    /// the closing empty line is there.
    fn scan(&mut self, src: &[u8]) -> Result<Option<(usize, usize)>, MalformedReason> {
        loop {
            let ls = self.line_start;
            let Some(off) = memchr(b'\n', &src[self.scanned..]) else {
                self.scanned = src.len();
                if src.len() - ls > MAX_LINE {
                    return Err(MalformedReason::LineTooLong);
                }
                if src.len() > MAX_MESSAGE {
                    return Err(MalformedReason::MessageTooLong);
                }
                return Ok(None);
            };
            let nl = self.scanned + off;
            if nl - ls > MAX_LINE {
                return Err(MalformedReason::LineTooLong);
            }
            if nl + 1 > MAX_MESSAGE {
                return Err(MalformedReason::MessageTooLong);
            }
            let le = if nl > ls && src[nl - 1] == b'\r' {
                nl - 1
            } else {
                nl
            };
            self.line_start = nl + 1;
            self.scanned = nl + 1;
            if ls == 0 {
                // Decided on the complete first line, whatever the read sizes.
                self.follows = src[..le].starts_with(b"Response: Follows");
            }
            if le == ls {
                // An empty line ends the frame, except inside old-style command output.
                if !self.follows || self.end_command_seen {
                    return Ok(Some((ls, nl + 1)));
                }
                continue;
            }
            self.push_line(&src[ls..le], ls);
        }
    }

    /// Record one non-empty line starting at `ls`.
    #[inline]
    fn push_line(&mut self, line: &[u8], ls: usize) {
        if self.follows
            && let Some(at) = memchr::memmem::find(line, END_COMMAND)
        {
            // `<output>--END COMMAND--`: keep the output part, if any.
            self.end_command_seen = true;
            if at > 0 {
                self.fields.push(output_span(ls, ls + at));
            }
            return;
        }
        match memchr(b':', line) {
            Some(colon) => {
                let mut vs = ls + colon + 1;
                if line.get(colon + 1) == Some(&b' ') {
                    vs += 1;
                }
                self.fields.push(FieldSpan {
                    key: Span {
                        start: ls as u32,
                        end: (ls + colon) as u32,
                    },
                    value: Span {
                        start: vs as u32,
                        end: (ls + line.len()) as u32,
                    },
                });
            }
            None => self.fields.push(output_span(ls, ls + line.len())),
        }
    }
}

/// A colon-less line of old-style command output. An empty key span is read back as
/// the key `Output` (see Message).
#[inline]
fn output_span(start: usize, end: usize) -> FieldSpan {
    FieldSpan {
        key: Span {
            start: start as u32,
            end: start as u32,
        },
        value: Span {
            start: start as u32,
            end: end as u32,
        },
    }
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
            if self.scanned == 0 && self.line_start == 0 {
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
            match self.scan(src) {
                Ok(None) => return Ok(None),
                Ok(Some((frame_len, consume))) => {
                    // One exact-size allocation for the spans; the scratch is reused.
                    let fields = self.fields.as_slice().to_vec();
                    self.reset_frame();
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
                self.reset_frame();
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
