//! The TOML config file: one section per part of kolokol. Unknown keys and bad values
//! are rejected with the key path and the reason.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::agi::AgiConfig;
use crate::ami::AmiConfig;
use crate::calls::CallsConfig;
use crate::crm::bitrix24::Bitrix24Config;
use crate::crm::kommo::KommoConfig;
use crate::hooks::HooksConfig;
use crate::http::HttpConfig;
use crate::originate::OriginateConfig;
use crate::records::RecordsConfig;
use crate::store::StorageConfig;

/// Where the config lives unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/kolokol/config.toml";

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub ami: AmiConfig,
    pub calls: CallsConfig,
    pub customizations: HooksConfig,
    pub records: RecordsConfig,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub agi: AgiConfig,
    pub originate: OriginateConfig,
    pub kommo: Option<KommoConfig>,
    pub bitrix24: Option<Bitrix24Config>,
}

/// A config that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

impl Config {
    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// `--config PATH` if given, else the built-in defaults (which replay a standard PBX).
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None => Ok(Config::default()),
        }
    }

    /// Parse TOML text; `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                reason: inner.message().trim().to_string(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks that serde cannot express (regexes compile, values in range).
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if let Err(e) = regex::Regex::new(&self.calls.internal_number_regex) {
            return Err(invalid("calls.internal_number_regex", e.to_string()));
        }
        if self.ami.port == 0 {
            return Err(invalid("ami.port", "must be 1-65535".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let err = Config::from_toml("[ami]\nhots = \"x\"\n", Path::new("c.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ami"), "{text}");
        assert!(text.contains("hots"), "{text}");
    }

    #[test]
    fn bad_value_is_named_with_its_path() {
        let err = Config::from_toml("[ami]\nauth = \"sha\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("ami.auth"), "{err}");
    }

    #[test]
    fn ami_section_reads_documented_names() {
        let c = Config::from_toml(
            "[ami]\nhost = \"10.0.0.5\"\nport = 5039\nusername = \"u\"\nsecret = \"s\"\nauth = \"md5\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.ami.port, 5039);
        assert_eq!(c.ami.auth, crate::ami::AmiAuth::Md5);
    }
}
