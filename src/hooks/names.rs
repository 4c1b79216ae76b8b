//! The thirteen customization points, by the file name an admin gives the script.

use std::fmt;
use std::time::Duration;

/// What an empty `data` (`{}`, `[]`, `null`) from a hook means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEmpty {
    /// The hook precedes a request (CRM request, registration, originate): empty data
    /// cancels that request.
    Cancel,
    /// Empty data makes no sense here (a path, a routing target): use the default.
    UseDefault,
    /// The output is not used (`post_registration`): empty data is a normal answer.
    Accept,
}

/// One customization point. The script's file name is [`Hook::as_str`], with an
/// optional extension (`need_registration`, `need_registration.py`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    NeedRegistration,
    ProcessCallParams,
    ProcessClientPhone,
    ProcessContactCreationParams,
    ProcessLeadCreationParams,
    ProcessOriginateParams,
    ProcessRecordFilePath,
    ProcessTaskCreationParams,
    Autodistribution,
    PostRegistration,
    ProcessContactUpdateParams,
    ProcessLeadUpdateParams,
    ProcessUnsortedCreationParams,
}

/// The default timeout of every hook but `process_record_file_path`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// `process_record_file_path` may convert audio, so it gets longer.
pub const RECORD_FILE_PATH_TIMEOUT: Duration = Duration::from_secs(10);

impl Hook {
    /// All hooks, in the order of the Itgrix documentation.
    pub const ALL: [Hook; 13] = [
        Hook::NeedRegistration,
        Hook::ProcessCallParams,
        Hook::ProcessClientPhone,
        Hook::ProcessContactCreationParams,
        Hook::ProcessLeadCreationParams,
        Hook::ProcessOriginateParams,
        Hook::ProcessRecordFilePath,
        Hook::ProcessTaskCreationParams,
        Hook::Autodistribution,
        Hook::PostRegistration,
        Hook::ProcessContactUpdateParams,
        Hook::ProcessLeadUpdateParams,
        Hook::ProcessUnsortedCreationParams,
    ];

    /// The script's file name without extension; also the name in config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::NeedRegistration => "need_registration",
            Hook::ProcessCallParams => "process_call_params",
            Hook::ProcessClientPhone => "process_client_phone",
            Hook::ProcessContactCreationParams => "process_contact_creation_params",
            Hook::ProcessLeadCreationParams => "process_lead_creation_params",
            Hook::ProcessOriginateParams => "process_originate_params",
            Hook::ProcessRecordFilePath => "process_record_file_path",
            Hook::ProcessTaskCreationParams => "process_task_creation_params",
            Hook::Autodistribution => "autodistribution",
            Hook::PostRegistration => "post_registration",
            Hook::ProcessContactUpdateParams => "process_contact_update_params",
            Hook::ProcessLeadUpdateParams => "process_lead_update_params",
            Hook::ProcessUnsortedCreationParams => "process_unsorted_creation_params",
        }
    }

    /// The hook called `name`, if it is one of the thirteen.
    pub fn from_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.as_str() == name)
    }

    /// Comma-separated list of every hook name, for error messages.
    pub fn names() -> String {
        Hook::ALL.map(Hook::as_str).join(", ")
    }

    /// Timeout when `[customizations.timeouts]` does not set one.
    pub fn default_timeout(self) -> Duration {
        match self {
            Hook::ProcessRecordFilePath => RECORD_FILE_PATH_TIMEOUT,
            _ => DEFAULT_TIMEOUT,
        }
    }

    /// What an empty `data` means for this hook.
    pub fn on_empty(self) -> OnEmpty {
        match self {
            Hook::ProcessRecordFilePath | Hook::Autodistribution => OnEmpty::UseDefault,
            Hook::PostRegistration => OnEmpty::Accept,
            _ => OnEmpty::Cancel,
        }
    }

    /// Fields the script may read but never change: dropped from the returned data.
    /// `call_full` and `call_stage` are context for every hook and never sent on.
    pub fn read_only_fields(self) -> &'static [&'static str] {
        match self {
            Hook::Autodistribution => &[
                "from",
                "trunk",
                "request_data",
                "entity",
                "error",
                "call_full",
                "call_stage",
            ],
            _ => &["call_full", "call_stage"],
        }
    }

    /// What kolokol does when this hook is absent or fails, in one sentence for admins.
    pub fn default_behaviour(self) -> &'static str {
        match self {
            Hook::NeedRegistration => "the call is registered",
            Hook::ProcessCallParams => "the call is registered with kolokol's own parameters",
            Hook::ProcessClientPhone => "the phone number is used as normalised by kolokol",
            Hook::ProcessContactCreationParams => {
                "the contact is created with kolokol's parameters"
            }
            Hook::ProcessLeadCreationParams => "the lead is created with kolokol's parameters",
            Hook::ProcessOriginateParams => "the call is originated with kolokol's parameters",
            Hook::ProcessRecordFilePath => "the recording path from Asterisk is used as is",
            Hook::ProcessTaskCreationParams => "the task is created with kolokol's parameters",
            Hook::Autodistribution => "the call goes to the responsible user found in the CRM",
            Hook::PostRegistration => "nothing more is done after registration",
            Hook::ProcessContactUpdateParams => "the contact is updated with kolokol's parameters",
            Hook::ProcessLeadUpdateParams => "the lead is updated with kolokol's parameters",
            Hook::ProcessUnsortedCreationParams => {
                "the unsorted item is created with kolokol's parameters"
            }
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for h in Hook::ALL {
            assert_eq!(Hook::from_name(h.as_str()), Some(h));
        }
        let mut names: Vec<_> = Hook::ALL.iter().map(|h| h.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 13);
        assert_eq!(Hook::from_name("need_registration.php"), None);
    }

    #[test]
    fn timeouts_and_empty_policy() {
        assert_eq!(
            Hook::ProcessRecordFilePath.default_timeout(),
            Duration::from_secs(10)
        );
        assert_eq!(
            Hook::NeedRegistration.default_timeout(),
            Duration::from_secs(3)
        );
        assert_eq!(Hook::ProcessLeadCreationParams.on_empty(), OnEmpty::Cancel);
        assert_eq!(Hook::Autodistribution.on_empty(), OnEmpty::UseDefault);
        assert_eq!(Hook::PostRegistration.on_empty(), OnEmpty::Accept);
    }
}
