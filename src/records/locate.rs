//! Find a conversation's recording and wait until Asterisk has finished writing it.
//!
//! MixMonitor writes while the call runs and completes the file when it stops (hangup, or
//! `StopMixMonitor`). The AMI stream has no `MixMonitorStop` on a plain hangup (fixture
//! notes, 14), so the caller tells us the conversation ended and we then wait until the size
//! stays unchanged for `settle`. Uploading a half-written file is the classic bug here.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::{RecordError, RecordsConfig};

/// Resolves reported recording paths and waits for them to be complete.
#[derive(Debug, Clone)]
pub struct Locator {
    dir: PathBuf,
    pbx_dir: PathBuf,
    settle: Duration,
    appear_timeout: Duration,
    wait_max: Duration,
}

impl Locator {
    pub fn new(cfg: &RecordsConfig) -> Self {
        Locator {
            dir: cfg.dir.clone(),
            pbx_dir: cfg.pbx_dir.clone(),
            settle: cfg.settle,
            appear_timeout: cfg.appear_timeout,
            wait_max: cfg.wait_max.max(cfg.settle),
        }
    }

    fn poll_interval(&self) -> Duration {
        (self.settle / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    /// Where the reported file may be, most likely first:
    /// - an absolute path as is (kolokol on the PBX host),
    /// - an absolute path under `pbx_dir` moved under `dir` (spool mounted elsewhere),
    /// - a relative path (`CDR(userfield)`, FreePBX `2026/11/21/x.wav`) under `dir`,
    /// - the bare file name under `dir`.
    ///
    /// Paths with `..` are dropped: a recording path never needs them.
    pub fn candidates(&self, reported: &str) -> Vec<PathBuf> {
        let reported = reported.trim();
        let p = Path::new(reported);
        if reported.is_empty() || p.components().any(|c| c == Component::ParentDir) {
            return Vec::new();
        }
        let mut out = Vec::new();
        if p.is_absolute() {
            out.push(p.to_path_buf());
            if let Ok(rest) = p.strip_prefix(&self.pbx_dir) {
                out.push(self.dir.join(rest));
            }
        } else {
            out.push(self.dir.join(p));
        }
        if let Some(name) = p.file_name() {
            out.push(self.dir.join(name));
        }
        out.dedup();
        out
    }

    /// Wait until the reported recording exists and its size has been stable for `settle`,
    /// then return its canonical path. Call this after the conversation ended.
    pub async fn wait_finished(
        &self,
        call_id: &str,
        reported: &str,
    ) -> Result<PathBuf, RecordError> {
        let started = Instant::now();
        let candidates = self.candidates(reported);
        let shown = PathBuf::from(reported);
        let poll = self.poll_interval();

        // 1. Wait for the file to appear (network mounts lag; a missed call has none).
        let found = loop {
            let mut hit = None;
            for c in &candidates {
                if tokio::fs::metadata(c).await.is_ok_and(|m| m.is_file()) {
                    hit = Some(c.clone());
                    break;
                }
            }
            if let Some(h) = hit {
                break h;
            }
            if started.elapsed() >= self.appear_timeout {
                tracing::warn!(call_id, reported, candidates = ?candidates,
                    "recording file not found");
                return Err(RecordError::NotFound {
                    path: shown,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(poll).await;
        };

        // 2. Only files inside [records] dir: the path came from the PBX or a script, and
        //    whatever we accept here ends up served over HTTP.
        let canonical = tokio::fs::canonicalize(&found)
            .await
            .map_err(|e| RecordError::io("resolving the recording", &found, e))?;
        let root = tokio::fs::canonicalize(&self.dir)
            .await
            .unwrap_or_else(|_| self.dir.clone());
        if !canonical.starts_with(&root) {
            tracing::warn!(call_id, path = %canonical.display(), dir = %root.display(),
                "recording outside [records] dir refused");
            return Err(RecordError::OutsideDir {
                path: canonical,
                dir: root,
            });
        }

        // 3. Wait for the size to stop changing.
        let mut last = file_len(&canonical).await?;
        let mut stable_since = Instant::now();
        loop {
            if stable_since.elapsed() >= self.settle {
                break;
            }
            if started.elapsed() >= self.wait_max {
                tracing::warn!(call_id, path = %canonical.display(), size = last,
                    "recording still growing; giving up");
                return Err(RecordError::StillGrowing {
                    path: canonical,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(poll).await;
            let now = file_len(&canonical).await?;
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
        }
        if last == 0 {
            return Err(RecordError::Empty { path: canonical });
        }
        tracing::debug!(call_id, path = %canonical.display(), size = last,
            waited_ms = started.elapsed().as_millis() as u64, "recording complete");
        Ok(canonical)
    }
}

async fn file_len(path: &Path) -> Result<u64, RecordError> {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .map_err(|e| RecordError::io("reading the size of", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_mounts_and_bare_names() {
        let cfg = RecordsConfig {
            dir: "/mnt/pbx".into(),
            pbx_dir: "/var/spool/asterisk/monitor".into(),
            ..RecordsConfig::default()
        };
        let l = Locator::new(&cfg);
        assert_eq!(
            l.candidates("/var/spool/asterisk/monitor/2026/11/x.wav"),
            vec![
                PathBuf::from("/var/spool/asterisk/monitor/2026/11/x.wav"),
                PathBuf::from("/mnt/pbx/2026/11/x.wav"),
                PathBuf::from("/mnt/pbx/x.wav"),
            ]
        );
        assert_eq!(l.candidates("x.wav"), vec![PathBuf::from("/mnt/pbx/x.wav")]);
        assert!(l.candidates("../../etc/passwd").is_empty());
        assert!(
            l.candidates("/var/spool/asterisk/monitor/../../x")
                .is_empty()
        );
        assert!(l.candidates("  ").is_empty());
    }
}
