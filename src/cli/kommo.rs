//! `kolokol kommo`: authorize the integration, list users for `[kommo.users]`, check
//! the account.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{self, Config};
use crate::crm::kommo::{KommoConfig, KommoConnector};
use crate::hooks::NoCustomizations;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Exchange an authorization code (from the integration's settings in Kommo; valid
    /// 20 minutes) for OAuth tokens, stored in the state database
    /// (`<storage.state_dir>/kolokol.db`), where the daemon reads them.
    Auth {
        /// The authorization code.
        #[arg(long)]
        code: String,
        #[command(flatten)]
        config: super::ConfigArg,
    },
    /// List the account's users (id, name, e-mail) to fill `[kommo.users]`.
    Users {
        #[command(flatten)]
        config: super::ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the account: contact PHONE field, users readable, user mapping.
    Check {
        #[command(flatten)]
        config: super::ConfigArg,
    },
}

fn load(arg: &super::ConfigArg) -> anyhow::Result<(Config, KommoConfig)> {
    let path = arg
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let cfg = Config::load(&path)?;
    let kommo = cfg.kommo.clone().with_context(|| {
        format!(
            "{} has no [kommo] section: add base_url and client_id/client_secret/redirect_uri or long_lived_token",
            path.display()
        )
    })?;
    Ok((cfg, kommo))
}

async fn connector(cfg: &Config, kommo: KommoConfig) -> anyhow::Result<KommoConnector> {
    let store = crate::store::Store::open(&cfg.storage)
        .context("cannot open the state database ([storage] state_dir) to keep the tokens")?;
    Ok(KommoConnector::new(
        kommo,
        Arc::new(store),
        Arc::new(NoCustomizations),
    )?)
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Auth { code, config } => {
            let (cfg, kommo) = load(&config)?;
            if kommo.client_id.is_empty() || kommo.client_secret.is_empty() {
                anyhow::bail!(
                    "[kommo] client_id and client_secret are needed for OAuth (copy them from the integration's \"Keys and scopes\" tab)"
                );
            }
            let c = connector(&cfg, kommo).await?;
            let tokens = c.client().exchange_code(code.trim()).await?;
            println!(
                "Kommo authorized; tokens stored in {} (access token valid until unix time {})",
                cfg.storage.db_path().display(),
                tokens.expires_at
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Users { config, json } => {
            let (cfg, kommo) = load(&config)?;
            let mapped = kommo.users.clone();
            let c = connector(&cfg, kommo).await?;
            let users = c.users().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                println!("{:>10}  {:<30}  {:<30}  extension", "id", "name", "email");
                for u in &users {
                    let ext: Vec<&str> = mapped
                        .iter()
                        .filter(|(_, id)| **id == u.id)
                        .map(|(e, _)| e.as_str())
                        .collect();
                    println!(
                        "{:>10}  {:<30}  {:<30}  {}",
                        u.id,
                        u.name,
                        u.email,
                        ext.join(",")
                    );
                }
                println!(
                    "\nMap internal numbers in the config, e.g.\n[kommo.users]\n\"101\" = <id>"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let (cfg, kommo) = load(&config)?;
            let c = connector(&cfg, kommo).await?;
            let check = c.check_account().await?;
            println!(
                "Kommo account OK: contact phone field id {}, {} users",
                check.phone_field_id,
                check.users.len()
            );
            for (ext, id) in &check.unknown_mapped {
                println!(
                    "warning: [kommo.users] \"{ext}\" = {id}: no such user (see `kolokol kommo users`)"
                );
            }
            Ok(if check.unknown_mapped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
