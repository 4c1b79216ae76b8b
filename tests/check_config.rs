//! The real `kolokol check-config` binary against the simulated PBX (real TCP AMI) and
//! the sandbox CRMs (real HTTP): a good config passes, and each broken thing an admin
//! meets (wrong AMI secret, CRM down, script not executable, state folder not
//! writable, unknown key, read-only AMI user) gives a FAIL/WARN line naming the fix.

use std::path::Path;
use std::process::Output;

use kolokol::sandbox::ami_server::{FakeAmi, FakeAmiOptions, FakeUser};
use kolokol::sandbox::demo::{DEMO_AMI_SECRET, DemoWorld};

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Run `kolokol check-config --config <toml written to dir>`, off the runtime's threads
/// (the sandboxes run on this test's runtime).
async fn check(dir: &Path, name: &str, toml: &str) -> (Output, String) {
    let path = dir.join(name);
    std::fs::write(&path, toml).expect("config written");
    let out = tokio::process::Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .expect("kolokol runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn line<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.get(5..).is_some_and(|rest| rest.starts_with(what)))
        .unwrap_or_else(|| panic!("no `{what}` line in:\n{text}"))
}

async fn demo() -> (tempfile::TempDir, DemoWorld, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let world = DemoWorld::start(dir.path()).await.expect("demo world");
    let toml = world.config_toml(&format!("127.0.0.1:{}", free_port()));
    (dir, world, toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_config_passes_every_check() {
    let (dir, _world, toml) = demo().await;
    let (out, text) = check(dir.path(), "good.toml", &toml).await;
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(line(&text, "config").starts_with("OK"), "{text}");
    assert!(line(&text, "ami").starts_with("OK"), "{text}");
    assert!(line(&text, "ami").contains("as 'kolokol'"), "{text}");
    assert!(line(&text, "kommo").starts_with("OK"), "{text}");
    assert!(line(&text, "bitrix24").starts_with("OK"), "{text}");
    assert!(line(&text, "storage.state_dir").starts_with("OK"), "{text}");
    assert!(line(&text, "http.listen").starts_with("OK"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    // The probe file is cleaned up.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
        .expect("state dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".kolokol-check")
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ami_secret_fails_with_the_fix() {
    let (dir, _world, toml) = demo().await;
    let toml = toml.replace(DEMO_AMI_SECRET, "wrong-secret");
    let (out, text) = check(dir.path(), "bad-secret.toml", &toml).await;
    assert_eq!(out.status.code(), Some(1), "{text}");
    let ami = line(&text, "ami");
    assert!(ami.starts_with("FAIL"), "{text}");
    assert!(ami.contains("login refused"), "{text}");
    assert!(ami.contains("manager.conf"), "{text}");
    // The other checks still ran and passed.
    assert!(line(&text, "kommo").starts_with("OK"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_crm_fails() {
    let (dir, world, toml) = demo().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let toml = toml.replace(&world.kommo.base_url(), &dead);
    let (out, text) = check(dir.path(), "crm-down.toml", &toml).await;
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line(&text, "kommo").starts_with("FAIL"), "{text}");
    assert!(line(&text, "bitrix24").starts_with("OK"), "{text}");
    assert!(line(&text, "ami").starts_with("OK"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_executable_customization_fails_with_chmod_hint() {
    let (dir, _world, toml) = demo().await;
    let hooks = dir.path().join("customizations");
    std::fs::create_dir_all(&hooks).expect("hooks dir");
    let script = hooks.join("process_client_phone.sh");
    std::fs::write(&script, "#!/bin/sh\ncat\n").expect("script");
    let (out, text) = check(dir.path(), "hook.toml", &toml).await;
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "customizations");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains("chmod +x"), "{text}");

    // Fixed: it passes and lists the script.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (out, text) = check(dir.path(), "hook.toml", &toml).await;
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        line(&text, "customizations").contains("process_client_phone"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_state_dir_fails() {
    let (dir, _world, toml) = demo().await;
    // A folder below a regular file can never be created, even by root (CI runs as root,
    // so permission bits alone would not do).
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "x").expect("file");
    let state = dir.path().join("state");
    let bad = blocker.join("state");
    let toml = toml.replace(
        &format!("state_dir = \"{}\"", state.display()),
        &format!("state_dir = \"{}\"", bad.display()),
    );
    let (out, text) = check(dir.path(), "state.toml", &toml).await;
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "storage.state_dir");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains(&bad.display().to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_fails_with_its_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, text) = check(dir.path(), "typo.toml", "[ami]\nhots = \"pbx\"\n").await;
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "config");
    assert!(
        l.starts_with("FAIL") && l.contains("ami") && l.contains("hots"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_ami_user_is_a_warning_about_click_to_call() {
    let (dir, _world, toml) = demo().await;
    let ro = FakeAmi::start(FakeAmiOptions {
        users: vec![FakeUser::new("kolokol", DEMO_AMI_SECRET, true)],
        ..FakeAmiOptions::default()
    })
    .await
    .expect("read-only AMI");
    let port_line = toml
        .lines()
        .find(|l| l.starts_with("port = "))
        .expect("ami port line")
        .to_string();
    let toml = toml.replacen(&port_line, &format!("port = {}", ro.local_addr().port()), 1);
    let (out, text) = check(dir.path(), "ro.toml", &toml).await;
    assert_eq!(out.status.code(), Some(0), "{text}");
    let l = line(&text, "ami");
    assert!(l.starts_with("WARN"), "{text}");
    assert!(
        l.contains("click-to-call") && l.contains("write ="),
        "{text}"
    );
}
