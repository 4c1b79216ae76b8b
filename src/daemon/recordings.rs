//! The recordings catalog the daemon serves from: converted files in the records store
//! folder first, then every file the pipeline registered in the state database, so an
//! unconverted original stays reachable behind its link after a restart.

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::OptionalExtension;

use crate::records::{DirCatalog, RecordingCatalog, valid_id};
use crate::store::Store;

pub(crate) struct DbCatalog {
    pub dir: Arc<DirCatalog>,
    pub store: Store,
}

impl RecordingCatalog for DbCatalog {
    fn path_of(&self, id: &str) -> Option<PathBuf> {
        if let Some(p) = self.dir.path_of(id) {
            return Some(p);
        }
        if !valid_id(id) {
            return None;
        }
        let key = id.to_string();
        let path = self
            .store
            .call_blocking(move |c| {
                Ok(
                    c.prepare_cached("SELECT path FROM recordings WHERE id = ?1")?
                        .query_row([key], |r| r.get::<_, String>(0))
                        .optional()?,
                )
            })
            .ok()??;
        let path = PathBuf::from(path);
        // Only files still inside the folders the records module serves from.
        std::fs::metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .map(|_| path)
    }
}

/// Recordings for Bitrix24's `record = "upload"`: the file behind the call's signed
/// link (the converted mp3 once it is ready), not the PBX's original path.
///
/// The link is written into `call_full` before the conversion ends, so the upload
/// may come first: it waits up to `wait` for the converted file, then falls back to
/// what the PBX wrote (Bitrix24 takes wav as well).
pub(crate) struct DaemonRecords {
    pub catalog: Arc<dyn RecordingCatalog>,
    pub signer: crate::records::LinkSigner,
    pub wait: std::time::Duration,
}

impl DaemonRecords {
    /// The recording id a `…/records/<token>.<ext>` link was signed for (expired or not:
    /// a redelivered job may come after the link's lifetime).
    fn id_of_link(&self, link: &str) -> Option<String> {
        let last = link.split(['?', '#']).next()?.rsplit('/').next()?;
        let token = last.rsplit_once('.').map_or(last, |(t, _ext)| t);
        self.signer.verify_at(token, 0).ok()
    }
}

impl crate::crm::bitrix24::RecordSource for DaemonRecords {
    fn link<'a>(
        &'a self,
        call: &'a crate::calls::CallFull,
    ) -> crate::crm::BoxFuture<'a, Option<String>> {
        crate::crm::bitrix24::PathRecords.link(call)
    }

    fn file<'a>(
        &'a self,
        call: &'a crate::calls::CallFull,
    ) -> crate::crm::BoxFuture<'a, Option<PathBuf>> {
        Box::pin(async move {
            let id = call
                .extra
                .get("record_link")
                .and_then(serde_json::Value::as_str)
                .and_then(|l| self.id_of_link(l));
            if let Some(id) = id {
                let deadline = tokio::time::Instant::now() + self.wait;
                loop {
                    let catalog = self.catalog.clone();
                    let key = id.clone();
                    let found = tokio::task::spawn_blocking(move || catalog.path_of(&key))
                        .await
                        .ok()
                        .flatten();
                    if found.is_some() {
                        return found;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(call_id = %call.id, record_id = %id, "converted recording not ready: uploading the PBX's file");
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
            crate::crm::bitrix24::PathRecords.file(call).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::bitrix24::RecordSource;
    use crate::records::{DirCatalog, LinkSigner};
    use std::time::Duration;

    fn setup(wait: Duration) -> (tempfile::TempDir, Arc<DirCatalog>, DaemonRecords) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(DirCatalog::new(dir.path().join("store")));
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let records = DaemonRecords {
            catalog: catalog.clone(),
            signer: LinkSigner::new(b"secret", Some(Duration::from_secs(1))),
            wait,
        };
        (dir, catalog, records)
    }

    fn call(records: &DaemonRecords, original: &std::path::Path) -> crate::calls::CallFull {
        let mut c = crate::calls::CallFull {
            id: "1795304861.0".into(),
            record: original.display().to_string(),
            ..Default::default()
        };
        // Signed long ago: an expired link still names its recording.
        let token = records.signer.token_at("in-101-1795304861.0", Some(1));
        c.extra.insert(
            "record_link".into(),
            serde_json::json!(format!("https://pbx.example.com/records/{token}.mp3")),
        );
        c
    }

    #[tokio::test]
    async fn upload_takes_the_converted_file_once_it_is_ready() {
        let (dir, catalog, records) = setup(Duration::from_secs(5));
        let original = dir.path().join("in-101-1795304861.0.wav");
        std::fs::write(&original, b"RIFF").unwrap();
        let c = call(&records, &original);
        let mp3 = catalog.dir().join("in-101-1795304861.0.mp3");
        let later = mp3.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(later, b"ID3").unwrap();
        });
        assert_eq!(records.file(&c).await, Some(mp3));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn upload_falls_back_to_the_pbx_file_when_conversion_never_ends() {
        let (dir, _catalog, records) = setup(Duration::from_millis(300));
        let original = dir.path().join("in-101-1795304861.0.wav");
        std::fs::write(&original, b"RIFF").unwrap();
        let c = call(&records, &original);
        assert_eq!(records.file(&c).await, Some(original.clone()));
        // A link signed with another secret is not ours: straight to the PBX file.
        let mut forged = c.clone();
        forged.extra.insert(
            "record_link".into(),
            serde_json::json!("https://pbx.example.com/records/aW4.0.c2ln.mp3"),
        );
        assert_eq!(records.id_of_link("https://x/records/aW4.0.c2ln.mp3"), None);
        assert_eq!(records.file(&forged).await, Some(original));
    }
}
