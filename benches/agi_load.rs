//! FastAGI load generator: 50 concurrent fake-Asterisk sessions, each sending fixture
//! 12's real `agi_*` block and answering every command with `200 result=1`, against
//!
//! 1. a trivial Rust server that writes the two canned lines (the generator's ceiling),
//! 2. kolokol's FastAGI server with a warm cache (cache hits),
//! 3. a panoramisk FastAGI server (Python) answering the same script from a dict.
//!
//! Reports sustained sessions/s and p50/p99 connect-to-close latency, and the ratios.
//!
//! ```sh
//! cargo bench --bench agi_load                      # 5 s per target, 50 sessions
//! cargo bench --bench agi_load -- --secs 10 --concurrency 50 --server-threads 1 --gen-threads 2
//! cargo bench --bench agi_load -- --pin   # server (and panoramisk) on CPU 0, generator on CPU 1
//! ```
//!
//! Besides throughput and latency it prints the server's CPU time per session (from
//! /proc, per thread), which stays meaningful on a busy machine where wall-clock
//! figures depend on what else runs.
//!
//! panoramisk is installed by this program with `pip install --target` into a temp dir
//! (set `AGI_BENCH_PYTHONPATH` to reuse an existing install; `--no-python` skips it).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kolokol::agi::{
    AgiConfig, AgiServer, AutodistHandler, Autodistributor, LookupError, ResponsibleCache,
    ResponsibleLookup,
};
use kolokol::crm::{BoxFuture, Responsible};
use kolokol::hooks::NoCustomizations;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const FIXTURE_IN: &[u8] = include_bytes!("../tests/fixtures/agi/12-autodistribution.in");
const FIXTURE_OUT: &[u8] = include_bytes!("../tests/fixtures/agi/12-autodistribution.out");
const PEER_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/benches/peers/agi/panoramisk_server.py"
);

fn header() -> &'static [u8] {
    let end = FIXTURE_IN
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + 2)
        .unwrap_or(FIXTURE_IN.len());
    &FIXTURE_IN[..end]
}

struct Opts {
    secs: f64,
    concurrency: usize,
    python: bool,
    server_threads: usize,
    gen_threads: usize,
    only_kolokol: bool,
    only_trivial: bool,
    /// Server threads (and panoramisk) on CPU 0, generator threads on CPU 1.
    pin: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        secs: 5.0,
        concurrency: 50,
        python: true,
        // One core's worth of server (like single-threaded panoramisk); the generator
        // gets two threads so that it is not the first thing to saturate.
        server_threads: 1,
        gen_threads: 2,
        only_kolokol: false,
        only_trivial: false,
        pin: false,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--secs" => {
                o.secs = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(o.secs);
                i += 1;
            }
            "--concurrency" => {
                o.concurrency = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(o.concurrency);
                i += 1;
            }
            "--no-python" => o.python = false,
            "--only-kolokol" => o.only_kolokol = true,
            "--only-trivial" => o.only_trivial = true,
            "--pin" => o.pin = true,
            "--server-threads" => {
                o.server_threads = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(1);
                i += 1;
            }
            "--gen-threads" => {
                o.gen_threads = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(1);
                i += 1;
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    o
}

/// One fake-Asterisk session; `Ok(true)` when the server said exactly fixture 12's lines.
async fn session(addr: SocketAddr) -> std::io::Result<bool> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(1024, r);
    w.write_all(header()).await?;
    let mut got = Vec::with_capacity(96);
    loop {
        let before = got.len();
        let n = r.read_until(b'\n', &mut got).await?;
        if n == 0 {
            break;
        }
        if got[before..].ends_with(b"\n") {
            w.write_all(b"200 result=1\n").await?;
        }
    }
    // Asterisk's AGISIGHUP line after the script ended; the server may be gone already.
    let _ = w.write_all(b"HANGUP\n").await;
    Ok(got == FIXTURE_OUT)
}

struct Stats {
    name: String,
    sessions: usize,
    errors: usize,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.sessions as f64 / self.secs
    }
}

async fn load(name: &str, addr: SocketAddr, o: &Opts) -> Stats {
    // Warm-up: connections, caches, the peer's interpreter.
    let warm_until = Instant::now() + Duration::from_millis(500);
    let mut warm = Vec::new();
    for _ in 0..o.concurrency {
        warm.push(tokio::spawn(async move {
            while Instant::now() < warm_until {
                let _ = session(addr).await;
            }
        }));
    }
    for w in warm {
        let _ = w.await;
    }

    let start = Instant::now();
    let until = start + Duration::from_secs_f64(o.secs);
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(200_000);
            let mut errors = 0usize;
            while Instant::now() < until {
                let t0 = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), session(addr)).await {
                    Ok(Ok(true)) => lat.push(t0.elapsed().as_micros() as u64),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)]
        }
    };
    Stats {
        name: name.to_string(),
        sessions: all.len(),
        errors,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Open-loop latency: start one session every `1/rate` s for `secs`, whatever the
/// server does, and report p50/p99 connect-to-close (unlike the closed loop above, where
/// latency is bounded below by concurrency / throughput).
async fn paced(addr: SocketAddr, rate: u32, secs: f64) -> (u64, u64, usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let n = (rate as f64 * secs) as usize;
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            match tokio::time::timeout(Duration::from_secs(5), session(addr)).await {
                Ok(Ok(true)) => Some(t0.elapsed().as_micros() as u64),
                _ => None,
            }
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Some(l)) => lat.push(l),
            _ => errors += 1,
        }
    }
    lat.sort_unstable();
    if lat.is_empty() {
        return (0, 0, errors);
    }
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    (p(0.5), p(0.99), errors)
}

/// The generator's ceiling: read the header, write the canned lines, close.
async fn trivial_server(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == b"\n" => break,
                    Ok(_) => {}
                }
            }
            for cmd in FIXTURE_OUT.split_inclusive(|b| *b == b'\n') {
                if w.write_all(cmd).await.is_err() {
                    return;
                }
                line.clear();
                if r.read_until(b'\n', &mut line).await.is_err() {
                    return;
                }
            }
            let _ = w.shutdown().await;
            let mut rest = [0u8; 64];
            let _ = r.read(&mut rest).await;
        });
    }
}

struct Table;

impl ResponsibleLookup for Table {
    fn find_responsible<'a>(
        &'a self,
        _phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, LookupError>> {
        Box::pin(async { Ok(None) })
    }
}

/// kolokol's server, cache warmed with fixture 12's caller (every session is a hit).
fn start_kolokol(rt: &tokio::runtime::Runtime) -> SocketAddr {
    rt.block_on(async {
        let config = AgiConfig {
            listen: "127.0.0.1:0".into(),
            name_variable: "CALLERID(name)".into(),
            ..AgiConfig::default()
        };
        let cache = Arc::new(ResponsibleCache::from_config(&config));
        cache.warm(
            "79161234567",
            Responsible {
                extension: "102".into(),
                name: "Ivan Petrov".into(),
                entity: serde_json::Value::Null,
            },
        );
        let auto = Arc::new(
            Autodistributor::new(&config, Arc::new(Table), cache, Arc::new(NoCustomizations))
                // A default install: no autodistribution customization script.
                .with_customization(false),
        );
        let server = AgiServer::bind(&config)
            .await
            .expect("bind 127.0.0.1:0")
            .route(
                "autodistribution",
                Arc::new(AutodistHandler::new(&config, auto)),
            );
        let addr = server.local_addr().expect("local addr");
        rt.spawn(server.run(CancellationToken::new()));
        addr
    })
}

fn start_trivial(rt: &tokio::runtime::Runtime) -> SocketAddr {
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        rt.spawn(trivial_server(l));
        a
    })
}

/// Install panoramisk into a temp dir (or reuse AGI_BENCH_PYTHONPATH), start the peer.
/// The running peer; its stdout pipe stays open as long as it runs.
struct Peer {
    child: std::process::Child,
    _stdout: std::process::ChildStdout,
    _dir: Option<tempfile::TempDir>,
}

/// Keep the calling thread on one CPU (for `--pin`).
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; the calls only read and write the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("cannot pin a thread to CPU {cpu}");
        }
    }
}

fn start_panoramisk(pin: bool) -> Result<(Peer, SocketAddr), String> {
    let (path, keep) = match std::env::var("AGI_BENCH_PYTHONPATH") {
        Ok(p) => (std::path::PathBuf::from(p), None),
        Err(_) => {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            eprintln!("installing panoramisk into {} ...", dir.path().display());
            let st = std::process::Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(dir.path())
                .arg("panoramisk==1.4")
                .status()
                .map_err(|e| format!("python3 -m pip: {e}"))?;
            if !st.success() {
                return Err("pip install panoramisk failed".into());
            }
            (dir.path().to_path_buf(), Some(dir))
        }
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let mut cmd = if pin {
        // The peer gets the server's CPU, like kolokol's server threads.
        let mut c = std::process::Command::new("taskset");
        c.args(["-c", "0", "python3"]);
        c
    } else {
        std::process::Command::new("python3")
    };
    let mut child = cmd
        .arg(PEER_SCRIPT)
        .arg(port.to_string())
        .env("PYTHONPATH", &path)
        .env("PYTHONWARNINGS", "ignore")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut buf = [0u8; 16];
    use std::io::Read;
    let n = out.read(&mut buf).map_err(|e| e.to_string())?;
    if !buf[..n].starts_with(b"ready") {
        let _ = child.kill();
        return Err("panoramisk server did not start".into());
    }
    Ok((
        Peer {
            child,
            _stdout: out,
            _dir: keep,
        },
        SocketAddr::from(([127, 0, 0, 1], port)),
    ))
}

/// CPU seconds (user + system) used by the threads of `pid` whose name starts with
/// `prefix` (all threads when empty), from /proc.
fn cpu_secs(pid: u32, prefix: &str) -> f64 {
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ppid ... utime stime": comm may contain spaces, so split at ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // After the comm: state is field 0, utime field 11, stime field 12.
        if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
            total += u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0);
        }
    }
    total as f64 / tick
}

/// Run the load against `addr` and note the server's CPU time per session.
fn measure(
    gen_rt: &tokio::runtime::Runtime,
    name: &str,
    addr: SocketAddr,
    o: &Opts,
    server: (u32, &str),
) -> (Stats, f64, f64) {
    let me = std::process::id();
    let (s0, g0) = (cpu_secs(server.0, server.1), cpu_secs(me, "gen"));
    let stats = gen_rt.block_on(load(name, addr, o));
    let (s1, g1) = (cpu_secs(server.0, server.1), cpu_secs(me, "gen"));
    // Warm-up sessions are included in the CPU delta, so count them too (approximately:
    // the warm-up runs 0.5 s at the measured rate).
    let n = (stats.sessions as f64 * (1.0 + 0.5 / stats.secs)).max(1.0);
    (stats, (s1 - s0) * 1e6 / n, (g1 - g0) * 1e6 / n)
}

fn main() {
    let o = opts();
    // Separate runtimes (named threads, for the CPU accounting): the servers must not
    // share worker threads with the generator.
    let pin = o.pin;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.server_threads)
        .thread_name("srv")
        .on_thread_start(move || {
            if pin {
                pin_to(0)
            }
        })
        .enable_all()
        .build()
        .expect("server runtime");
    let gen_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.gen_threads)
        .thread_name("gen")
        .on_thread_start(move || {
            if pin {
                pin_to(1)
            }
        })
        .enable_all()
        .build()
        .expect("generator runtime");

    let trivial = start_trivial(&server_rt);
    let ours = start_kolokol(&server_rt);
    println!(
        "FastAGI load: {} concurrent sessions, {:.0} s per target, fixture 12 script, cache hits; \
         {} server / {} generator threads; load average {}",
        o.concurrency,
        o.secs,
        o.server_threads,
        o.gen_threads,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    let me = std::process::id();
    let mut results = vec![
        measure(
            &gen_rt,
            "trivial Rust server (generator ceiling)",
            trivial,
            &o,
            (me, "srv"),
        ),
        measure(&gen_rt, "kolokol", ours, &o, (me, "srv")),
    ];
    // Open loop: latency at a given offered load, up to near the closed-loop ceiling.
    let rates = [500u32, 5_000, 10_000, 20_000];
    let mut paced_rows: Vec<(&str, u32, (u64, u64, usize))> = rates
        .iter()
        .map(|&r| ("kolokol", r, gen_rt.block_on(paced(ours, r, 2.0))))
        .collect();
    if o.python {
        match start_panoramisk(o.pin) {
            Ok((mut peer, addr)) => {
                let pid = peer.child.id();
                results.push(measure(
                    &gen_rt,
                    "panoramisk 1.4 (Python asyncio)",
                    addr,
                    &o,
                    (pid, ""),
                ));
                for &r in rates.iter().filter(|&&r| r <= 5_000) {
                    paced_rows.push(("panoramisk", r, gen_rt.block_on(paced(addr, r, 2.0))));
                }
                let _ = peer.child.kill();
                let _ = peer.child.wait();
            }
            Err(e) => eprintln!("panoramisk skipped: {e}"),
        }
    }

    println!();
    println!(
        "| server | sessions/s | p50 | p99 | server CPU/session | generator CPU/session | server cores busy | generator cores busy | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (s, srv_us, gen_us) in &results {
        println!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.0} µs | {:.0} µs | {:.2} | {:.2} | {} |",
            s.name,
            s.rate(),
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0,
            srv_us,
            gen_us,
            srv_us * s.rate() / 1e6,
            gen_us * s.rate() / 1e6,
            s.errors
        );
    }
    println!();
    println!("Open loop, sessions started at a fixed rate for 2 s:");
    println!("| server | offered sessions/s | p50 | p99 | errors |");
    println!("|---|---:|---:|---:|---:|");
    for (name, rate, (p50, p99, errors)) in &paced_rows {
        println!(
            "| {name} | {rate} | {:.2} ms | {:.2} ms | {errors} |",
            *p50 as f64 / 1000.0,
            *p99 as f64 / 1000.0
        );
    }
    let (ours, our_cpu, _) = &results[1];
    println!();
    println!(
        "generator ceiling / kolokol sessions/s: {:.2}x",
        results[0].0.rate() / ours.rate().max(1.0)
    );
    if let Some((py, py_cpu, _)) = results.get(2) {
        println!(
            "kolokol / panoramisk: {:.1}x sessions/s, p99 {:.1}x lower, {:.1}x less server CPU per session",
            ours.rate() / py.rate().max(1.0),
            py.p99_us as f64 / (ours.p99_us.max(1)) as f64,
            py_cpu / our_cpu.max(0.001)
        );
    }
}
