//! `kolokol ami tail` as the real binary against the fake Asterisk.

use std::process::Stdio;
use std::time::Duration;

use kolokol::ami::codec::parse_messages;
use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions, Replay};
use tokio::process::Command;
use tokio::time::timeout;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ami");
const LIMIT: Duration = Duration::from_secs(30);

fn write_config(dir: &tempfile::TempDir, port: u16, secret: &str) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    let text = format!(
        "[ami]\nhost = \"127.0.0.1\"\nport = {port}\nusername = \"crm\"\nsecret = \"{secret}\"\nauth = \"md5\"\nreconnect_min = \"50ms\"\n"
    );
    std::fs::write(&path, text).expect("write config");
    path
}

async fn run_tail(config: &std::path::Path, max: u32) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_kolokol"))
        .args(["ami", "tail", "--config"])
        .arg(config)
        .args(["--max", &max.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kolokol");
    timeout(LIMIT, child.wait_with_output())
        .await
        .expect("kolokol exits in time")
        .expect("output")
}

#[tokio::test]
async fn tail_prints_each_event_as_one_json_line() {
    let replay = Replay::from_fixture(format!("{FIX}/14-ami-protocol.ami"))
        .expect("fixture")
        .timed(false);
    let expected = parse_messages(replay.bytes());
    let fake = FakeAmi::start(FakeAmiOptions {
        on_login: Some(replay),
        ..FakeAmiOptions::default()
    })
    .await
    .expect("fake AMI");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, fake.local_addr().port(), "crm-secret-123");
    let out = run_tail(&config, 40).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 40);
    assert_eq!(lines[0]["Event"], "FullyBooted");
    for (got, want) in lines[1..].iter().zip(&expected) {
        assert_eq!(got, &want.to_json());
    }
    assert!(stderr.contains("connected to 127.0.0.1:"), "{stderr}");
    // It logged in with MD5 and logged off at the end.
    let actions = fake.actions();
    assert_eq!(actions[0].get("Action"), Some("Challenge"));
    assert!(actions.iter().any(|a| a.get("Action") == Some("Logoff")));
}

#[tokio::test]
async fn tail_exits_non_zero_when_login_is_refused() {
    let fake = FakeAmi::start(FakeAmiOptions::default())
        .await
        .expect("fake AMI");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, fake.local_addr().port(), "wrong-password");
    let out = run_tail(&config, 5).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("login refused for user 'crm'"), "{stderr}");
    assert!(stderr.contains("manager.conf"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn tail_exits_non_zero_when_nothing_listens() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, port, "x");
    let out = run_tail(&config, 5).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to AMI at 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn tail_rejects_a_bad_config_with_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[ami]\nauth = \"sha1\"\n").expect("write");
    let out = run_tail(&path, 1).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ami.auth"), "{stderr}");
}
