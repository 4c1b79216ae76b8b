//! The annotated example config that ships in `etc/kolokol/config.toml` is valid, and
//! means what its comments say.

use std::path::Path;

use kolokol::config::Config;

#[test]
fn shipped_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/kolokol/config.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ami.port, 5038);
    assert_eq!(c.ami.auth, kolokol::ami::AmiAuth::Md5);
    assert_eq!(c.http.listen, "127.0.0.1:8088");
    assert!(c.kommo.is_some());
    assert!(c.bitrix24.is_some());
    assert_eq!(c.storage.state_dir, Path::new("/var/lib/kolokol"));
}

#[test]
fn a_typo_in_the_example_is_named_with_its_key_path() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/kolokol/config.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("task_deadline", "task_deadlin");
    let err = Config::from_toml(&text, &path).unwrap_err().to_string();
    assert!(err.contains("kommo"), "{err}");
    assert!(err.contains("task_deadlin"), "{err}");
}
