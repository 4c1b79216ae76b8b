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
