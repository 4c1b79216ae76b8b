//! `Recordings::finish`, the daemon's entry point: from the path the PBX reported to a file
//! and a working signed link, with every fallback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kolokol::records::{RecordError, Recordings, RecordsConfig};
use tokio::io::AsyncWriteExt;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/recordings")
}

const IN_NAME: &str = "in-20261121-234741-79161234567-1795304861.0.wav";
const OUT_NAME: &str = "out-20261121-234919-79161234567-1795304959.20.wav";

struct Env {
    tmp: tempfile::TempDir,
    monitor: PathBuf,
    state: PathBuf,
    cfg: RecordsConfig,
}

/// A monitor folder as kolokol sees it (a "mount" at another path than the PBX's), a
/// state folder, and fast settle/appear times.
fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let monitor = tmp.path().join("mnt/monitor");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&monitor).unwrap();
    let cfg = RecordsConfig {
        dir: monitor.clone(),
        pbx_dir: "/var/spool/asterisk/monitor".into(),
        settle: Duration::from_millis(120),
        appear_timeout: Duration::from_millis(300),
        wait_max: Duration::from_secs(5),
        ..RecordsConfig::default()
    };
    Env {
        tmp,
        monitor,
        state,
        cfg,
    }
}

async fn serve(rec: &Recordings) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = rec.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbx_path_is_mapped_converted_and_served() {
    let e = env();
    std::fs::copy(fixtures_dir().join(IN_NAME), e.monitor.join(IN_NAME)).unwrap();
    // The address is only known after binding, so build twice: once to bind, once with
    // the real public URL (both share the state dir and therefore the secret).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = Recordings::new(&e.cfg, &e.state, &format!("http://{addr}/")).unwrap();
    let app = rec.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // As in fixture 01: VarSet MIXMONITOR_FILENAME holds the PBX's absolute path.
    let reported = format!("/var/spool/asterisk/monitor/{IN_NAME}");
    let out = rec.finish("1795304861.0", &reported).await.unwrap();
    assert!(out.converted, "{out:?}");
    assert_eq!(out.fallback, None);
    assert_eq!(out.id, "in-20261121-234741-79161234567-1795304861.0");
    assert_eq!(
        out.file,
        e.state.join("records").join(format!("{}.mp3", out.id))
    );
    assert!(
        out.link.starts_with(&format!("http://{addr}/records/")),
        "{}",
        out.link
    );
    assert!(out.link.ends_with(".mp3"));
    assert!(!out.link.contains("//records"));
    assert!(
        e.monitor.join(IN_NAME).exists(),
        "keep_wav defaults to true"
    );

    let r = reqwest::get(&out.link).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        &std::fs::read(&out.file).unwrap()[..]
    );

    // The secret was generated once and kept: a new instance verifies old links.
    let again = Recordings::new(&e.cfg, &e.state, "http://x").unwrap();
    let token = out
        .link
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".mp3");
    assert_eq!(again.signer().verify(token), Ok(out.id.clone()));

    // A bare name (CDR userfield) resolves against dir too.
    std::fs::copy(fixtures_dir().join(OUT_NAME), e.monitor.join(OUT_NAME)).unwrap();
    let out2 = rec.finish("1795304959.20", OUT_NAME).await.unwrap();
    assert!(out2.converted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconvertible_recording_falls_back_to_the_original() {
    let e = env();
    // A GSM-in-WAV header is enough for symphonia to refuse the codec.
    let mut gsm = Vec::new();
    gsm.extend_from_slice(b"RIFF");
    gsm.extend_from_slice(&(4 + 8 + 20 + 8 + 650u32).to_le_bytes());
    gsm.extend_from_slice(b"WAVEfmt ");
    gsm.extend_from_slice(&20u32.to_le_bytes());
    for v in [0x31u16, 1] {
        gsm.extend_from_slice(&v.to_le_bytes());
    }
    gsm.extend_from_slice(&8000u32.to_le_bytes());
    gsm.extend_from_slice(&1625u32.to_le_bytes());
    for v in [65u16, 0, 2, 320] {
        gsm.extend_from_slice(&v.to_le_bytes());
    }
    gsm.extend_from_slice(b"data");
    gsm.extend_from_slice(&650u32.to_le_bytes());
    gsm.extend(std::iter::repeat_n(0x5Au8, 650));
    let src = e.monitor.join("in-gsm-1.wav");
    std::fs::write(&src, &gsm).unwrap();

    let rec = Recordings::new(&e.cfg, &e.state, "http://placeholder").unwrap();
    let addr = serve(&rec).await;
    let out = rec.finish("1.1", src.to_str().unwrap()).await.unwrap();
    assert!(!out.converted);
    let why = out.fallback.clone().unwrap();
    assert!(why.contains("cannot be decoded"), "{why}");
    assert_eq!(out.file, std::fs::canonicalize(&src).unwrap());
    assert!(out.link.ends_with(".wav"), "{}", out.link);
    assert_eq!(std::fs::read(&src).unwrap(), gsm, "original kept intact");
    // The link serves the original bytes.
    let path = out.link.trim_start_matches("http://placeholder");
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &gsm[..]);
}

#[tokio::test]
async fn missing_outside_and_empty_recordings_are_errors() {
    let e = env();
    let rec = Recordings::new(&e.cfg, &e.state, "http://x").unwrap();

    // Fixture 02: the CDR names a recording that was never made.
    let t = Instant::now();
    let err = rec
        .finish(
            "1795304872.2",
            "in-20261121-234752-79161234567-1795304872.2.wav",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RecordError::NotFound { .. }), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "bounded by appear_timeout"
    );

    // A real file outside [records] dir is never read or served.
    let outside = e.tmp.path().join("elsewhere.wav");
    std::fs::copy(fixtures_dir().join(IN_NAME), &outside).unwrap();
    let err = rec
        .finish("x", outside.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, RecordError::OutsideDir { .. }), "{err:?}");
    // Nor through a symlink inside it.
    #[cfg(unix)]
    {
        let link = e.monitor.join("sneaky.wav");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let err = rec.finish("x", "sneaky.wav").await.unwrap_err();
        assert!(matches!(err, RecordError::OutsideDir { .. }), "{err:?}");
    }
    // `..` in a reported path is not followed.
    let err = rec.finish("x", "../elsewhere.wav").await.unwrap_err();
    assert!(matches!(err, RecordError::NotFound { .. }), "{err:?}");

    let empty = e.monitor.join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    let err = rec.finish("x", "empty.wav").await.unwrap_err();
    assert!(matches!(err, RecordError::Empty { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_until_asterisk_stops_writing() {
    let e = env();
    let full = std::fs::read(fixtures_dir().join(IN_NAME)).unwrap();
    let path = e.monitor.join(IN_NAME);
    // Asterisk writes the header first and the audio in pieces; the last write lands
    // ~400 ms after we are told the call ended.
    let mut f = tokio::fs::File::create(&path).await.unwrap();
    f.write_all(&full[..44]).await.unwrap();
    f.flush().await.unwrap();
    let writer = tokio::spawn(async move {
        for chunk in full[44..].chunks(8000) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            f.write_all(chunk).await.unwrap();
            f.flush().await.unwrap();
        }
    });
    // Settle is 8x the write interval so a loaded CI machine cannot fake a pause.
    let cfg = RecordsConfig {
        settle: Duration::from_millis(400),
        ..e.cfg.clone()
    };
    let rec = Recordings::new(&cfg, &e.state, "http://x").unwrap();
    let out = rec.finish("1795304861.0", IN_NAME).await.unwrap();
    assert!(writer.is_finished(), "finished before the writer did");
    assert!(out.converted, "{out:?}");
    // The mp3 covers the whole 4 s, not the part written when we were called.
    let bytes = std::fs::metadata(&out.file).unwrap().len();
    assert!(bytes > 15_000, "{bytes} bytes: converted a partial file?");

    // A file that never stops growing is given up on at wait_max.
    let cfg = RecordsConfig {
        settle: Duration::from_millis(400),
        wait_max: Duration::from_millis(1000),
        ..e.cfg.clone()
    };
    let rec = Recordings::new(&cfg, &e.state, "http://x").unwrap();
    let growing = e.monitor.join("growing.wav");
    let mut g = tokio::fs::File::create(&growing).await.unwrap();
    let stop = tokio::spawn(async move {
        loop {
            if g.write_all(&[0u8; 160]).await.is_err() {
                break;
            }
            let _ = g.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let err = rec.finish("y", "growing.wav").await.unwrap_err();
    stop.abort();
    assert!(matches!(err, RecordError::StillGrowing { .. }), "{err:?}");
}
