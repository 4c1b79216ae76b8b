//! Counters for customization runs: plain atomics the daemon's `/metrics` reads.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a run fell back to the default. Each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    NotInstalled,
    Ambiguous,
    NotExecutable,
    Spawn,
    Busy,
    Exit,
    Timeout,
    InvalidJson,
    NotSuccess,
    BadData,
    TooLarge,
    Io,
}

impl FailureKind {
    pub const ALL: [FailureKind; 12] = [
        FailureKind::NotInstalled,
        FailureKind::Ambiguous,
        FailureKind::NotExecutable,
        FailureKind::Spawn,
        FailureKind::Busy,
        FailureKind::Exit,
        FailureKind::Timeout,
        FailureKind::InvalidJson,
        FailureKind::NotSuccess,
        FailureKind::BadData,
        FailureKind::TooLarge,
        FailureKind::Io,
    ];

    /// Label value in metrics (`reason="timeout"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::NotInstalled => "not_installed",
            FailureKind::Ambiguous => "ambiguous",
            FailureKind::NotExecutable => "not_executable",
            FailureKind::Spawn => "spawn",
            FailureKind::Busy => "busy",
            FailureKind::Exit => "exit",
            FailureKind::Timeout => "timeout",
            FailureKind::InvalidJson => "invalid_json",
            FailureKind::NotSuccess => "not_success",
            FailureKind::BadData => "bad_data",
            FailureKind::TooLarge => "too_large",
            FailureKind::Io => "io",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters shared by every run of one [`super::Runner`]. Cheap to read at any time.
#[derive(Debug, Default)]
pub struct HookMetrics {
    /// Runs started (a script was looked for), whatever the result.
    pub runs: AtomicU64,
    /// Runs whose data was used.
    pub succeeded: AtomicU64,
    /// Runs that cancelled the request (empty data).
    pub cancelled: AtomicU64,
    /// Scripts running right now.
    pub running: AtomicU64,
    /// Most scripts ever running at once (never above `max_concurrent`).
    pub peak_running: AtomicU64,
    failures: [AtomicU64; FailureKind::ALL.len()],
}

/// A point-in-time copy of [`HookMetrics`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    pub runs: u64,
    pub succeeded: u64,
    pub cancelled: u64,
    pub running: u64,
    pub peak_running: u64,
    pub timeouts: u64,
    /// Failures by reason, every reason listed (zeros included).
    pub failures: Vec<(&'static str, u64)>,
}

impl MetricsSnapshot {
    /// Failures of every reason except `not_installed` (an absent hook is normal).
    pub fn failed(&self) -> u64 {
        self.failures
            .iter()
            .filter(|(k, _)| *k != "not_installed")
            .map(|(_, n)| n)
            .sum()
    }

    /// The counter for one reason.
    pub fn failures_of(&self, kind: FailureKind) -> u64 {
        self.failures
            .iter()
            .find(|(k, _)| *k == kind.as_str())
            .map_or(0, |(_, n)| *n)
    }
}

impl HookMetrics {
    pub(crate) fn count_failure(&self, kind: FailureKind) {
        self.failures[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Failures for one reason so far.
    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.failures[kind.index()].load(Ordering::Relaxed)
    }

    /// Timeouts so far (same as `failures(FailureKind::Timeout)`).
    pub fn timeouts(&self) -> u64 {
        self.failures(FailureKind::Timeout)
    }

    pub(crate) fn enter_running(&self) {
        let now = self.running.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_running.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn leave_running(&self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            runs: self.runs.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            peak_running: self.peak_running.load(Ordering::Relaxed),
            timeouts: self.timeouts(),
            failures: FailureKind::ALL
                .iter()
                .map(|k| (k.as_str(), self.failures(*k)))
                .collect(),
        }
    }

    /// Prometheus text exposition of these counters (`kolokol_hook_*`).
    pub fn render_prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kolokol_hook_runs_total Customization runs started.\n\
             # TYPE kolokol_hook_runs_total counter\n\
             kolokol_hook_runs_total {}",
            s.runs
        );
        let _ = writeln!(
            out,
            "# HELP kolokol_hook_succeeded_total Customization runs whose data was used.\n\
             # TYPE kolokol_hook_succeeded_total counter\n\
             kolokol_hook_succeeded_total {}",
            s.succeeded
        );
        let _ = writeln!(
            out,
            "# HELP kolokol_hook_cancelled_total Requests cancelled by a customization.\n\
             # TYPE kolokol_hook_cancelled_total counter\n\
             kolokol_hook_cancelled_total {}",
            s.cancelled
        );
        let _ = writeln!(
            out,
            "# HELP kolokol_hook_failures_total Customization runs that fell back to the default.\n\
             # TYPE kolokol_hook_failures_total counter"
        );
        for (reason, n) in &s.failures {
            let _ = writeln!(
                out,
                "kolokol_hook_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kolokol_hook_timeouts_total Customization scripts killed at their timeout.\n\
             # TYPE kolokol_hook_timeouts_total counter\n\
             kolokol_hook_timeouts_total {}",
            s.timeouts
        );
        let _ = writeln!(
            out,
            "# HELP kolokol_hook_running Customization scripts running now.\n\
             # TYPE kolokol_hook_running gauge\n\
             kolokol_hook_running {}",
            s.running
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = HookMetrics::default();
        m.count_failure(FailureKind::Timeout);
        m.count_failure(FailureKind::NotInstalled);
        m.enter_running();
        m.enter_running();
        m.leave_running();
        let s = m.snapshot();
        assert_eq!(s.timeouts, 1);
        assert_eq!(s.failed(), 1);
        assert_eq!(s.failures_of(FailureKind::NotInstalled), 1);
        assert_eq!(s.running, 1);
        assert_eq!(s.peak_running, 2);
        let text = m.render_prometheus();
        assert!(text.contains("kolokol_hook_failures_total{reason=\"timeout\"} 1"));
        assert!(text.contains("kolokol_hook_running 1"));
    }
}
