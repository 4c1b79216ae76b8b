//! `kolokol kommo auth|users|check` as an admin runs them, against the sandbox Kommo.

use std::path::Path;

use kolokol::crm::TokenStore;
use kolokol::sandbox::kommo::{self as sb, SandboxKommo};

fn write_config(dir: &Path, base_url: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        r#"
[storage]
state_dir = "{state}"

[kommo]
base_url = "{base_url}"
client_id = "{id}"
client_secret = "{secret}"
redirect_uri = "https://pbx.example.com/kommo/oauth"

[kommo.users]
"101" = 5002
"#,
        state = dir.join("state").display(),
        id = sb::CLIENT_ID,
        secret = sb::CLIENT_SECRET,
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn kolokol(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kolokol"))
        .args(args)
        .output()
        .await
        .expect("kolokol runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn auth_then_users_then_check() {
    let s = SandboxKommo::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &s.base_url());
    let cfg = cfg.to_str().unwrap();

    // Before auth: a clear hint.
    let (ok, _, err) = kolokol(&["kommo", "users", "--config", cfg]).await;
    assert!(!ok);
    assert!(err.contains("kolokol kommo auth --code"), "{err}");

    let (ok, _, err) = kolokol(&["kommo", "auth", "--code", "bad", "--config", cfg]).await;
    assert!(!ok);
    assert!(err.contains("authorization code"), "{err}");

    s.add_auth_code("good-code");
    let (ok, out, err) = kolokol(&["kommo", "auth", "--code", "good-code", "--config", cfg]).await;
    assert!(ok, "{out}{err}");
    let store = kolokol::store::Store::open(&kolokol::store::StorageConfig {
        state_dir: dir.path().join("state"),
        ..Default::default()
    })
    .unwrap();
    let tokens = store.get("kommo").expect("tokens stored");
    assert_eq!(Some(tokens.refresh_token), s.snapshot().refresh_token);

    let (ok, out, err) = kolokol(&["kommo", "users", "--config", cfg]).await;
    assert!(ok, "{err}");
    assert!(out.contains("Boris Sales"), "{out}");
    let line = out.lines().find(|l| l.contains("5002")).unwrap();
    assert!(line.trim_end().ends_with("101"), "{line}");

    let (ok, out, _) = kolokol(&["kommo", "users", "--json", "--config", cfg]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);

    let (ok, out, err) = kolokol(&["kommo", "check", "--config", cfg]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&sb::PHONE_FIELD_ID.to_string()), "{out}");

    s.remove_phone_field();
    let (ok, _, err) = kolokol(&["kommo", "check", "--config", cfg]).await;
    assert!(!ok);
    assert!(err.contains("PHONE"), "{err}");
}
