//! What later jobs of the same call need to know about it: the Bitrix24 `CALL_ID` and
//! whose cards are open. Jobs of one call are delivered in order per connector, so a
//! record written while handling one stage is visible to the next one.
//!
//! The daemon backs [`CallIdStore`] with SQLite so a restart mid-call still finishes the
//! right `CALL_ID` and hides every card it showed; [`MemoryCallIdStore`] serves tests.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One call's Bitrix24 state, keyed by our call id (the Linkedid).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallRecord {
    /// Bitrix24's `CALL_ID` (`externalCall.…`).
    pub call_id: String,
    /// The Bitrix24 user the call was registered for.
    pub user_id: i64,
    /// Users whose call card is open (every one of them gets a `hide`).
    pub shown: Vec<i64>,
    /// Users whose phone rang, in order (for the missed-call responsible rules).
    pub rang: Vec<i64>,
    /// The call was started from Bitrix24 (`ONEXTERNALCALLSTART`): it was registered
    /// by Bitrix24 itself.
    pub click_to_call: bool,
    /// The CRM entity the call was bound to (`LEAD`, `CONTACT`, `COMPANY`).
    pub crm_entity_type: Option<String>,
    pub crm_entity_id: Option<i64>,
    /// The entity was created by this call (Bitrix24 then makes the finishing user
    /// responsible itself).
    pub crm_created: bool,
    pub finished: bool,
}

/// Durable per-call state shared by the jobs of one call.
pub trait CallIdStore: Send + Sync {
    fn get(&self, call_id: &str) -> Option<CallRecord>;
    /// Store `rec` (atomically; before the next step of the job runs).
    fn put(&self, call_id: &str, rec: &CallRecord) -> Result<(), String>;
    /// Forget a call once every step of its `call_ended` job is done.
    fn remove(&self, call_id: &str);
}

/// In-memory [`CallIdStore`] (tests, or a daemon that accepts losing cards on restart).
#[derive(Debug, Default)]
pub struct MemoryCallIdStore(Mutex<HashMap<String, CallRecord>>);

impl MemoryCallIdStore {
    /// How many calls are tracked.
    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CallIdStore for MemoryCallIdStore {
    fn get(&self, call_id: &str) -> Option<CallRecord> {
        self.0.lock().ok()?.get(call_id).cloned()
    }
    fn put(&self, call_id: &str, rec: &CallRecord) -> Result<(), String> {
        self.0
            .lock()
            .map_err(|_| "call id store poisoned".to_string())?
            .insert(call_id.to_string(), rec.clone());
        Ok(())
    }
    fn remove(&self, call_id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(call_id);
        }
    }
}
