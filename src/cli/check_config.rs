//! `kolokol check-config`: validate the config and check everything it points at, the
//! way the daemon would meet it at start — folders, customizations, AMI login and
//! permissions, CRM credentials, listen addresses. One line per check, `OK`, `WARN` or
//! `FAIL` with what to fix; the exit code is non-zero when anything failed.
//!
//! Run it after every config change (and before `systemctl restart kolokol`), ideally as
//! the service user: `sudo -u kolokol kolokol check-config`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::ami::AmiClient;
use crate::ami::message::Message;
use crate::config::{Config, DEFAULT_PATH};
use crate::crm::bitrix24::{self, Bitrix24, MemoryCallIdStore, PathRecords};
use crate::crm::kommo::KommoConnector;
use crate::crm::{MemoryTokenStore, TokenStore};
use crate::hooks::{Customize, Installed, Runner};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArg,
}

/// Exit code when at least one check failed.
const EXIT_FAILED: u8 = 1;
/// No single network check (AMI login, CRM account) may take longer than this.
const NETWORK_LIMIT: Duration = Duration::from_secs(20);

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    /// What was checked, e.g. `ami`, `storage.state_dir`.
    pub what: String,
    /// The finding; for WARN/FAIL it says what to fix.
    pub detail: String,
}

impl Check {
    fn ok(what: &str, detail: impl Into<String>) -> Check {
        Check::new(Level::Ok, what, detail)
    }
    fn warn(what: &str, detail: impl Into<String>) -> Check {
        Check::new(Level::Warn, what, detail)
    }
    fn fail(what: &str, detail: impl Into<String>) -> Check {
        Check::new(Level::Fail, what, detail)
    }
    fn new(level: Level, what: &str, detail: impl Into<String>) -> Check {
        Check {
            level,
            what: what.to_string(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag} {:<22} {}", self.what, self.detail)
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Library log lines (connectors warn about odd mappings) go to stderr, quietly.
    super::init_logging("error", false);
    let path = args
        .config
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let checks = check_all(&path, &mut |c| println!("{c}")).await;
    let fails = checks.iter().filter(|c| c.level == Level::Fail).count();
    let warns = checks.iter().filter(|c| c.level == Level::Warn).count();
    if fails > 0 {
        println!(
            "{fails} check(s) failed, {warns} warning(s): fix the FAIL lines, then run `kolokol check-config` again"
        );
        Ok(ExitCode::from(EXIT_FAILED))
    } else {
        println!("all checks passed ({warns} warning(s))");
        Ok(ExitCode::SUCCESS)
    }
}

/// Every check for the config at `path`, in report order; `emit` sees each line as soon
/// as it is known (network checks can take seconds).
pub async fn check_all(path: &Path, emit: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |c: Check, out: &mut Vec<Check>| {
        emit(&c);
        out.push(c);
    };
    let config = match Config::load(path) {
        Ok(c) => {
            push(
                Check::ok(
                    "config",
                    format!("{} parsed, every key known", path.display()),
                ),
                &mut out,
            );
            c
        }
        Err(e) => {
            push(Check::fail("config", e.to_string()), &mut out);
            return out;
        }
    };
    for c in check_values(&config) {
        push(c, &mut out);
    }
    for c in check_customizations(&config) {
        push(c, &mut out);
    }
    for c in check_folders(&config).await {
        push(c, &mut out);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        push(
            Check::warn(
                "user",
                "running as root, who can write anywhere: run as the service user (`sudo -u kolokol kolokol check-config`) to check its access",
            ),
            &mut out,
        );
    }
    for c in check_listen(&config).await {
        push(c, &mut out);
    }
    push(check_ami(&config).await, &mut out);
    for c in check_crms(&config).await {
        push(c, &mut out);
    }
    out
}

/// Value checks serde cannot express, section by section.
fn check_values(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    match config.calls.validate() {
        Ok(()) => out.push(Check::ok("calls", "values valid")),
        Err(e) => out.push(Check::fail("calls", e.to_string())),
    }
    if config.records.convert {
        match crate::records::ConvertSettings::from_config(&config.records) {
            Ok(_) => out.push(Check::ok(
                "records.convert",
                format!("mp3 at {} kbit/s", config.records.bitrate_kbps),
            )),
            Err(e) => out.push(Check::fail("records", e.to_string())),
        }
    }
    if config.kommo.is_none() && config.bitrix24.is_none() {
        out.push(Check::warn(
            "crm",
            "neither [kommo] nor [bitrix24] is configured: calls are tracked but go to no CRM",
        ));
    }
    match &config.http.admin_password_sha256 {
        Some(h) if h.trim().len() == 64 && h.trim().chars().all(|c| c.is_ascii_hexdigit()) => {
            out.push(Check::ok("http.admin_password", "admin page enabled"))
        }
        Some(_) => out.push(Check::fail(
            "http.admin_password",
            "admin_password_sha256 is not 64 hex digits: set it to the output of `printf %s 'PASSWORD' | sha256sum`",
        )),
        None => out.push(Check::warn(
            "http.admin_password",
            "admin page disabled: set [http] admin_password_sha256 (`printf %s 'PASSWORD' | sha256sum`) to enable it",
        )),
    }
    out
}

/// Customization scripts: each installed one must be executable and unambiguous.
fn check_customizations(config: &Config) -> Vec<Check> {
    let dir = config.customizations.dir.clone();
    if !dir.is_dir() {
        return vec![Check::ok(
            "customizations",
            format!(
                "{} does not exist: no customizations (the defaults apply)",
                dir.display()
            ),
        )];
    }
    let runner = Runner::new(config.customizations.clone());
    let problems = runner.problems();
    let installed: Vec<String> = runner
        .inventory()
        .into_iter()
        .filter(|(_, i, _)| matches!(i, Installed::Found { .. }))
        .map(|(h, _, _)| h.to_string())
        .collect();
    let mut out: Vec<Check> = problems
        .into_iter()
        .map(|p| Check::fail("customizations", p))
        .collect();
    if out.is_empty() {
        let list = if installed.is_empty() {
            "none installed".to_string()
        } else {
            installed.join(", ")
        };
        out.push(Check::ok(
            "customizations",
            format!("{}: {list}", dir.display()),
        ));
    }
    out
}

/// The state folder and the converted-recordings folder must be writable (created if
/// missing, like the daemon does); the PBX recordings folder must be readable.
async fn check_folders(config: &Config) -> Vec<Check> {
    let state_dir = config.storage.state_dir.clone();
    let store_dir = config.records.store_dir(&state_dir);
    let pbx_dir = config.records.dir.clone();
    // Filesystem probes block: keep them off the event loop.
    tokio::task::spawn_blocking(move || {
        vec![
            writable("storage.state_dir", &state_dir),
            writable("records.store_dir", &store_dir),
            readable("records.dir", &pbx_dir),
        ]
    })
    .await
    .unwrap_or_else(|e| vec![Check::fail("folders", format!("check crashed: {e}"))])
}

fn writable(what: &str, dir: &Path) -> Check {
    let existed = dir.is_dir();
    if let Err(e) = create_like_parent(dir) {
        return Check::fail(
            what,
            format!(
                "cannot create {}: {e}: create it and give it to the service user (`install -d -o kolokol -g kolokol {}`)",
                dir.display(),
                dir.display()
            ),
        );
    }
    let probe = dir.join(format!(".kolokol-check-{}", std::process::id()));
    match std::fs::write(&probe, b"probe") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            let created = if existed { "" } else { " (created)" };
            Check::ok(what, format!("{} writable{created}", dir.display()))
        }
        Err(e) => Check::fail(
            what,
            format!(
                "{} is not writable ({e}): `chown -R kolokol:kolokol {}` (and in systemd, list it in ReadWritePaths=)",
                dir.display(),
                dir.display()
            ),
        ),
    }
}

/// `mkdir -p`, giving each folder it creates the owner of the folder it is created in:
/// run as root, it must not leave root-owned folders inside kolokol's state folder that
/// the daemon could then not write.
fn create_like_parent(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_like_parent(parent)?;
        std::fs::create_dir(dir).or_else(|e| {
            // Raced with someone else creating it: fine.
            if dir.is_dir() { Ok(()) } else { Err(e) }
        })?;
        if let Ok(meta) = std::fs::metadata(parent) {
            let _ = std::os::unix::fs::chown(dir, Some(meta.uid()), Some(meta.gid()));
        }
        Ok(())
    } else {
        std::fs::create_dir(dir)
    }
}

fn readable(what: &str, dir: &Path) -> Check {
    match std::fs::read_dir(dir) {
        Ok(_) => Check::ok(what, format!("{} readable", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::warn(
            what,
            format!(
                "{} does not exist: recordings cannot be found until MixMonitor writes there (or fix [records] dir)",
                dir.display()
            ),
        ),
        Err(e) => Check::fail(
            what,
            format!(
                "{} is not readable ({e}): add the kolokol user to the group owning it (`usermod -aG asterisk kolokol`)",
                dir.display()
            ),
        ),
    }
}

/// HTTP and FastAGI listen addresses must be bindable (a running kolokol holding them is
/// reported as a warning, not a failure).
async fn check_listen(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    for (what, addr) in [
        ("http.listen", config.http.listen.as_str()),
        ("agi.listen", config.agi.listen.as_str()),
    ] {
        if addr.trim().is_empty() {
            out.push(Check::ok(what, "disabled"));
            continue;
        }
        out.push(match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => Check::ok(what, format!("{addr} bindable")),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::warn(
                what,
                format!(
                    "{addr} is in use (fine if kolokol itself is running; otherwise find the owner with `ss -ltnp`)"
                ),
            ),
            Err(e) => Check::fail(
                what,
                format!("cannot listen on {addr}: {e}: fix [{}]", section_of(what)),
            ),
        });
    }
    out
}

fn section_of(what: &str) -> &str {
    what.split('.').next().unwrap_or(what)
}

/// Log in with the configured user, then try `CoreShowChannels` (harmless, needs write
/// permission like Originate does) to learn whether the user may send actions.
async fn check_ami(config: &Config) -> Check {
    let mut cfg = config.ami.clone();
    // One attempt is enough here: no long reconnect backoff.
    cfg.reconnect_max = cfg.reconnect_min;
    let addr = cfg.addr();
    let user = cfg.username.clone();
    let action_timeout = cfg.action_timeout;
    let (ami, mut events) = AmiClient::spawn(cfg);
    // Keep the event channel drained so the client never waits on us.
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
    let result = tokio::time::timeout(NETWORK_LIMIT, async {
        let banner = match ami.wait_connected().await {
            Ok(b) => b,
            Err(e) => return Check::fail("ami", e.to_string()),
        };
        let probe = Message::from_pairs(&[("Action", "CoreShowChannels")]);
        match tokio::time::timeout(action_timeout, ami.action(probe)).await {
            Ok(Ok(r)) if r.is_success() => Check::ok(
                "ami",
                format!(
                    "logged in to {addr} as '{user}' ({banner}); actions allowed (resync, click-to-call)"
                ),
            ),
            Ok(Ok(r)) if r.message().is_some_and(|m| m.contains("Permission denied")) => {
                Check::warn(
                    "ami",
                    format!(
                        "logged in to {addr} as '{user}', but actions are denied: no resync after reconnects and no click-to-call; in manager.conf [{user}] set `write = originate,reporting`"
                    ),
                )
            }
            Ok(Ok(r)) => Check::warn(
                "ami",
                format!(
                    "logged in to {addr} as '{user}'; CoreShowChannels answered: {}",
                    r.message().unwrap_or("(no message)")
                ),
            ),
            Ok(Err(e)) => Check::warn("ami", format!("logged in, but CoreShowChannels failed: {e}")),
            Err(_) => Check::warn(
                "ami",
                format!("logged in, but CoreShowChannels got no answer within {action_timeout:?}"),
            ),
        }
    })
    .await
    .unwrap_or_else(|_| {
        Check::fail(
            "ami",
            format!("no login at {addr} within {NETWORK_LIMIT:?}: check [ami] host/port and the firewall"),
        )
    });
    ami.shutdown().await;
    drain.abort();
    result
}

/// CRM credentials: Kommo's account check (token, phone field, users) and Bitrix24's
/// scopes and user directory.
async fn check_crms(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    if config.kommo.is_none() && config.bitrix24.is_none() {
        return out;
    }
    // OAuth tokens live in the state database; read them without creating one.
    let tokens: Arc<dyn TokenStore> = match Store::open_existing(&config.storage) {
        Ok(store) => Arc::new(store),
        Err(_) => Arc::new(MemoryTokenStore::default()),
    };
    let hooks: Arc<dyn Customize> = Arc::new(Runner::new(config.customizations.clone()));
    if let Some(cfg) = &config.kommo {
        let check = match KommoConnector::new(cfg.clone(), tokens.clone(), hooks.clone()) {
            Err(e) => Check::fail("kommo", format!("[kommo]: {e}")),
            Ok(k) => match tokio::time::timeout(NETWORK_LIMIT, k.check_account()).await {
                Ok(Ok(report)) => Check::ok(
                    "kommo",
                    format!(
                        "{}: token accepted, {} user(s), phone field {}{}",
                        cfg.base_url,
                        report.users.len(),
                        report.phone_field_id,
                        if report.unknown_mapped.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; WARNING: [kommo.users] maps to unknown user ids {:?}",
                                report.unknown_mapped
                            )
                        }
                    ),
                ),
                Ok(Err(e)) => Check::fail("kommo", e.to_string()),
                Err(_) => Check::fail(
                    "kommo",
                    format!("{} did not answer within {NETWORK_LIMIT:?}", cfg.base_url),
                ),
            },
        };
        out.push(check);
    }
    if let Some(cfg) = &config.bitrix24 {
        let deps = bitrix24::Deps {
            store: Arc::new(MemoryCallIdStore::default()),
            hooks: hooks.clone(),
            records: Arc::new(PathRecords),
            tokens: tokens.clone(),
        };
        let check = match Bitrix24::new(cfg.clone(), deps) {
            Err(e) => Check::fail("bitrix24", format!("[bitrix24]: {e}")),
            Ok(b) => match tokio::time::timeout(NETWORK_LIMIT, b.check_access()).await {
                Ok(Ok(users)) => Check::ok(
                    "bitrix24",
                    format!("access granted (telephony, crm, user), {users} employee(s)"),
                ),
                Ok(Err(e)) => Check::fail("bitrix24", e.to_string()),
                Err(_) => Check::fail(
                    "bitrix24",
                    format!(
                        "no answer within {NETWORK_LIMIT:?}: check [bitrix24] webhook_url/base_url"
                    ),
                ),
            },
        };
        out.push(check);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn folders_are_created_with_their_parents_owner_and_probed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let nested = dir.path().join("state/records/mp3");
        let check = writable("records.store_dir", &nested);
        assert_eq!(check.level, Level::Ok, "{check}");
        assert!(check.detail.contains("(created)"), "{check}");
        let parent = std::fs::metadata(dir.path()).expect("meta");
        let made = std::fs::metadata(&nested).expect("created");
        assert_eq!((made.uid(), made.gid()), (parent.uid(), parent.gid()));
        assert_eq!(std::fs::read_dir(&nested).expect("dir").count(), 0);
        // Second run: already there.
        assert!(!writable("x", &nested).detail.contains("created"));
    }

    #[test]
    fn a_file_in_the_way_fails_with_the_fix() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").expect("file");
        let check = writable("storage.state_dir", &file.join("sub"));
        assert_eq!(check.level, Level::Fail);
        assert!(check.detail.contains("install -d"), "{check}");
    }
}
