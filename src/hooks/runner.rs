//! Spawning customization scripts: find the file, run it in its own process group with
//! a minimal environment, feed JSON on stdin, read capped stdout/stderr concurrently,
//! enforce the timeout by killing the whole group, and turn the answer into a
//! [`HookOutcome`].

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::metrics::{FailureKind, HookMetrics};
use super::names::{Hook, OnEmpty};
use super::{Customize, HookOutcome, HooksConfig};

/// Largest stdout accepted from a script; more is a failure (`too_large`).
pub const MAX_OUTPUT: usize = 1 << 20;
/// How much of the end of stderr is kept for the log line.
pub const STDERR_TAIL: usize = 2048;
/// `PATH` given to scripts: the standard system directories, nothing from kolokol's own
/// environment.
pub const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `LANG` given to scripts.
pub const SCRIPT_LANG: &str = "C.UTF-8";
/// Longest `name` autodistribution may return: Asterisk's CallerID name limit.
pub const MAX_CALLERID_NAME: usize = 20;

/// After the script exits, how long its pipes may stay open (held by a detached
/// descendant) before kolokol stops reading and uses what it has.
const EXIT_GRACE: Duration = Duration::from_millis(200);
/// After SIGKILL, how long to wait for the kernel to reap the script.
const REAP_GRACE: Duration = Duration::from_secs(1);
/// `ETXTBSY` retries: a script being written (an editor saving, a copy in progress)
/// cannot be executed for a moment.
const TEXT_BUSY_RETRIES: u32 = 5;

/// Why a run did not produce usable data. The message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum HookFailure {
    #[error("not installed (no file named {hook} or {hook}.<ext> in {dir})")]
    NotInstalled { hook: Hook, dir: PathBuf },
    #[error("ambiguous: {first} and {second} both match; keep only one")]
    Ambiguous { first: PathBuf, second: PathBuf },
    #[error("{path} is not executable: run `chmod +x {path}`")]
    NotExecutable { path: PathBuf },
    #[error("cannot start {path}: {source}{hint}")]
    Spawn {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "no free slot within {waited:?}: {max} scripts already running \
         (raise [customizations] max_concurrent or make the scripts faster)"
    )]
    Busy { waited: Duration, max: usize },
    #[error("script failed: {status}")]
    Exit { status: String },
    #[error("timed out after {0:?}; its process group was killed")]
    Timeout(Duration),
    #[error("output is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("state is {state}, not \"success\"{message}")]
    NotSuccess { state: String, message: String },
    #[error("unusable data: {0}")]
    BadData(String),
    #[error("output is larger than {MAX_OUTPUT} bytes")]
    TooLarge,
    #[error("i/o error talking to the script: {0}")]
    Io(io::Error),
}

impl HookFailure {
    /// The metrics counter this failure goes to.
    pub fn kind(&self) -> FailureKind {
        match self {
            HookFailure::NotInstalled { .. } => FailureKind::NotInstalled,
            HookFailure::Ambiguous { .. } => FailureKind::Ambiguous,
            HookFailure::NotExecutable { .. } => FailureKind::NotExecutable,
            HookFailure::Spawn { .. } => FailureKind::Spawn,
            HookFailure::Busy { .. } => FailureKind::Busy,
            HookFailure::Exit { .. } => FailureKind::Exit,
            HookFailure::Timeout(_) => FailureKind::Timeout,
            HookFailure::InvalidJson(_) => FailureKind::InvalidJson,
            HookFailure::NotSuccess { .. } => FailureKind::NotSuccess,
            HookFailure::BadData(_) => FailureKind::BadData,
            HookFailure::TooLarge => FailureKind::TooLarge,
            HookFailure::Io(_) => FailureKind::Io,
        }
    }
}

/// Where a hook's script is, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// No matching file (or the folder does not exist).
    Missing,
    /// Exactly one matching file.
    Found { path: PathBuf, executable: bool },
    /// Two or more files match (`x.sh` and `x.py`): none is run.
    Ambiguous(PathBuf, PathBuf),
}

/// Everything known about one run; the daemon uses `outcome`, `kolokol hook run`
/// prints the rest.
#[derive(Debug)]
pub struct RunReport {
    pub hook: Hook,
    /// The script that ran (None when none was found).
    pub path: Option<PathBuf>,
    pub outcome: HookOutcome,
    /// Why the default is used, when it is.
    pub failure: Option<HookFailure>,
    /// Time from the start of the run (including any wait for a free slot).
    pub elapsed: Duration,
    /// The end of the script's stderr, lossily decoded.
    pub stderr_tail: String,
    /// Things kolokol changed in the data (e.g. `name` cut to 20 characters).
    pub warnings: Vec<String>,
}

/// Runs customization scripts for the daemon. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Runner {
    config: HooksConfig,
    semaphore: Arc<Semaphore>,
    metrics: Arc<HookMetrics>,
}

impl Runner {
    /// A runner for `config`. A relative `dir` is taken from the current directory now,
    /// so later `chdir`s do not matter; `max_concurrent = 0` is treated as 1.
    pub fn new(mut config: HooksConfig) -> Runner {
        if let Ok(abs) = std::path::absolute(&config.dir) {
            config.dir = abs;
        }
        config.max_concurrent = config.max_concurrent.max(1);
        Runner {
            semaphore: Arc::new(Semaphore::new(config.max_concurrent)),
            metrics: Arc::new(HookMetrics::default()),
            config,
        }
    }

    pub fn config(&self) -> &HooksConfig {
        &self.config
    }

    /// The counters of this runner, for `/metrics`.
    pub fn metrics(&self) -> &Arc<HookMetrics> {
        &self.metrics
    }

    /// The timeout for `hook`: `[customizations.timeouts]` or the hook's default.
    pub fn timeout(&self, hook: Hook) -> Duration {
        self.config
            .timeouts
            .get(hook.as_str())
            .copied()
            .unwrap_or_else(|| hook.default_timeout())
    }

    /// Look for `hook`'s script in the customizations folder (blocking: a directory
    /// read; the async paths call it on the blocking pool).
    pub fn locate(&self, hook: Hook) -> Installed {
        locate_in(&self.config.dir, hook)
    }

    /// Every hook with where its script is and its timeout (blocking: reads the folder).
    /// `kolokol hook list` prints this; `check-config` can report its problems.
    pub fn inventory(&self) -> Vec<(Hook, Installed, Duration)> {
        Hook::ALL
            .into_iter()
            .map(|h| (h, self.locate(h), self.timeout(h)))
            .collect()
    }

    /// Installed scripts that cannot run, one sentence each (not executable, two
    /// candidates for one hook). Empty when all is well (absent hooks are fine).
    pub fn problems(&self) -> Vec<String> {
        self.inventory()
            .into_iter()
            .filter_map(|(hook, installed, _)| match installed {
                Installed::Found {
                    path,
                    executable: false,
                } => Some(format!(
                    "customization {hook}: {} is not executable: run `chmod +x {}`",
                    path.display(),
                    path.display()
                )),
                Installed::Ambiguous(a, b) => Some(format!(
                    "customization {hook}: both {} and {} match; keep only one",
                    a.display(),
                    b.display()
                )),
                _ => None,
            })
            .collect()
    }

    /// Run `hook` with `input`, exactly as the daemon does; logs one line on failure
    /// and counts the run. Never panics on anything a script does.
    pub async fn run_hook(&self, hook: Hook, input: &Value, call_id: &str) -> RunReport {
        let started = Instant::now();
        self.metrics
            .runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.config.dir.clone();
        let located = tokio::task::spawn_blocking(move || locate_in(&dir, hook))
            .await
            .unwrap_or(Installed::Missing);
        let mut report = RunReport {
            hook,
            path: None,
            outcome: HookOutcome::Default {
                reason: String::new(),
            },
            failure: None,
            elapsed: Duration::ZERO,
            stderr_tail: String::new(),
            warnings: Vec::new(),
        };
        let result = match located {
            Installed::Missing => Err(HookFailure::NotInstalled {
                hook,
                dir: self.config.dir.clone(),
            }),
            Installed::Ambiguous(first, second) => Err(HookFailure::Ambiguous { first, second }),
            Installed::Found {
                path,
                executable: false,
            } => {
                report.path = Some(path.clone());
                Err(HookFailure::NotExecutable { path })
            }
            Installed::Found { path, .. } => {
                report.path = Some(path.clone());
                let (res, tail) = self.execute(hook, &path, input).await;
                report.stderr_tail = tail;
                res.and_then(|stdout| interpret(hook, &stdout, &mut report.warnings))
            }
        };
        report.elapsed = started.elapsed();
        self.finish(&mut report, result, call_id);
        report
    }

    /// Turn the interpreted result into the outcome, count it and log it.
    fn finish(
        &self,
        report: &mut RunReport,
        result: Result<Interpreted, HookFailure>,
        call_id: &str,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let hook = report.hook.as_str();
        let elapsed_ms = report.elapsed.as_secs_f64() * 1000.0;
        for w in &report.warnings {
            tracing::warn!(hook, call_id, "customization output changed: {w}");
        }
        match result {
            Ok(Interpreted::Data(data)) => {
                self.metrics.succeeded.fetch_add(1, Relaxed);
                tracing::debug!(hook, call_id, elapsed_ms, "customization applied");
                report.outcome = HookOutcome::Data(data);
            }
            Ok(Interpreted::Cancel) => {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                tracing::info!(hook, call_id, elapsed_ms, "cancelled by customization");
                report.outcome = HookOutcome::Cancelled;
            }
            Ok(Interpreted::Empty(reason)) => {
                self.metrics.succeeded.fetch_add(1, Relaxed);
                tracing::info!(
                    hook,
                    call_id,
                    elapsed_ms,
                    "customization {reason}; using the default: {}",
                    report.hook.default_behaviour()
                );
                report.outcome = HookOutcome::Default { reason };
            }
            Err(failure) => {
                self.metrics.count_failure(failure.kind());
                let reason = failure.to_string();
                if matches!(failure, HookFailure::NotInstalled { .. }) {
                    // Most hooks are absent on most systems: not worth a warning.
                    tracing::debug!(hook, call_id, "customization not installed");
                } else {
                    tracing::warn!(
                        hook,
                        call_id,
                        reason = %reason,
                        stderr = %last_lines(&report.stderr_tail, 5),
                        elapsed_ms,
                        "customization failed; using the default: {}",
                        report.hook.default_behaviour()
                    );
                }
                report.outcome = HookOutcome::Default { reason };
                report.failure = Some(failure);
            }
        }
    }

    /// Wait for a slot, spawn, talk, reap. Returns stdout (or the failure) and the
    /// stderr tail.
    async fn execute(
        &self,
        hook: Hook,
        path: &Path,
        input: &Value,
    ) -> (Result<Vec<u8>, HookFailure>, String) {
        let timeout = self.timeout(hook);
        // Waiting for a slot is bounded too: a pile-up of slow scripts must not
        // delay calls without limit.
        let permit =
            match tokio::time::timeout(timeout, self.semaphore.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) | Err(_) => {
                    return (
                        Err(HookFailure::Busy {
                            waited: timeout,
                            max: self.config.max_concurrent,
                        }),
                        String::new(),
                    );
                }
            };
        let input = match serde_json::to_vec(input) {
            Ok(v) => v,
            Err(e) => {
                return (
                    Err(HookFailure::BadData(format!("input: {e}"))),
                    String::new(),
                );
            }
        };
        let mut child = match self.spawn(hook, path).await {
            Ok(c) => c,
            Err(e) => return (Err(e), String::new()),
        };
        self.metrics.enter_running();
        let _running = RunningGuard(&self.metrics);
        let result = talk(&mut child, input, timeout).await;
        drop(permit);
        result
    }

    async fn spawn(&self, hook: Hook, path: &Path) -> Result<tokio::process::Child, HookFailure> {
        let mut attempt = 0;
        loop {
            let mut cmd = tokio::process::Command::new(path);
            cmd.env_clear()
                .env("PATH", SCRIPT_PATH)
                .env("LANG", SCRIPT_LANG)
                .env("KOLOKOL_HOOK", hook.as_str())
                .current_dir(&self.config.dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group, so a timeout can kill everything it started.
                .process_group(0)
                .kill_on_drop(true);
            match cmd.spawn() {
                Ok(child) => return Ok(child),
                Err(e)
                    if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TEXT_BUSY_RETRIES =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(HookFailure::NotExecutable {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) => {
                    let hint = match e.raw_os_error() {
                        Some(libc::ENOENT) => " (the interpreter in its #! line was not found)",
                        Some(libc::ENOEXEC) => " (start the file with a #! line, e.g. #!/bin/sh)",
                        _ => "",
                    };
                    return Err(HookFailure::Spawn {
                        path: path.to_path_buf(),
                        source: e,
                        hint,
                    });
                }
            }
        }
    }
}

impl Customize for Runner {
    fn run<'a>(
        &'a self,
        hook: &'a str,
        input: Value,
        call_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = HookOutcome> + Send + 'a>> {
        Box::pin(async move {
            match Hook::from_name(hook) {
                Some(h) => self.run_hook(h, &input, call_id).await.outcome,
                None => {
                    // A programming error in kolokol, not an admin's: say so loudly.
                    tracing::error!(hook, call_id, "unknown customization hook requested");
                    HookOutcome::Default {
                        reason: format!("unknown hook {hook:?}"),
                    }
                }
            }
        })
    }
}

struct RunningGuard<'a>(&'a HookMetrics);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.leave_running();
    }
}

/// Kills the script's process group if the run is abandoned (timeout, or the caller's
/// future dropped) and once the script has exited (leftover background children).
struct GroupKiller {
    pgid: Option<libc::pid_t>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: killpg only sends a signal; the group is the one spawned for this
            // run (its leader is not yet reaped or was reaped microseconds ago, so the
            // id has not been recycled).
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }

    fn kill_and_disarm(&mut self) {
        self.kill();
        self.pgid = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why the run was cut short by kolokol.
enum Killed {
    Timeout,
    TooLarge,
}

/// Feed stdin, read stdout/stderr, wait for exit, all concurrently and within `timeout`.
async fn talk(
    child: &mut tokio::process::Child,
    input: Vec<u8>,
    timeout: Duration,
) -> (Result<Vec<u8>, HookFailure>, String) {
    let mut killer = GroupKiller {
        pgid: child.id().and_then(|id| libc::pid_t::try_from(id).ok()),
    };
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        killer.kill_and_disarm();
        let io = io::Error::other("pipes to the script were not created");
        return (Err(HookFailure::Io(io)), String::new());
    };

    let mut out = Vec::new();
    let mut err_tail = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut status: Option<io::Result<ExitStatus>> = None;
    let mut killed: Option<Killed> = None;
    let mut out_result: Option<io::Result<()>> = None;
    {
        let mut write_in = pin!(write_stdin(stdin, input));
        let mut read_out = pin!(read_capped(stdout, &mut out, MAX_OUTPUT));
        let mut read_err = pin!(read_tail(stderr, &mut err_tail, STDERR_TAIL));
        let mut wait = pin!(child.wait());
        let sleep = tokio::time::sleep_until(deadline);
        let mut sleep = pin!(sleep);
        let (mut in_done, mut err_done) = (false, false);
        loop {
            if status.is_some() && out_result.is_some() && err_done {
                break;
            }
            tokio::select! {
                r = &mut wait, if status.is_none() => {
                    status = Some(r);
                    if killed.is_some() {
                        // Already SIGKILLed; the leader is reaped now, so the group
                        // id must not be signalled again.
                        killer.pgid = None;
                        break;
                    }
                    // Its output is complete; background children it left behind must
                    // not keep the pipes (and us) waiting.
                    killer.kill_and_disarm();
                    let grace = (Instant::now() + EXIT_GRACE).min(deadline);
                    sleep.as_mut().reset(grace);
                }
                r = &mut read_out, if out_result.is_none() => {
                    let over = matches!(r, Ok(true));
                    out_result = Some(r.map(|_| ()));
                    if over && killed.is_none() {
                        killed = Some(Killed::TooLarge);
                        killer.kill();
                        sleep.as_mut().reset(Instant::now() + REAP_GRACE);
                    }
                }
                _ = &mut read_err, if !err_done => err_done = true,
                _ = &mut write_in, if !in_done => in_done = true,
                _ = &mut sleep => {
                    if status.is_some() || killed.is_some() {
                        // Exited but a detached descendant holds the pipes, or the
                        // killed script could not be reaped in time: stop here.
                        break;
                    }
                    killed = Some(Killed::Timeout);
                    killer.kill();
                    sleep.as_mut().reset(Instant::now() + REAP_GRACE);
                }
            }
        }
    }
    let tail = String::from_utf8_lossy(&err_tail).into_owned();
    match killed {
        Some(Killed::Timeout) => return (Err(HookFailure::Timeout(timeout)), tail),
        Some(Killed::TooLarge) => return (Err(HookFailure::TooLarge), tail),
        None => {}
    }
    let status = match status {
        Some(Ok(s)) => s,
        Some(Err(e)) => return (Err(HookFailure::Io(e)), tail),
        None => return (Err(HookFailure::Timeout(timeout)), tail),
    };
    if !status.success() {
        return (
            Err(HookFailure::Exit {
                status: describe_status(status),
            }),
            tail,
        );
    }
    if let Some(Err(e)) = out_result {
        return (Err(HookFailure::Io(e)), tail);
    }
    (Ok(out), tail)
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

async fn write_stdin(mut stdin: tokio::process::ChildStdin, input: Vec<u8>) {
    // A script that ignores its input may exit before reading it: EPIPE is fine.
    let _ = stdin.write_all(&input).await;
    let _ = stdin.shutdown().await;
    drop(stdin);
}

/// Read into `buf` until EOF; `Ok(true)` if more than `cap` bytes came (reading stops).
async fn read_capped<R: AsyncRead + Unpin>(
    mut r: R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        if buf.len() + n > cap {
            return Ok(true);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Read until EOF keeping only the last `keep` bytes in `tail`.
async fn read_tail<R: AsyncRead + Unpin>(mut r: R, tail: &mut Vec<u8>, keep: usize) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > keep * 2 {
            let cut = tail.len() - keep;
            tail.drain(..cut);
        }
    }
    if tail.len() > keep {
        let cut = tail.len() - keep;
        tail.drain(..cut);
    }
}

/// The last `n` non-empty lines of `text`, joined by " | " for a one-line log.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}

/// Find `hook`'s script in `dir`: a regular file (or symlink to one) named exactly
/// `hook` or `hook.<ext>`. Hidden files and `hook.<ext>.<more>` (e.g. `.disabled`,
/// `.orig`) are ignored.
pub fn locate_in(dir: &Path, hook: Hook) -> Installed {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Installed::Missing;
    };
    let name = hook.as_str();
    let mut found: Option<(PathBuf, bool)> = None;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let matches = file_name == name
            || file_name
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|ext| !ext.is_empty() && !ext.contains('.'));
        if !matches {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: "enable by symlinking the example" must work.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let executable = meta.permissions().mode() & 0o111 != 0;
        if let Some((first, _)) = found {
            let (a, b) = if first <= path {
                (first, path)
            } else {
                (path, first)
            };
            return Installed::Ambiguous(a, b);
        }
        found = Some((path, executable));
    }
    match found {
        Some((path, executable)) => Installed::Found { path, executable },
        None => Installed::Missing,
    }
}

/// What a successful script answer means.
#[derive(Debug)]
enum Interpreted {
    Data(Value),
    Cancel,
    /// Empty data for a hook where that means "use the default".
    Empty(String),
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Parse `{"state": "success", "data": ...}` and apply the hook's rules.
fn interpret(
    hook: Hook,
    stdout: &[u8],
    warnings: &mut Vec<String>,
) -> Result<Interpreted, HookFailure> {
    let text = stdout.trim_ascii();
    if text.is_empty() {
        return Err(HookFailure::InvalidJson(
            "the script printed nothing; print {\"state\": \"success\", \"data\": {...}}".into(),
        ));
    }
    let parsed: Value = serde_json::from_slice(text).map_err(|e| {
        let start = String::from_utf8_lossy(&text[..text.len().min(60)]).into_owned();
        HookFailure::InvalidJson(format!("{e} (output starts with {start:?})"))
    })?;
    let Value::Object(mut top) = parsed else {
        return Err(HookFailure::InvalidJson(
            "expected an object {\"state\": \"success\", \"data\": {...}}".into(),
        ));
    };
    match top.get("state") {
        Some(Value::String(s)) if s == "success" => {}
        other => {
            let state = match other {
                Some(v) => v.to_string(),
                None => "missing".into(),
            };
            let message = ["message", "error"]
                .iter()
                .find_map(|k| top.get(*k).and_then(Value::as_str))
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            return Err(HookFailure::NotSuccess { state, message });
        }
    }
    let mut data = top.remove("data").unwrap_or(Value::Null);
    if is_empty(&data) {
        return Ok(match hook.on_empty() {
            OnEmpty::Cancel => Interpreted::Cancel,
            OnEmpty::UseDefault => Interpreted::Empty("returned empty data".into()),
            OnEmpty::Accept => Interpreted::Data(data),
        });
    }
    if let Value::Object(map) = &mut data {
        for field in hook.read_only_fields() {
            map.remove(*field);
        }
    }
    if hook == Hook::Autodistribution {
        enforce_autodistribution(&mut data, warnings)?;
        if is_empty(&data) {
            return Ok(Interpreted::Empty("returned only read-only fields".into()));
        }
    }
    Ok(Interpreted::Data(data))
}

/// `number` and `name` are strings; `name` fits Asterisk's CallerID.
fn enforce_autodistribution(
    data: &mut Value,
    warnings: &mut Vec<String>,
) -> Result<(), HookFailure> {
    let Value::Object(map) = data else {
        return Err(HookFailure::BadData(
            "autodistribution data must be an object {\"number\": ..., \"name\": ...}".into(),
        ));
    };
    for key in ["number", "name"] {
        match map.get(key) {
            None | Some(Value::String(_)) => {}
            Some(Value::Number(n)) => {
                let s = n.to_string();
                map.insert(key.into(), Value::String(s));
            }
            Some(other) => {
                return Err(HookFailure::BadData(format!(
                    "autodistribution {key} must be a string, got {other}"
                )));
            }
        }
    }
    if let Some(Value::String(name)) = map.get_mut("name")
        && name.chars().count() > MAX_CALLERID_NAME
    {
        let cut: String = name.chars().take(MAX_CALLERID_NAME).collect();
        warnings.push(format!(
            "name {name:?} cut to {MAX_CALLERID_NAME} characters ({cut:?}): Asterisk CallerID limit"
        ));
        *name = cut;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn interp(hook: Hook, out: &str) -> Result<Interpreted, HookFailure> {
        interpret(hook, out.as_bytes(), &mut Vec::new())
    }

    #[test]
    fn empty_data_cancels_only_hooks_before_requests() {
        for empty in ["{}", "[]", "null"] {
            let out = format!(r#"{{"state":"success","data":{empty}}}"#);
            assert!(matches!(
                interp(Hook::ProcessLeadCreationParams, &out),
                Ok(Interpreted::Cancel)
            ));
            assert!(matches!(
                interp(Hook::ProcessRecordFilePath, &out),
                Ok(Interpreted::Empty(_))
            ));
            assert!(matches!(
                interp(Hook::PostRegistration, &out),
                Ok(Interpreted::Data(_))
            ));
        }
        // Missing data is null.
        assert!(matches!(
            interp(Hook::NeedRegistration, r#"{"state":"success"}"#),
            Ok(Interpreted::Cancel)
        ));
    }

    #[test]
    fn rejects_bad_answers_with_a_reason() {
        assert!(matches!(
            interp(Hook::ProcessCallParams, ""),
            Err(HookFailure::InvalidJson(_))
        ));
        assert!(matches!(
            interp(Hook::ProcessCallParams, "[1]"),
            Err(HookFailure::InvalidJson(_))
        ));
        match interp(
            Hook::ProcessCallParams,
            r#"{"state":"error","message":"no db"}"#,
        ) {
            Err(e @ HookFailure::NotSuccess { .. }) => {
                assert_eq!(e.to_string(), "state is \"error\", not \"success\": no db")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn autodistribution_read_only_fields_and_name_limit() {
        let mut warnings = Vec::new();
        let out = json!({"state": "success", "data": {
            "number": 101, "name": "Ivan Ivanovich Ivanov-Petrov",
            "from": "x", "trunk": "y", "request_data": {}, "entity": {}, "error": "e",
            "call_full": {}
        }})
        .to_string();
        let Ok(Interpreted::Data(d)) =
            interpret(Hook::Autodistribution, out.as_bytes(), &mut warnings)
        else {
            panic!("expected data");
        };
        assert_eq!(d, json!({"number": "101", "name": "Ivan Ivanovich Ivano"}));
        assert_eq!(warnings.len(), 1);

        let only_ro = r#"{"state":"success","data":{"from":"1","trunk":"2"}}"#;
        assert!(matches!(
            interp(Hook::Autodistribution, only_ro),
            Ok(Interpreted::Empty(_))
        ));
        assert!(matches!(
            interp(Hook::Autodistribution, r#"{"state":"success","data":[1]}"#),
            Err(HookFailure::BadData(_))
        ));
    }

    #[test]
    fn call_full_is_never_sent_back() {
        let out = r#"{"state":"success","data":{"phone":"+7900","call_full":{"id":"1"}}}"#;
        let Ok(Interpreted::Data(d)) = interp(Hook::ProcessClientPhone, out) else {
            panic!("expected data");
        };
        assert_eq!(d, json!({"phone": "+7900"}));
    }

    #[test]
    fn last_lines_joins_the_end() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b | c");
    }
}
