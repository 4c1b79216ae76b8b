//! Signed recording links: `<public_url>/records/<token>.mp3`.
//!
//! token = `base64url(id) "." expires "." base64url(HMAC-SHA256(secret, id "\n" expires))`,
//! where `expires` is a unix time in seconds or `0` for "never". The id is base64url so the
//! token never contains `/`, `%` or `..`, and the MAC covers both id and expiry, so neither
//! can be changed without the secret.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{RecordError, RecordsConfig};

type HmacSha256 = Hmac<Sha256>;

/// File in the state dir holding the generated secret when `[records] link_secret` is empty.
pub const SECRET_FILE: &str = "records.secret";

/// Shortest configured secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// Longest token accepted before any decoding (an id of 200 bytes is ~270 characters).
const MAX_TOKEN_LEN: usize = 400;

/// Why a token was refused. All of them answer 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("token is not of the form <id>.<expires>.<signature>")]
    Malformed,
    #[error("signature does not match (tampered link, or the secret changed)")]
    BadSignature,
    #[error("link expired at unix time {0}")]
    Expired(u64),
}

/// Signs and checks recording links. Cheap to clone.
#[derive(Clone)]
pub struct LinkSigner {
    key: Arc<[u8]>,
    ttl: Option<Duration>,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("LinkSigner")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LinkSigner {
    /// A signer with this secret; links expire `ttl` after signing (None: never).
    pub fn new(secret: &[u8], ttl: Option<Duration>) -> Self {
        LinkSigner {
            key: Arc::from(secret),
            ttl,
        }
    }

    /// `[records] link_secret`, or the secret kept in `<state_dir>/records.secret`
    /// (generated with 256 random bits on first start, mode 0600).
    pub fn from_config(cfg: &RecordsConfig, state_dir: &Path) -> Result<Self, RecordError> {
        if !cfg.link_secret.is_empty() {
            if cfg.link_secret.len() < MIN_SECRET_LEN {
                return Err(RecordError::Config {
                    key: "link_secret",
                    detail: format!(
                        "{} characters is too short to sign links; use at least {MIN_SECRET_LEN} or leave it empty to have one generated",
                        cfg.link_secret.len()
                    ),
                });
            }
            return Ok(Self::new(cfg.link_secret.as_bytes(), cfg.link_ttl));
        }
        let secret = load_or_create_secret(&state_dir.join(SECRET_FILE))?;
        Ok(Self::new(&secret, cfg.link_ttl))
    }

    fn mac(&self, id: &str, expires: u64) -> HmacSha256 {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(id.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// A token for `id` expiring at `expires` (unix seconds; None = never).
    pub fn token_at(&self, id: &str, expires: Option<u64>) -> String {
        let exp = expires.unwrap_or(0);
        let sig = self.mac(id, exp).finalize().into_bytes();
        format!(
            "{}.{exp}.{}",
            URL_SAFE_NO_PAD.encode(id.as_bytes()),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// A token for `id` with the configured lifetime from now.
    pub fn token(&self, id: &str) -> String {
        let expires = self
            .ttl
            .map(|t| now_unix().saturating_add(t.as_secs().max(1)));
        self.token_at(id, expires)
    }

    /// `<public_url>/records/<token>.mp3`: the link to put into the CRM.
    pub fn link(&self, public_url: &str, id: &str) -> String {
        self.link_ext(public_url, id, "mp3")
    }

    /// Like [`link`](Self::link) with another extension (`wav` when the original is served).
    pub fn link_ext(&self, public_url: &str, id: &str, ext: &str) -> String {
        format!(
            "{}/records/{}.{ext}",
            public_url.trim_end_matches('/'),
            self.token(id)
        )
    }

    /// The id a token was signed for, if the signature holds and it has not expired.
    pub fn verify(&self, token: &str) -> Result<String, LinkError> {
        self.verify_at(token, now_unix())
    }

    /// [`verify`](Self::verify) at a given time (unix seconds).
    pub fn verify_at(&self, token: &str, now: u64) -> Result<String, LinkError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(LinkError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(id_b64), Some(exp), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(LinkError::Malformed);
        };
        // Only canonical decimal: "0", or no leading zero (so one expiry has one spelling).
        if exp.is_empty()
            || !exp.bytes().all(|b| b.is_ascii_digit())
            || (exp.len() > 1 && exp.starts_with('0'))
        {
            return Err(LinkError::Malformed);
        }
        let expires: u64 = exp.parse().map_err(|_| LinkError::Malformed)?;
        let id_bytes = URL_SAFE_NO_PAD
            .decode(id_b64)
            .map_err(|_| LinkError::Malformed)?;
        let id = String::from_utf8(id_bytes).map_err(|_| LinkError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| LinkError::Malformed)?;
        // Constant-time comparison.
        self.mac(&id, expires)
            .verify_slice(&sig)
            .map_err(|_| LinkError::BadSignature)?;
        if expires != 0 && now >= expires {
            return Err(LinkError::Expired(expires));
        }
        Ok(id)
    }
}

fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, RecordError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let trimmed = String::from_utf8_lossy(&bytes).trim().to_string();
            if trimmed.len() < MIN_SECRET_LEN {
                return Err(RecordError::Config {
                    key: "link_secret",
                    detail: format!(
                        "{} holds fewer than {MIN_SECRET_LEN} characters; delete it to have a new secret generated (old links stop working)",
                        path.display()
                    ),
                });
            }
            Ok(trimmed.into_bytes())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            rand::Rng::fill(&mut rand::thread_rng(), &mut raw);
            let secret = hex::encode(raw);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RecordError::io("creating the state folder", parent, e))?;
            }
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            match opts.open(path) {
                Ok(mut f) => {
                    f.write_all(secret.as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| RecordError::io("writing the link secret", path, e))?;
                    tracing::info!(path = %path.display(), "generated a new secret for recording links");
                    Ok(secret.into_bytes())
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_secret(path)
                }
                Err(e) => Err(RecordError::io("creating the link secret", path, e)),
            }
        }
        Err(e) => Err(RecordError::io("reading the link secret", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let s = LinkSigner::new(b"0123456789abcdef-secret", None);
        let t = s.token("in-1.0");
        assert_eq!(s.verify(&t), Ok("in-1.0".to_string()));
        // Another secret refuses it.
        let other = LinkSigner::new(b"another-secret-0123456", None);
        assert_eq!(other.verify(&t), Err(LinkError::BadSignature));
        // Changing the id keeps the signature: refused.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("in-2.0"),
            parts[1],
            parts[2]
        );
        assert_eq!(s.verify(&forged), Err(LinkError::BadSignature));
        // Giving it an expiry: refused.
        let forged = format!("{}.{}.{}", parts[0], "99999999999", parts[2]);
        assert_eq!(s.verify(&forged), Err(LinkError::BadSignature));
        for bad in [
            "",
            "a",
            "a.b",
            "a.0.b.c",
            "!!.0.xx",
            "aW4.00.xx",
            "aW4.-1.xx",
        ] {
            assert_eq!(s.verify(bad), Err(LinkError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn expiry() {
        let s = LinkSigner::new(b"0123456789abcdef-secret", None);
        let t = s.token_at("x", Some(1000));
        assert_eq!(s.verify_at(&t, 999), Ok("x".into()));
        assert_eq!(s.verify_at(&t, 1000), Err(LinkError::Expired(1000)));
    }

    #[test]
    fn generated_secret_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = RecordsConfig::default();
        let a = LinkSigner::from_config(&cfg, tmp.path()).unwrap();
        let b = LinkSigner::from_config(&cfg, tmp.path()).unwrap();
        let t = a.token("id-1");
        assert_eq!(b.verify(&t), Ok("id-1".into()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(tmp.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secret readable by others");
        }
        let short = RecordsConfig {
            link_secret: "short".into(),
            ..RecordsConfig::default()
        };
        assert!(LinkSigner::from_config(&short, tmp.path()).is_err());
    }
}
