//! `[calls]` config section: how to tell employees from trunks, and what to keep.
//!
//! The defaults fit a standard PBX with no config at all: endpoints named with 2 to 5
//! digits are employees (extensions), every other endpoint is a trunk.

use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Internal numbers (extensions) match this regex.
    pub internal_number_regex: String,
    /// Endpoints that are trunks, whatever their number looks like. Empty: every
    /// endpoint whose name is not an internal number is a trunk.
    pub trunks: Vec<String>,
    /// Endpoints that are employees whatever their name looks like (e.g. `alice-desk`).
    pub internal_endpoints: Vec<String>,
    /// Dialplan contexts of inbound trunk channels (a channel created in one of these
    /// contexts is a trunk). Empty: decided by endpoint name only.
    pub trunk_contexts: Vec<String>,
    /// Channel variables copied into `call_full.variables` when set on any channel of
    /// the call. A trailing `*` matches a prefix (`CRM_*`). Variables given to an
    /// Originate are always kept.
    pub keep_variables: Vec<String>,
    /// Offset of the times written in `call_full` (`+03:00`); UTC by default.
    pub time_offset: String,
    /// Forget a call that had no event for this long.
    #[serde(with = "humantime_serde")]
    pub reap_after: Duration,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            internal_number_regex: r"^\d{2,5}$".into(),
            trunks: Vec::new(),
            internal_endpoints: Vec::new(),
            trunk_contexts: Vec::new(),
            keep_variables: vec!["CRM_*".into(), "KOLOKOL_*".into()],
            time_offset: "+00:00".into(),
            reap_after: Duration::from_secs(6 * 3600),
        }
    }
}

/// Why a `[calls]` section cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CallsConfigError {
    #[error("calls.internal_number_regex is not a valid regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("calls.time_offset '{0}' is not an offset like +03:00 or -05:30 (use +00:00 for UTC)")]
    TimeOffset(String),
}

/// [`parse_offset`], or UTC when `s` is not an offset (the tracker refuses such a
/// config at start, so this only matters to tools that read call_full elsewhere).
pub fn offset_or_utc(s: &str) -> chrono::FixedOffset {
    use chrono::Offset;
    parse_offset(s).unwrap_or_else(|_| chrono::Utc.fix())
}

/// Parse `+03:00`, `-0530`, `Z`, `UTC` into a chrono offset.
pub(crate) fn parse_offset(s: &str) -> Result<chrono::FixedOffset, CallsConfigError> {
    let bad = || CallsConfigError::TimeOffset(s.to_string());
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return chrono::FixedOffset::east_opt(0).ok_or_else(bad);
    }
    let (sign, rest) = match t.as_bytes()[0] {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let h: i32 = digits[..2].parse().map_err(|_| bad())?;
    let m: i32 = digits[2..].parse().map_err(|_| bad())?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

impl CallsConfig {
    /// Check the section without building a tracker (used by `check-config`).
    pub fn validate(&self) -> Result<(), CallsConfigError> {
        regex::Regex::new(&self.internal_number_regex)?;
        parse_offset(&self.time_offset)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_offset("+03:00").unwrap().local_minus_utc(), 3 * 3600);
        assert_eq!(parse_offset("-0530").unwrap().local_minus_utc(), -19800);
        assert_eq!(parse_offset("UTC").unwrap().local_minus_utc(), 0);
        let e = parse_offset("Moscow").unwrap_err().to_string();
        assert!(e.contains("calls.time_offset"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_section_rejects_unknown_keys() {
        CallsConfig::default().validate().unwrap();
        let r: Result<CallsConfig, _> = toml::from_str("internal_number = 1");
        assert!(r.is_err());
        let c: CallsConfig = toml::from_str("trunks = [\"sip-out\"]\nreap_after = \"2h\"").unwrap();
        assert_eq!(c.reap_after, Duration::from_secs(7200));
        assert_eq!(c.internal_number_regex, r"^\d{2,5}$");
    }
}
