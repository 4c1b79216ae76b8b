//! In-process benchmark of the daemon's conversion pool: eight one-hour 8 kHz recordings
//! through `Converter` at once, while the same tokio runtime answers a TCP echo (a
//! stand-in for the AMI event loop). Reports wall time, CPU time / wall time (cores used)
//! and the echo round-trip latency idle vs. under load.
//!
//! Run: `cargo bench --bench records_pool`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use kolokol::records::{Converter, RecordsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIXTURE: &str = "tests/fixtures/recordings/in-20261121-234741-79161234567-1795304861.0.wav";

/// A 60-minute wav: the fixture's header with new sizes, its audio repeated.
fn hour_wav(dst: &Path) -> std::io::Result<f64> {
    let fx = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE))?;
    let (header, audio) = fx.split_at(44);
    let reps = (3600 * 8000 * 2) / audio.len();
    let data_len = (audio.len() * reps) as u32;
    let mut h = header.to_vec();
    h[4..8].copy_from_slice(&(36 + data_len).to_le_bytes());
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    let mut f = std::io::BufWriter::new(std::fs::File::create(dst)?);
    f.write_all(&h)?;
    for _ in 0..reps {
        f.write_all(audio)?;
    }
    f.flush()?;
    Ok(f64::from(data_len) / 16000.0)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Echo round trips from a plain thread for `dur`, one every 5 ms; returns sorted RTTs.
fn probe(addr: std::net::SocketAddr, dur: Duration) -> Vec<Duration> {
    let mut s = TcpStream::connect(addr).expect("connect echo");
    s.set_nodelay(true).ok();
    let mut rtts = Vec::new();
    let end = Instant::now() + dur;
    let mut b = [0u8; 1];
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(b"x").expect("echo write");
        s.read_exact(&mut b).expect("echo read");
        rtts.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    rtts.sort();
    rtts
}

fn summary(r: &[Duration]) -> String {
    let pick = |q: f64| r[((r.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        pick(0.5),
        pick(0.99),
        pick(1.0),
        r.len()
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("hour.wav");
    let audio_s = hour_wav(&src).expect("write input");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });

        let idle = tokio::task::spawn_blocking(move || probe(addr, Duration::from_secs(2)))
            .await
            .expect("probe");

        let cfg = RecordsConfig {
            convert_timeout: Duration::from_secs(3600),
            ..RecordsConfig::default()
        };
        let conv = Converter::new(&cfg).expect("converter");
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let jobs: Vec<_> = (0..8)
            .map(|i| {
                let conv = conv.clone();
                let src = src.clone();
                let dst = tmp.path().join(format!("out{i}.mp3"));
                tokio::spawn(async move { conv.convert(&src, &dst).await })
            })
            .collect();
        let busy = std::thread::spawn(move || probe(addr, Duration::from_secs(3)));
        for j in jobs {
            j.await.expect("join").expect("convert");
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let busy = busy.join().expect("probe thread");

        println!(
            "8 x {:.0} min 8 kHz mono through Converter ({} slots, {cores} cores):",
            audio_s / 60.0,
            conv.slots()
        );
        println!(
            "  wall {wall:.2} s, CPU {cpu:.2} s, cores used {:.2}, {:.0}x real time in total",
            cpu / wall,
            8.0 * audio_s / wall
        );
        println!("  event-loop echo idle:        {}", summary(&idle));
        println!("  event-loop echo during load: {}", summary(&busy));
    });
}
