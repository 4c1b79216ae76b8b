//! Tracker throughput, parsing included, on one core.
//!
//! Input: the burst recording (`15-burst-20-concurrent`, 20 concurrent calls) repeated
//! with unique ids (every `1795305…` epoch prefix rewritten per repetition, same
//! length), fed in the recording's own socket-read chunks through `AmiCodec` and the
//! tracker. Each repetition starts 60 s after the previous one (its calls last ≤ 59 s).
//!
//! Reports events/s (timed: decode + track only; generating the input is not timed),
//! peak RSS, and whether heap memory returned to its baseline after all the calls.
//!
//! `cargo bench --bench tracker` (env `BENCH_REPS`, default 5000 = 7.3 M events,
//! 100,000 calls).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration as StdDuration, Instant};

use bytes::BytesMut;
use chrono::{Duration, TimeZone, Utc};
use kolokol::ami::codec::{AmiCodec, Frame};
use kolokol::calls::replay::parse_timeline;
use kolokol::calls::{CallsConfig, Stage, Tracker};
use tokio_util::codec::Decoder;

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

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time of this thread: the machine may be shared, wall time would measure the
/// neighbours too.
fn thread_cpu() -> StdDuration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return StdDuration::ZERO;
    }
    StdDuration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    // `BENCH_PARSE_ONLY=1` decodes without tracking, to split the cost.
    let parse_only = std::env::var("BENCH_PARSE_ONLY").is_ok_and(|v| v == "1");
    let reps: u64 = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ami");
    let template = std::fs::read(dir.join("15-burst-20-concurrent.ami")).expect("burst fixture");
    let timeline =
        std::fs::read_to_string(dir.join("15-burst-20-concurrent.timeline")).expect("timeline");
    let chunks = parse_timeline(&timeline, template.len()).expect("timeline parses");
    let needle = b"1795305";
    let positions: Vec<usize> = template
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();

    let mut tracker = Tracker::new(&CallsConfig::default()).expect("default config");
    let base = Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap();
    let mut buf = template.clone();
    let mut out = Vec::with_capacity(256);
    let mut events = 0u64;
    let mut stages = 0u64;
    let mut calls = 0u64;
    let mut busy = StdDuration::ZERO;
    let mut cpu = StdDuration::ZERO;
    let mut heap_after_warmup = 0isize;
    let rss_start = proc_status_kb("VmRSS:");
    for rep in 0..reps {
        // Unique ids per repetition: same length, so timeline offsets still hold.
        let prefix = format!("{:07}", 2_000_000 + rep);
        for &p in &positions {
            buf[p..p + 7].copy_from_slice(prefix.as_bytes());
        }
        let rep_base = base + Duration::seconds(rep as i64 * 60);
        let started = Instant::now();
        let cpu_started = thread_cpu();
        let mut codec = AmiCodec::new();
        let mut pending = BytesMut::with_capacity(64 * 1024);
        for c in &chunks {
            pending.extend_from_slice(&buf[c.offset..c.offset + c.len]);
            let at = rep_base + Duration::microseconds((c.at * 1e6) as i64);
            while let Ok(Some(frame)) = codec.decode(&mut pending) {
                if let Frame::Message(m) = frame {
                    events += 1;
                    if !parse_only {
                        tracker.handle_into(&m, at, &mut out);
                    }
                }
            }
        }
        for ev in out.drain(..) {
            stages += 1;
            if ev.stage == Stage::CallEnded {
                calls += 1;
            }
        }
        busy += started.elapsed();
        cpu += thread_cpu() - cpu_started;
        if rep == 199.min(reps - 1) {
            heap_after_warmup = LIVE.load(Ordering::Relaxed);
        }
    }
    let heap_end = LIVE.load(Ordering::Relaxed);
    let secs = cpu.as_secs_f64();
    println!(
        "tracker bench: burst fixture x {reps} (unique ids), one core, parsing included{}",
        if parse_only { " (PARSE ONLY)" } else { "" }
    );
    println!("  events:        {events}");
    println!("  stage events:  {stages} ({calls} calls ended)");
    println!(
        "  time:          {secs:.3} s CPU of the thread ({:.3} s wall)",
        busy.as_secs_f64()
    );
    println!(
        "  throughput:    {:.0} events/s (per CPU second)",
        events as f64 / secs
    );
    println!(
        "  per call:      {:.1} us ({} events/call)",
        secs * 1e6 / calls.max(1) as f64,
        events / calls.max(1)
    );
    println!(
        "  RSS:           start {} KiB, end {} KiB, peak (VmHWM) {} KiB",
        rss_start,
        proc_status_kb("VmRSS:"),
        proc_status_kb("VmHWM:")
    );
    println!(
        "  heap:          {} bytes after 200 reps, {} bytes after {} calls ({:+} bytes); live calls {}, channels {}",
        heap_after_warmup,
        heap_end,
        calls,
        heap_end - heap_after_warmup,
        tracker.call_count(),
        tracker.channel_count()
    );
}
