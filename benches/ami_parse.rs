//! AMI parse throughput on a stream of >= 1,000,000 events built by repeating the
//! burst recording (fixture 15), single core.
//!
//! ```sh
//! cargo bench --bench ami_parse            # parser + client over loopback TCP
//! AMI_BENCH_EVENTS=3000000 cargo bench --bench ami_parse
//! ```
//!
//! Three figures:
//! * `codec, 64 KiB reads`: bytes are fed to the decoder in 64 KiB pieces, as a
//!   socket read would (includes the copy into the read buffer), every message is
//!   built and field lookups are possible;
//! * `codec + Event lookup`: the same, also reading `Event` and `Uniqueid` of each
//!   message (what the tracker does first);
//! * `client over TCP`: the fake Asterisk streams the bytes over loopback to
//!   [`AmiClient`], the consumer counts `AmiEvent::Message`s (two tasks on a
//!   current-thread runtime, one core).
//!
//! Rates are per CPU second of the measuring thread (`CLOCK_THREAD_CPUTIME_ID`), so a
//! busy machine does not distort them; wall-clock rates are printed beside them.
//! The last line is JSON for `benches/peers/ami/run.sh`.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kolokol::ami::codec::{AmiCodec, Frame};
use kolokol::ami::{AmiClient, AmiConfig, AmiEvent};
use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions};
use tokio_util::codec::Decoder;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ami/15-burst-20-concurrent.ami"
);
const READ: usize = 64 * 1024;

fn main() {
    let target: usize = std::env::var("AMI_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let raw = std::fs::read(FIXTURE).expect("fixture 15 (run from the repo)");
    // The message part (after the banner line), repeated.
    let body_start = raw.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1);
    let body = Bytes::copy_from_slice(&raw[body_start..]);
    let per_copy = kolokol::ami::codec::parse_messages(&body).len();
    let copies = target.div_ceil(per_copy);
    let events = per_copy * copies;
    let bytes_total = body.len() * copies;
    println!(
        "stream: fixture 15 x {copies} = {events} messages, {:.1} MB ({:.0} bytes/message)",
        bytes_total as f64 / 1e6,
        bytes_total as f64 / events as f64
    );

    // Warm-up (page faults, allocator).
    run_codec(&body, 20, false);
    let mut best = Times::MAX;
    let mut best_lookup = Times::MAX;
    for _ in 0..3 {
        best = best.min(run_codec(&body, copies, false));
        best_lookup = best_lookup.min(run_codec(&body, copies, true));
    }
    let codec = report("codec, 64 KiB reads", events, bytes_total, best);
    let lookup = report("codec + Event lookup", events, bytes_total, best_lookup);

    // The client forwards events only (responses go to the actions that asked).
    let per_copy_events = kolokol::ami::codec::parse_messages(&body)
        .iter()
        .filter(|m| m.event().is_some())
        .count();
    let client_events = per_copy_events * copies;
    let client = run_client(&body, copies, client_events);
    let client_eps = report("client over TCP", client_events, bytes_total, client);
    println!(
        "{{\"events\":{events},\"bytes\":{bytes_total},\"codec_eps\":{codec:.0},\"lookup_eps\":{lookup:.0},\"client_eps\":{client_eps:.0}}}"
    );
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Clone, Copy)]
struct Times {
    cpu: Duration,
    wall: Duration,
}

impl Times {
    const MAX: Times = Times {
        cpu: Duration::MAX,
        wall: Duration::MAX,
    };
    fn min(self, o: Times) -> Times {
        if o.cpu < self.cpu { o } else { self }
    }
    fn measure<T>(f: impl FnOnce() -> T) -> (Times, T) {
        let (c0, w0) = (thread_cpu(), Instant::now());
        let out = f();
        let t = Times {
            cpu: thread_cpu() - c0,
            wall: w0.elapsed(),
        };
        (t, out)
    }
}

/// Prints the figures; returns events per CPU second.
fn report(name: &str, events: usize, bytes: usize, t: Times) -> f64 {
    let cpu = t.cpu.as_secs_f64().max(1e-9);
    let wall = t.wall.as_secs_f64().max(1e-9);
    let eps = events as f64 / cpu;
    println!(
        "{name:<22} cpu {cpu:>7.3} s {eps:>11.0} events/s {:>7.1} MB/s | wall {wall:>7.3} s {:>11.0} events/s",
        bytes as f64 / 1e6 / cpu,
        events as f64 / wall,
    );
    eps
}

/// Feed `copies` x `body` through the decoder in socket-sized reads.
fn run_codec(body: &Bytes, copies: usize, lookup: bool) -> Times {
    let mut codec = AmiCodec::without_banner();
    let mut buf = BytesMut::with_capacity(READ * 2);
    let mut n = 0usize;
    let mut sink = 0usize;
    let (took, ()) = Times::measure(|| {
        for _ in 0..copies {
            for piece in body.chunks(READ) {
                buf.extend_from_slice(piece);
                while let Ok(Some(frame)) = codec.decode(&mut buf) {
                    if let Frame::Message(m) = frame {
                        n += 1;
                        if lookup {
                            sink += m.event().map_or(0, str::len)
                                + m.get("Uniqueid").map_or(0, str::len);
                        }
                    }
                }
            }
        }
    });
    assert_eq!(n, copies * kolokol::ami::codec::parse_messages(body).len());
    std::hint::black_box(sink);
    took
}

/// Stream the bytes over loopback into the real client.
fn run_client(body: &Bytes, copies: usize, events: usize) -> Times {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fake = FakeAmi::start(FakeAmiOptions {
            fully_booted: false,
            track_channels: false,
            ..FakeAmiOptions::default()
        })
        .await
        .expect("fake AMI");
        let (ami, mut rx) = AmiClient::spawn(AmiConfig {
            host: "127.0.0.1".into(),
            port: fake.local_addr().port(),
            username: "crm".into(),
            secret: "crm-secret-123".into(),
            ping_interval: Duration::from_secs(3600),
            ..AmiConfig::default()
        });
        ami.wait_connected().await.expect("login");
        let feeder = fake.clone();
        let body = body.clone();
        let (c0, w0) = (thread_cpu(), Instant::now());
        tokio::spawn(async move {
            for _ in 0..copies {
                feeder.push_bytes(body.clone());
                tokio::task::yield_now().await;
            }
        });
        let mut n = 0usize;
        while n < events {
            match rx.recv().await {
                Some(AmiEvent::Message(_)) => n += 1,
                Some(_) => {}
                None => break,
            }
        }
        let took = Times {
            cpu: thread_cpu() - c0,
            wall: w0.elapsed(),
        };
        assert_eq!(n, events, "client delivered every event");
        ami.shutdown().await;
        fake.shutdown();
        took
    })
}
