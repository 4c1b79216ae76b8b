//! The admin page in a real headless Chromium, against the real `kolokol run` binary in
//! the demo world (simulated PBX over TCP, sandbox Kommo and Bitrix24 over HTTP): log
//! in through the form, see a demo call appear in the recent calls, make a Kommo job
//! die (the sandbox rejects the call note with 400), click Retry, see it leave `dead`.
//!
//! Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! NUL-separated JSON on fds 3 and 4), so no WebDriver or WebSocket client is needed.
//! Without a Chromium binary the test prints why and passes; CI installs `chromium`.
//! `KOLOKOL_CHROMIUM=/path/to/chrome` picks a specific binary.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use kolokol::sandbox::demo::{DEMO_ADMIN_PASSWORD, DemoWorld, SCENARIOS};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KOLOKOL_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed on drop (also when an assertion fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A DevTools protocol connection to one page of a headless Chromium.
struct Browser {
    _child: Killed,
    to_browser: File,
    from_browser: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // O_CLOEXEC: only the dup2'ed copies (3 and 4) reach Chromium.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2 failed");
    (fds[0], fds[1])
}

impl Browser {
    fn launch(chromium: &Path, profile: &Path) -> Browser {
        let (cmd_read, cmd_write) = pipe();
        let (resp_read, resp_write) = pipe();
        let mut command = Command::new(chromium);
        command
            .args([
                "--headless",
                "--no-sandbox", // CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--window-size=1280,900",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            command.pre_exec(move || {
                // Chromium reads commands on fd 3 and writes answers on fd 4.
                for (from, to) in [(cmd_read, 3), (resp_write, 4)] {
                    if from == to {
                        libc::fcntl(to, libc::F_SETFD, 0);
                    } else if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = Killed(command.spawn().expect("chromium starts"));
        unsafe {
            libc::close(cmd_read);
            libc::close(resp_write);
        }
        let to_browser = unsafe { File::from_raw_fd(cmd_write) };
        let reader = unsafe { File::from_raw_fd(resp_read) };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            _child: child,
            to_browser,
            from_browser: rx,
            next_id: 0,
            session: None,
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .expect("a page");
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .expect("attached");
        b.session = Some(attached["sessionId"].as_str().expect("sessionId").into());
        b.call("Page.enable", json!({})).expect("Page.enable");
        b
    }

    /// One DevTools command; `Err` carries the protocol error.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .map_err(|e| format!("chromium pipe: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from_browser
                .recv_timeout(left)
                .map_err(|_| format!("no answer to {method}"))?;
            if v["id"].as_u64() != Some(id) {
                continue; // an event
            }
            if let Some(e) = v.get("error") {
                return Err(e.to_string());
            }
            return Ok(v["result"].clone());
        }
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}))
            .expect("navigate");
    }

    /// Evaluate `js` in the page; `None` while the page is (re)loading or on a JS error.
    fn eval(&mut self, js: &str) -> Option<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true}),
            )
            .ok()?;
        if r.get("exceptionDetails").is_some() {
            return None;
        }
        Some(r["result"]["value"].clone())
    }

    /// Wait until `js` evaluates to something truthy (not null/false/0/""); return it.
    fn wait_for(&mut self, what: &str, limit: Duration, js: &str) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.eval(js) {
                let truthy = match &v {
                    Value::Null => false,
                    Value::Bool(b) => *b,
                    Value::Number(n) => n.as_f64() != Some(0.0),
                    Value::String(s) => !s.is_empty(),
                    _ => true,
                };
                if truthy {
                    return v;
                }
            }
            if start.elapsed() > limit {
                let html = self
                    .eval("document.documentElement.outerHTML")
                    .unwrap_or_default();
                panic!("timed out waiting for {what}; page:\n{html}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        if let Ok(r) = self.call("Page.captureScreenshot", json!({"format": "png"})) {
            if let Some(data) = r["data"].as_str() {
                if let Ok(png) = base64::engine::general_purpose::STANDARD.decode(data) {
                    let _ = std::fs::write(path, png);
                }
            }
        }
    }
}

#[test]
fn admin_page_login_call_appears_dead_job_retried() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "SKIPPED admin_browser: no chromium binary on PATH (apt install chromium, or set KOLOKOL_CHROMIUM)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let world = rt
        .block_on(DemoWorld::start(dir.path()))
        .expect("demo world");
    let http = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.toml");
    std::fs::write(&config, world.config_toml(&http)).expect("config");
    // The first call note Kommo receives is rejected: that job dies at once.
    world.kommo.fail_path("/api/v4/calls", 1, 400);

    let log = dir.path().join("daemon.log");
    let _daemon = Killed(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("kolokol starts"),
    );
    assert!(
        rt.block_on(world.ami.wait_logged_in(1, Duration::from_secs(20))),
        "daemon logs in to AMI: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let profile = dir.path().join("chromium-profile");
    let mut b = Browser::launch(&chromium, &profile);
    let base = format!("http://{http}");

    // Not logged in: the page sends us to the form. A wrong password is refused.
    b.goto(&format!("{base}/admin"));
    b.wait_for(
        "the login form",
        Duration::from_secs(10),
        "document.querySelector('#password') !== null",
    );
    b.eval(
        "document.querySelector('#password').value = 'wrong'; document.querySelector('#login').click(); true",
    );
    b.wait_for(
        "the wrong-password message",
        Duration::from_secs(10),
        "document.querySelector('#error') && document.querySelector('#error').textContent",
    );
    b.eval(&format!(
        "document.querySelector('#password').value = '{DEMO_ADMIN_PASSWORD}'; document.querySelector('#login').click(); true"
    ));
    b.wait_for(
        "the admin page after login",
        Duration::from_secs(10),
        "document.querySelector('#recent') !== null && location.pathname === '/admin'",
    );

    // A demo call (inbound, answered, recorded) plays on the simulated PBX.
    let scenario = &SCENARIOS[0];
    rt.block_on(world.play(scenario, 50.0));
    let row = b.wait_for(
        "the demo call in the recent calls table",
        Duration::from_secs(20),
        "(() => { const r = document.querySelector('#recent tr.call'); return r ? r.textContent : ''; })()",
    );
    let row = row.as_str().unwrap_or_default().to_string();
    assert!(row.contains("inbound"), "{row}");
    assert!(row.contains("mp3"), "recording link shown: {row}");

    // Its Kommo job was rejected: dead, with a Retry button.
    let dead_id = b.wait_for(
        "a dead job with a Retry button",
        Duration::from_secs(20),
        "(() => { const r = document.querySelector('#jobs tr.job.dead'); return r && r.querySelector('button.retry') ? r.cells[0].textContent : ''; })()",
    );
    let dead_id = dead_id.as_str().unwrap_or_default().to_string();
    let screenshot = std::env::temp_dir().join("kolokol-admin-browser.png");
    b.screenshot(&screenshot);
    eprintln!("admin page screenshot: {}", screenshot.display());

    b.eval(&format!(
        "(() => {{ for (const r of document.querySelectorAll('#jobs tr.job')) {{ if (r.cells[0].textContent === '{dead_id}') {{ r.querySelector('button.retry').click(); return true; }} }} return false; }})()"
    ));
    let state = b.wait_for(
        "the retried job to leave the dead state",
        Duration::from_secs(20),
        &format!(
            "(() => {{ for (const r of document.querySelectorAll('#jobs tr.job')) {{ if (r.cells[0].textContent === '{dead_id}') {{ const s = r.cells[5].textContent; return s === 'dead' ? '' : s; }} }} return 'gone'; }})()"
        ),
    );
    assert_ne!(state, json!("dead"));
    // And the retry really delivered: Kommo accepted a call note after the rejection.
    let start = Instant::now();
    while world.kommo.snapshot().count("POST", "/api/v4/calls", 200) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Kommo never got the retried call note: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        world.kommo.snapshot().count("POST", "/api/v4/calls", 400),
        1
    );
}
