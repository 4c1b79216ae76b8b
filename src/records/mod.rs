//! Recordings: find each conversation's MixMonitor file, convert wav to mp3 off the event
//! loop, and serve it to the CRMs by signed link.
//!
//! The pieces, in the order a finished conversation goes through them:
//!
//! 1. [`locate`]: map the path the PBX reported (`VarSet MIXMONITOR_FILENAME`, or a bare
//!    name from `CDR(userfield)`) to a file we can read, and wait until Asterisk has finished
//!    writing it (the caller saw the hangup; we then wait for the size to stay put).
//! 2. [`convert`]: symphonia decodes the wav, LAME encodes mp3, streaming in small chunks,
//!    in a bounded blocking pool with a timeout. Anything that goes wrong leaves the original
//!    file in place and in use.
//! 3. [`catalog`] + [`link`] + [`http`]: a recording *id* (never a path) is signed into a
//!    link; `GET /records/<token>.mp3` checks the signature, asks the catalog for the file
//!    and streams it with Range support.
//!
//! [`Recordings`] ties them together for the daemon: `finish(call_id, reported_path)` returns
//! the file to upload and the link to put into the CRM.

pub mod catalog;
pub mod convert;
pub mod http;
pub mod link;
pub mod locate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use catalog::{DirCatalog, RecordingCatalog, valid_id};
pub use convert::{ConvertReport, ConvertSettings, Converter, convert_file};
pub use link::{LinkError, LinkSigner};
pub use locate::Locator;

/// `[records]` config section.
///
/// ```toml
/// [records]
/// dir = "/var/spool/asterisk/monitor"   # where MixMonitor writes, as seen from kolokol
/// bitrate_kbps = 32                      # mp3 bitrate (8 kHz voice: 24-32 is plenty)
/// convert_timeout = "10s"                # after this the original wav is used
/// keep_wav = true
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// Where MixMonitor writes, as seen from kolokol (used when the event carries a bare file
    /// name, and as the only folder recordings may be read from).
    pub dir: PathBuf,
    /// The same folder as the PBX names it in `MIXMONITOR_FILENAME`. When kolokol sees the
    /// spool through a mount at another path, paths under `pbx_dir` are moved under `dir`.
    pub pbx_dir: PathBuf,
    /// Where converted mp3 files are written and served from. Empty: `<state_dir>/records`.
    pub store_dir: PathBuf,
    /// Secret for HMAC-signed links; empty means generated at first start and kept in
    /// `<state_dir>/records.secret`.
    pub link_secret: String,
    /// Links stop working after this long (e.g. "90d"). Unset: links never expire, which is
    /// what CRM call notes need (they keep the link forever).
    #[serde(with = "humantime_serde")]
    pub link_ttl: Option<Duration>,
    /// Convert wav to mp3 at all (Kommo's player plays only mp3).
    pub convert: bool,
    /// mp3 bitrate in kbit/s (CBR): 8, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192,
    /// 224, 256 or 320.
    pub bitrate_kbps: u32,
    /// LAME algorithm quality, 0 (best, slowest) to 9 (fastest). 5 is LAME's library default.
    pub quality: u8,
    /// Output sample rate in Hz; 0 keeps the input rate when mp3 allows it (8 kHz stays
    /// 8 kHz, which halves the size of a 16 kHz file for telephone audio).
    pub sample_rate: u32,
    /// Mix stereo recordings down to mono (half the bits for the same quality of voice).
    pub downmix: bool,
    /// Keep the wav after a successful conversion. `false` deletes it (only when the mp3 was
    /// ready within `convert_timeout`, so a file already handed to a CRM is never removed).
    pub keep_wav: bool,
    /// How long a caller waits for a conversion; then the original is used and the mp3
    /// replaces it for the link when it is done.
    #[serde(with = "humantime_serde")]
    pub convert_timeout: Duration,
    /// Conversions running at once; 0 = number of CPU cores. Never more than the cores.
    pub max_concurrent: usize,
    /// Conversions waiting for a slot; beyond this the original file is used at once.
    pub max_queued: usize,
    /// Largest input file accepted, in MiB (a one-hour 8 kHz 16-bit wav is 55 MiB).
    pub max_file_mb: u64,
    /// The size must stay unchanged this long before the file counts as finished.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// How long the file may take to appear at all (scenario 02: a name in CDR(userfield)
    /// but no file, because the call was never answered).
    #[serde(with = "humantime_serde")]
    pub appear_timeout: Duration,
    /// Upper bound on the whole wait for a finished file.
    #[serde(with = "humantime_serde")]
    pub wait_max: Duration,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            dir: PathBuf::from("/var/spool/asterisk/monitor"),
            pbx_dir: PathBuf::from("/var/spool/asterisk/monitor"),
            store_dir: PathBuf::new(),
            link_secret: String::new(),
            link_ttl: None,
            convert: true,
            bitrate_kbps: 32,
            quality: 5,
            sample_rate: 0,
            downmix: true,
            keep_wav: true,
            convert_timeout: Duration::from_secs(10),
            max_concurrent: 0,
            max_queued: 64,
            max_file_mb: 1024,
            settle: Duration::from_millis(1000),
            appear_timeout: Duration::from_secs(5),
            wait_max: Duration::from_secs(30),
        }
    }
}

impl RecordsConfig {
    /// The folder converted files live in: `store_dir`, or `<state_dir>/records`.
    pub fn store_dir(&self, state_dir: &Path) -> PathBuf {
        if self.store_dir.as_os_str().is_empty() {
            state_dir.join("records")
        } else {
            self.store_dir.clone()
        }
    }
}

/// Everything that can go wrong with a recording. Every variant means "use the original
/// file (or no recording)"; none of them is fatal for the call or the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "recording {path} did not appear within {waited:?}: check that MixMonitor writes to [records] dir (and pbx_dir if the spool is mounted elsewhere)"
    )]
    NotFound { path: PathBuf, waited: Duration },
    #[error(
        "recording {path} was still growing after {waited:?}: raise [records] wait_max if calls end with long MixMonitor flushes"
    )]
    StillGrowing { path: PathBuf, waited: Duration },
    #[error(
        "recording {path} is outside [records] dir {dir}: refusing to read or serve it (set dir to the folder MixMonitor writes to)"
    )]
    OutsideDir { path: PathBuf, dir: PathBuf },
    #[error("recording {path} is empty (0 bytes): nothing to convert")]
    Empty { path: PathBuf },
    #[error("recording {path} is {size} bytes, over [records] max_file_mb ({limit_mb} MiB)")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit_mb: u64,
    },
    #[error("recording {path}: {what} cannot be decoded ({detail}); the original file is used")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error(
        "recording {path} is truncated: the header promises {expected} frames, the file holds {decoded}; the original file is used"
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        decoded: u64,
    },
    #[error("recording {path} is damaged: {detail}; the original file is used")]
    Corrupt { path: PathBuf, detail: String },
    #[error("mp3 encoder refused the settings: {detail}; check [records] bitrate_kbps/sample_rate")]
    Encoder { detail: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "conversion of {path} took longer than {after:?}: the original is used now, the mp3 replaces it for the link when done"
    )]
    TimedOut { path: PathBuf, after: Duration },
    #[error(
        "{queued} conversions already waiting ([records] max_queued): {path} is used unconverted"
    )]
    Busy { path: PathBuf, queued: usize },
    #[error("invalid [records] setting {key}: {detail}")]
    Config { key: &'static str, detail: String },
    #[error("conversion worker for {path} failed: {detail}")]
    Worker { path: PathBuf, detail: String },
}

impl RecordError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        RecordError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What [`Recordings::finish`] produced for one conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOutcome {
    /// The recording id the link is signed for (the file stem, sanitized).
    pub id: String,
    /// The file to upload (Bitrix24 takes uploads): the mp3, or the original on fallback.
    pub file: PathBuf,
    /// The signed public link for the CRM.
    pub link: String,
    /// Whether `file` is our mp3.
    pub converted: bool,
    /// Why the original is used, when it is.
    pub fallback: Option<String>,
}

/// The recordings service the daemon holds: locate → convert → catalog → link.
pub struct Recordings {
    locator: Locator,
    converter: Converter,
    catalog: Arc<DirCatalog>,
    signer: LinkSigner,
    public_url: String,
    convert: bool,
}

impl Recordings {
    /// Build from config. `state_dir` holds the converted files and the generated link
    /// secret; `public_url` is `[http] public_url`.
    pub fn new(
        cfg: &RecordsConfig,
        state_dir: &Path,
        public_url: &str,
    ) -> Result<Self, RecordError> {
        let store = cfg.store_dir(state_dir);
        std::fs::create_dir_all(&store)
            .map_err(|e| RecordError::io("creating the recordings store", &store, e))?;
        Ok(Recordings {
            locator: Locator::new(cfg),
            converter: Converter::new(cfg)?,
            catalog: Arc::new(DirCatalog::new(store)),
            signer: LinkSigner::from_config(cfg, state_dir)?,
            public_url: public_url.to_string(),
            convert: cfg.convert,
        })
    }

    /// The catalog the HTTP route serves from (the daemon may wrap it with its database).
    pub fn catalog(&self) -> Arc<DirCatalog> {
        self.catalog.clone()
    }

    pub fn signer(&self) -> &LinkSigner {
        &self.signer
    }

    /// `GET /records/<token>.<ext>` for the daemon's HTTP server.
    pub fn router(&self) -> axum::Router {
        http::router(http::RecordsHttp::new(
            self.catalog.clone(),
            self.signer.clone(),
        ))
    }

    /// A conversation ended (MixMonitor stopped or the channel hung up): wait for the file,
    /// convert it, and return what to hand to the CRM. `reported` is the path from
    /// `MIXMONITOR_FILENAME` (or a bare name, or what `process_record_file_path` returned).
    ///
    /// Errors only when there is no usable file at all (missing, outside `dir`, empty); a
    /// failed or slow conversion falls back to the original and still returns `Ok`.
    pub async fn finish(
        &self,
        call_id: &str,
        reported: &str,
    ) -> Result<RecordOutcome, RecordError> {
        let src = self.locator.wait_finished(call_id, reported).await?;
        let id = catalog::id_from_path(&src);
        let is_mp3 = src
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("mp3"));
        let fallback = if is_mp3 {
            // A customization already produced an mp3: serve it as is.
            None
        } else if !self.convert {
            Some("conversion disabled ([records] convert = false)".to_string())
        } else {
            let dst = self.catalog.dir().join(format!("{id}.mp3"));
            match self.converter.convert(&src, &dst).await {
                Ok(report) => {
                    tracing::info!(
                        call_id,
                        record_id = %id,
                        src = %src.display(),
                        mp3 = %report.dst.display(),
                        seconds = report.duration.as_secs_f64(),
                        bytes_in = report.bytes_in,
                        bytes_out = report.bytes_out,
                        "recording converted"
                    );
                    let link = self.signer.link_ext(&self.public_url, &id, "mp3");
                    return Ok(RecordOutcome {
                        id,
                        file: report.dst,
                        link,
                        converted: true,
                        fallback: None,
                    });
                }
                Err(e) => {
                    tracing::warn!(call_id, record_id = %id, src = %src.display(), error = %e,
                        "recording not converted; using the original");
                    Some(e.to_string())
                }
            }
        };
        self.catalog.register(&id, src.clone());
        let ext = catalog::served_ext(&src).unwrap_or("wav");
        Ok(RecordOutcome {
            link: self.signer.link_ext(&self.public_url, &id, ext),
            id,
            file: src,
            converted: is_mp3,
            fallback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_section_parses_every_key() {
        let cfg: RecordsConfig = toml::from_str(
            r#"
            dir = "/mnt/monitor"
            pbx_dir = "/var/spool/asterisk/monitor"
            store_dir = "/srv/kolokol/records"
            link_secret = "0123456789abcdef0123"
            link_ttl = "90d"
            convert = true
            bitrate_kbps = 24
            quality = 7
            sample_rate = 8000
            downmix = false
            keep_wav = false
            convert_timeout = "15s"
            max_concurrent = 1
            max_queued = 10
            max_file_mb = 200
            settle = "500ms"
            appear_timeout = "2s"
            wait_max = "1m"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.link_ttl, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(cfg.convert_timeout, Duration::from_secs(15));
        assert_eq!(cfg.settle, Duration::from_millis(500));
        assert_eq!(
            cfg.store_dir(Path::new("/var/lib/kolokol")),
            PathBuf::from("/srv/kolokol/records")
        );
        assert!(ConvertSettings::from_config(&cfg).is_ok());

        let d = RecordsConfig::default();
        assert_eq!(
            d.store_dir(Path::new("/var/lib/kolokol")),
            PathBuf::from("/var/lib/kolokol/records")
        );
        assert!(ConvertSettings::from_config(&d).is_ok());
        assert!(
            toml::from_str::<RecordsConfig>("bitrate = 32").is_err(),
            "unknown keys refused"
        );
        let bad: RecordsConfig = toml::from_str("bitrate_kbps = 100").unwrap();
        assert!(ConvertSettings::from_config(&bad).is_err());
        assert!(Converter::new(&bad).is_err());
    }
}
