//! Memory returns to baseline: 10,000 calls (the real event shapes of scenario 01,
//! each with its own ids) leave the tracker holding what it held before them. The
//! benchmark (`benches/tracker.rs`) does the same over 100,000 burst calls in release.
//!
//! Bytes are counted by a global allocator wrapper, so the check is exact and does not
//! depend on how the OS reports RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};

use chrono::{Duration, TimeZone, Utc};
use kolokol::ami::codec::parse_messages;
use kolokol::calls::{CallsConfig, Stage, Tracker};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Scenario 01's call-shaping events in wire form, with `@ID@` where its ids were.
fn template() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ami/01-inbound-answered-recorded.ami");
    let msgs = parse_messages(&std::fs::read(p).unwrap());
    let mut text = String::new();
    for m in msgs {
        let keep = match m.event() {
            Some("Newchannel" | "Newstate" | "DialBegin" | "DialEnd" | "BridgeEnter")
            | Some("BridgeLeave" | "HangupRequest" | "Hangup" | "MixMonitorStart") => true,
            Some("VarSet") => m.get("Variable") == Some("MIXMONITOR_FILENAME"),
            _ => false,
        };
        if keep {
            text.push_str(&String::from_utf8(m.to_wire()).unwrap());
        }
    }
    text.replace("1795304861", "@ID@")
}

#[test]
fn memory_returns_to_baseline_after_10k_calls() {
    let tpl = template();
    let mut t = Tracker::new(&CallsConfig::default()).unwrap();
    let base = Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap();
    let mut ended = 0usize;
    let mut run = |t: &mut Tracker, from: u64, to: u64| {
        let mut out = Vec::new();
        for i in from..to {
            let text = tpl.replace("@ID@", &(2_000_000_000 + i).to_string());
            let at = base + Duration::seconds(i as i64);
            for m in parse_messages(text.as_bytes()) {
                t.handle_into(&m, at, &mut out);
            }
            ended += out.iter().filter(|e| e.stage == Stage::CallEnded).count();
            out.clear();
        }
    };
    // Warm-up fills the bounded "recently ended" memory and sizes the maps.
    run(&mut t, 0, 1_500);
    let before = LIVE.load(Ordering::Relaxed);
    run(&mut t, 1_500, 11_500);
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(ended, 11_500, "one call_ended per call");
    assert_eq!(t.call_count(), 0);
    assert_eq!(t.channel_count(), 0);
    let grown = after - before;
    assert!(
        grown.abs() < 64 * 1024,
        "tracker memory grew by {grown} bytes over 10,000 calls"
    );
}
