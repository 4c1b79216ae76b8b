//! Replaying recorded AMI byte streams (the fixture format) through the tracker.
//!
//! With Asterisk's default `timestampevents = no` events carry no time. A replay takes
//! each message's time from the fixture's `.timeline` file (`<seconds since connect>
//! recv <offset> <length>` per socket read): a message gets the time of the read that
//! completed it. The absolute base comes from the first `EventTV` in the stream, else
//! from the first epoch-based `Uniqueid`. Without a timeline, a message's time is the
//! latest `EventTV`/`Uniqueid` epoch seen so far (coarse, but deterministic).

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use tokio_util::codec::Decoder;

use super::call_full::StageEvent;
use super::config::{CallsConfig, CallsConfigError};
use super::tracker::Tracker;
use crate::ami::Message;
use crate::ami::codec::{AmiCodec, Frame};

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] CallsConfigError),
    #[error("timeline line {line}: {reason} (expected `<seconds> recv|sent <offset> <length>`)")]
    Timeline { line: usize, reason: String },
}

/// One received chunk of a timeline: seconds since connect, byte range in the `.ami`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chunk {
    pub at: f64,
    pub offset: usize,
    pub len: usize,
}

/// Parse the `recv` lines of a `.timeline` file.
pub fn parse_timeline(text: &str, total_len: usize) -> Result<Vec<Chunk>, ReplayError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let bad = |reason: &str| ReplayError::Timeline {
            line: line_no,
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.is_empty() {
            continue;
        }
        if parts.len() != 4 {
            return Err(bad("not 4 fields"));
        }
        if parts[1] != "recv" {
            continue;
        }
        let at: f64 = parts[0].parse().map_err(|_| bad("bad time"))?;
        let offset: usize = parts[2].parse().map_err(|_| bad("bad offset"))?;
        let len: usize = parts[3].parse().map_err(|_| bad("bad length"))?;
        if !at.is_finite() || at < 0.0 {
            return Err(bad("bad time"));
        }
        if offset.checked_add(len).is_none_or(|end| end > total_len) {
            return Err(bad("byte range beyond the end of the .ami file"));
        }
        out.push(Chunk { at, offset, len });
    }
    Ok(out)
}

/// Decode messages from chunks, each tagged with the relative time of its chunk.
pub fn decode_chunks<'a>(
    chunks: impl IntoIterator<Item = (&'a [u8], Option<f64>)>,
) -> Vec<(Message, Option<f64>)> {
    let mut codec = AmiCodec::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut last = None;
    for (bytes, at) in chunks {
        buf.extend_from_slice(bytes);
        last = at;
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            if let Frame::Message(m) = frame {
                out.push((m, at));
            }
        }
    }
    while let Ok(Some(frame)) = codec.decode_eof(&mut buf) {
        if let Frame::Message(m) = frame {
            out.push((m, last));
        }
    }
    out
}

fn event_tv(m: &Message) -> Option<DateTime<Utc>> {
    let tv = m.get("EventTV")?;
    DateTime::parse_from_str(tv, "%Y-%m-%dT%H:%M:%S%.f%z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn uniqueid_epoch(m: &Message) -> Option<DateTime<Utc>> {
    let id = m.get("Uniqueid")?;
    let secs: i64 = id.split('.').next()?.parse().ok()?;
    DateTime::from_timestamp(secs, 0)
}

/// Absolute times for decoded messages (see the module docs).
pub fn assign_times(msgs: &[(Message, Option<f64>)]) -> Vec<DateTime<Utc>> {
    let has_timeline = msgs.iter().any(|(_, t)| t.is_some());
    if has_timeline {
        let base = msgs
            .iter()
            .find_map(|(m, t)| event_tv(m).map(|tv| (tv, t.unwrap_or(0.0))))
            .or_else(|| {
                msgs.iter()
                    .find_map(|(m, t)| uniqueid_epoch(m).map(|tv| (tv, t.unwrap_or(0.0))))
            })
            .map(|(abs, rel)| abs - chrono::Duration::microseconds((rel * 1e6) as i64))
            .unwrap_or(DateTime::UNIX_EPOCH);
        let mut last = 0.0f64;
        msgs.iter()
            .map(|(_, t)| {
                let rel = t.unwrap_or(last);
                last = rel;
                base + chrono::Duration::microseconds((rel * 1e6) as i64)
            })
            .collect()
    } else {
        let mut now = DateTime::UNIX_EPOCH;
        msgs.iter()
            .map(|(m, _)| {
                let hint = event_tv(m).or_else(|| {
                    m.is_event("Newchannel")
                        .then(|| uniqueid_epoch(m))
                        .flatten()
                });
                if let Some(h) = hint
                    && h > now
                {
                    now = h;
                }
                now
            })
            .collect()
    }
}

/// Feed chunks (bytes, relative time) through `tracker`; returns the stage events.
pub fn replay_chunks<'a>(
    chunks: impl IntoIterator<Item = (&'a [u8], Option<f64>)>,
    tracker: &mut Tracker,
) -> Vec<StageEvent> {
    let msgs = decode_chunks(chunks);
    let times = assign_times(&msgs);
    let mut out = Vec::new();
    for ((m, _), at) in msgs.iter().zip(times) {
        tracker.handle_into(m, at, &mut out);
    }
    out
}

/// Replay one recorded stream (and its timeline, if any) through `tracker`.
pub fn replay(
    bytes: &[u8],
    timeline: Option<&str>,
    tracker: &mut Tracker,
) -> Result<Vec<StageEvent>, ReplayError> {
    match timeline {
        Some(t) => {
            let chunks = parse_timeline(t, bytes.len())?;
            let covered = chunks.iter().map(|c| c.offset + c.len).max().unwrap_or(0);
            let last = chunks.last().map(|c| c.at);
            let mut parts: Vec<(&[u8], Option<f64>)> = chunks
                .iter()
                .map(|c| (&bytes[c.offset..c.offset + c.len], Some(c.at)))
                .collect();
            if covered < bytes.len() {
                parts.push((&bytes[covered..], last));
            }
            Ok(replay_chunks(parts, tracker))
        }
        None => Ok(replay_chunks([(bytes, None)], tracker)),
    }
}

/// Replay one recorded stream with a fresh tracker built from `cfg`.
pub fn replay_bytes(
    bytes: &[u8],
    timeline: Option<&str>,
    cfg: &CallsConfig,
) -> Result<Vec<StageEvent>, ReplayError> {
    let mut tracker = Tracker::new(cfg)?;
    replay(bytes, timeline, &mut tracker)
}
