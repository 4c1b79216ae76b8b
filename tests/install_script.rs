//! `systemd/install.sh` into a DESTDIR (files only: no user, no systemctl), twice: the
//! first run installs everything with the right modes, the second (an upgrade) keeps
//! the admin's config and state and replaces the binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");

fn install(root: &Path) -> String {
    let out = Command::new("sh")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/install.sh"))
        .env("DESTDIR", root)
        .env("KOLOKOL_BIN", BIN)
        .output()
        .expect("install.sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_then_upgrade_keeps_config_and_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let first = install(root);
    assert!(
        first.contains("installed /etc/kolokol/config.toml"),
        "{first}"
    );

    let config = root.join("etc/kolokol/config.toml");
    let bin = root.join("usr/local/bin/kolokol");
    let unit = root.join("etc/systemd/system/kolokol.service");
    assert_eq!(mode(&config), 0o640);
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&root.join("var/lib/kolokol")), 0o750);
    assert!(
        root.join("usr/local/share/kolokol/customizations/examples/process_client_phone.py")
            .is_file()
    );
    let unit_text = std::fs::read_to_string(&unit).expect("unit");
    assert!(
        unit_text.contains("ExecStart=/usr/local/bin/kolokol run"),
        "{unit_text}"
    );
    // The installed (stripped) binary runs.
    let out = Command::new(&bin).arg("--version").output().expect("runs");
    assert!(out.status.success());

    // The admin edits the config; the daemon keeps state.
    std::fs::write(&config, "# my settings\n").expect("edit");
    let state = root.join("var/lib/kolokol/kolokol.db");
    std::fs::write(&state, "state").expect("state");

    let second = install(root);
    assert!(second.contains("kept /etc/kolokol/config.toml"), "{second}");
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        "# my settings\n"
    );
    assert_eq!(std::fs::read_to_string(&state).expect("state"), "state");
    assert!(
        root.join("usr/local/share/kolokol/config.toml.example")
            .is_file()
    );
}
