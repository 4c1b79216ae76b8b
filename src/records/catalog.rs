//! Which file a recording id stands for. The HTTP route only ever sees ids; this is the one
//! place that turns an id into a path, so nothing from a URL can name a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Maps a recording id to the file to serve. The daemon backs this with its database; the
/// [`DirCatalog`] here serves the folder converted files are written to.
///
/// `path_of` may block (a `stat`, a SQLite lookup): the HTTP route calls it on the blocking
/// pool.
pub trait RecordingCatalog: Send + Sync {
    fn path_of(&self, id: &str) -> Option<PathBuf>;
}

/// Longest id accepted; real ones are file stems like
/// `in-20261121-234741-79161234567-1795304861.0` (44 characters).
pub const MAX_ID_LEN: usize = 200;

/// An id is safe to join to a folder: 1..=200 of `[A-Za-z0-9._-]`, not starting with a dot
/// and without `..`. Checked even for signed ids, so a leaked secret still cannot reach
/// outside the folder.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The id for a recording file: its stem, with anything outside `[A-Za-z0-9._-]` replaced
/// by `_` (MixMonitor names may carry `+` or spaces from caller ids).
pub fn id_from_path(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut id: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while id.starts_with('.') {
        id.replace_range(0..1, "_");
    }
    while id.contains("..") {
        id = id.replace("..", "._");
    }
    id.truncate(MAX_ID_LEN);
    if id.is_empty() {
        id.push_str("recording");
    }
    id
}

/// The URL extension and Content-Type for a file we serve, from its extension.
pub fn served_ext(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "mp3" => Some("mp3"),
        "wav" => Some("wav"),
        "gsm" => Some("gsm"),
        _ => None,
    }
}

/// `Content-Type` for a served extension.
pub fn content_type(ext: &str) -> &'static str {
    match ext {
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "gsm" => "audio/x-gsm",
        _ => "application/octet-stream",
    }
}

/// Converted files under one folder the daemon owns (`<dir>/<id>.mp3`, or `<id>.wav`), plus
/// originals registered when conversion did not happen (kept in memory; the daemon persists
/// them in its database).
///
/// An mp3 in the folder wins over a registered original, so a conversion that finished
/// after its timeout takes over the link without anyone re-signing it.
#[derive(Debug)]
pub struct DirCatalog {
    dir: PathBuf,
    originals: RwLock<HashMap<String, PathBuf>>,
}

impl DirCatalog {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirCatalog {
            dir: dir.into(),
            originals: RwLock::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serve `path` for `id` until a converted file appears in the folder. Invalid ids are
    /// ignored (they could never be looked up).
    pub fn register(&self, id: &str, path: PathBuf) {
        if !valid_id(id) {
            tracing::warn!(
                record_id = id,
                "not registering a recording with an unsafe id"
            );
            return;
        }
        // A poisoned lock only means another thread panicked mid-insert; the map is
        // still a valid map.
        let mut map = self.originals.write().unwrap_or_else(|p| p.into_inner());
        map.insert(id.to_string(), path);
    }
}

impl RecordingCatalog for DirCatalog {
    fn path_of(&self, id: &str) -> Option<PathBuf> {
        if !valid_id(id) {
            return None;
        }
        for ext in ["mp3", "wav"] {
            let p = self.dir.join(format!("{id}.{ext}"));
            if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                return Some(p);
            }
        }
        let map = self.originals.read().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
            .cloned()
    }
}

impl<T: RecordingCatalog + ?Sized> RecordingCatalog for std::sync::Arc<T> {
    fn path_of(&self, id: &str) -> Option<PathBuf> {
        (**self).path_of(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_real_names_are_kept() {
        let p = Path::new(
            "/var/spool/asterisk/monitor/in-20261121-234741-79161234567-1795304861.0.wav",
        );
        let id = id_from_path(p);
        assert_eq!(id, "in-20261121-234741-79161234567-1795304861.0");
        assert!(valid_id(&id));
    }

    #[test]
    fn unsafe_ids_are_refused_or_sanitized() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "a..b",
            "a b",
            "a%2fb",
        ] {
            assert!(!valid_id(bad), "{bad:?} accepted");
        }
        for name in ["+7 916 123.wav", "..wav", "...x.wav", "a..b.wav"] {
            let id = id_from_path(Path::new(name));
            assert!(valid_id(&id), "{name:?} -> {id:?}");
        }
    }

    #[test]
    fn mp3_in_folder_wins_over_registered_original() {
        let tmp = tempfile::tempdir().unwrap();
        let orig = tmp.path().join("orig.wav");
        std::fs::write(&orig, b"RIFF").unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let cat = DirCatalog::new(&store);
        assert_eq!(cat.path_of("call-1"), None);
        cat.register("call-1", orig.clone());
        assert_eq!(cat.path_of("call-1"), Some(orig));
        let mp3 = store.join("call-1.mp3");
        std::fs::write(&mp3, b"ID3").unwrap();
        assert_eq!(cat.path_of("call-1"), Some(mp3));
        assert_eq!(cat.path_of("../store/call-1"), None);
    }
}
