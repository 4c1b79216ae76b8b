//! `kolokol convert` as an admin runs it: a real child process.

use std::path::Path;
use std::process::Command;

fn kolokol() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kolokol"))
}

#[test]
fn convert_writes_an_mp3_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/recordings/out-20261121-234919-79161234567-1795304959.20.wav");
    let dst = tmp.path().join("out.mp3");
    let out = kolokol()
        .args([
            "convert",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--bitrate",
            "24",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pcm_s16le 8000 Hz 1 ch, 3.00 s of audio"),
        "{stdout}"
    );
    // 24 kbit/s for 3 s = 9000 bytes, plus the tag frame and the flush.
    let len = std::fs::metadata(&dst).unwrap().len();
    assert!((8_500..11_000).contains(&len), "{len} bytes");
    let head = std::fs::read(&dst).unwrap();
    assert_eq!(&head[..2], &[0xFF, 0xE3], "MPEG 2.5 layer III frame sync");
}

#[test]
fn convert_failures_exit_nonzero_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("notes.wav");
    std::fs::write(&bad, "not audio").unwrap();
    let dst = tmp.path().join("x.mp3");
    let cases: [(&[&str], &str); 3] = [
        (
            &[bad.to_str().unwrap(), dst.to_str().unwrap()],
            "cannot be decoded",
        ),
        (
            &["/nonexistent/in.wav", dst.to_str().unwrap()],
            "/nonexistent/in.wav",
        ),
        (
            &[
                bad.to_str().unwrap(),
                dst.to_str().unwrap(),
                "--bitrate",
                "33",
            ],
            "bitrate_kbps",
        ),
    ];
    for (args, want) in cases {
        let out = kolokol().arg("convert").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!dst.exists());
    }
}
