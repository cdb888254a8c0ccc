//! `[duvo]`: where the API is, which key to use, how fast to go.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::secret::{ApiKey, Secret};

/// How to reach the Duvo API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DuvoConfig {
    /// Scheme, host and port of the API (no version prefix).
    pub base_url: String,
    /// Version prefix appended to `base_url`.
    pub version_prefix: String,
    /// Name of the environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File holding the API key (e.g. a mounted Kubernetes secret).
    /// Surrounding whitespace is trimmed.
    pub api_key_file: Option<PathBuf>,
    /// Name of a systemd credential holding the API key
    /// (`LoadCredential=<name>:<path>` in the unit): the key is read from
    /// `$CREDENTIALS_DIRECTORY/<name>`, a file only this service can read.
    pub api_key_credential: Option<String>,
    /// The key itself. Discouraged (it ends up in a file readable by whoever
    /// reads the config); prefer `api_key_env` or `api_key_file`.
    pub api_key: Option<Secret>,
    /// Requests per minute this bridge may send with this key (all endpoints).
    pub rate_limit_per_minute: u32,
    /// Share of the key's budget this replica takes when several replicas
    /// share one key (e.g. 0.33 each for three replicas).
    pub rate_share: f64,
    /// Requests that may leave back to back before pacing applies.
    pub burst: u32,
    /// Whole-request timeout, seconds. A timeout is retried with the same
    /// idempotency key.
    pub timeout_secs: u64,
    /// What a start does when a source's queue is missing (404) or its
    /// account's key is refused (401/403) by `GET /queues/{id}`: `refuse`
    /// (exit 64 before anything is acknowledged), `warn` (log and start;
    /// also `run --start-anyway`), `off` (no check). A queue that cannot be
    /// checked (API down or slow) is logged and never stops a start.
    pub check_queues: QueueCheckMode,
    /// Further Duvo accounts (`[[duvo.accounts]]`): another team's key with
    /// its own budget, rate gate, batcher and tracker. The fields above are
    /// the implicit account `default`, which every source and route uses
    /// unless it names another (`account = "..."`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<AccountConfig>,
}

/// `[duvo] check_queues`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QueueCheckMode {
    #[default]
    Refuse,
    Warn,
    Off,
}

/// Name of the implicit account: the key and budget of `[duvo]` itself.
pub const DEFAULT_ACCOUNT: &str = "default";

/// One more Duvo account (`[[duvo.accounts]]`). Unset fields take
/// `[duvo]`'s value, except the key, which each account must name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// What routes and sources call it (`account = "brand-b"`); letters,
    /// digits, `-` and `_`; not `default`.
    pub name: String,
    /// Scheme, host and port of its API (default: `[duvo] base_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Its key, as in `[duvo]` (one of these four).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_credential: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    /// Its key's requests per minute (default: `[duvo]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_minute: Option<u32>,
    /// This replica's share of that budget (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_share: Option<f64>,
    /// Requests back to back before pacing applies (default: `[duvo]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl Default for DuvoConfig {
    fn default() -> Self {
        DuvoConfig {
            base_url: "http://127.0.0.1:8088".into(),
            version_prefix: "/v2".into(),
            api_key_env: Some("DUVO_API_KEY".into()),
            api_key_file: None,
            api_key_credential: None,
            api_key: None,
            rate_limit_per_minute: 300,
            rate_share: 1.0,
            burst: 3,
            timeout_secs: 30,
            check_queues: QueueCheckMode::Refuse,
            accounts: Vec::new(),
        }
    }
}

impl DuvoConfig {
    /// Resolve the API key from `api_key`, `api_key_file`,
    /// `api_key_credential` or `api_key_env`, in that order.
    pub fn resolve_api_key(&self) -> Result<ApiKey, String> {
        self.resolve_api_key_at("duvo")
    }

    /// [`DuvoConfig::resolve_api_key`], errors naming the section `at`.
    fn resolve_api_key_at(&self, at: &str) -> Result<ApiKey, String> {
        if let Some(k) = &self.api_key {
            if k.is_empty() {
                return Err(format!("{at}.api_key is empty"));
            }
            return Ok(ApiKey::new(k.expose()));
        }
        if let Some(path) = &self.api_key_file {
            return match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => Ok(ApiKey::new(s.trim())),
                Ok(_) => Err(format!("{at}.api_key_file {} is empty", path.display())),
                Err(e) => Err(format!(
                    "{at}.api_key_file {} cannot be read: {e}",
                    path.display()
                )),
            };
        }
        if let Some(name) = &self.api_key_credential {
            return crate::secret::read_credential(&format!("{at}.api_key_credential"), name)
                .map(ApiKey::new);
        }
        if let Some(var) = &self.api_key_env {
            return match std::env::var(var) {
                Ok(s) if !s.trim().is_empty() => Ok(ApiKey::new(s.trim())),
                _ => Err(format!(
                    "{at}.api_key_env: environment variable {var} is not set or empty"
                )),
            };
        }
        Err(format!(
            "{at}: no API key configured (set api_key_env, api_key_file, api_key_credential or api_key)"
        ))
    }

    /// Every account, the implicit `default` first, each as a complete
    /// `[duvo]` of its own (its `accounts` empty).
    pub fn account_configs(&self) -> Vec<(String, DuvoConfig)> {
        let base = DuvoConfig {
            accounts: Vec::new(),
            ..self.clone()
        };
        let mut out = vec![(DEFAULT_ACCOUNT.to_string(), base.clone())];
        for a in &self.accounts {
            out.push((
                a.name.clone(),
                DuvoConfig {
                    base_url: a.base_url.clone().unwrap_or_else(|| base.base_url.clone()),
                    api_key_env: a.api_key_env.clone(),
                    api_key_file: a.api_key_file.clone(),
                    api_key_credential: a.api_key_credential.clone(),
                    api_key: a.api_key.clone(),
                    rate_limit_per_minute: a
                        .rate_limit_per_minute
                        .unwrap_or(base.rate_limit_per_minute),
                    rate_share: a.rate_share.unwrap_or(1.0),
                    burst: a.burst.unwrap_or(base.burst),
                    ..base.clone()
                },
            ));
        }
        out
    }

    /// The section name of an account in errors.
    pub fn account_at(name: &str) -> String {
        if name == DEFAULT_ACCOUNT {
            "duvo".into()
        } else {
            format!("duvo.accounts.{name}")
        }
    }
}

impl DuvoConfig {
    /// Every problem with the `[duvo]` section (the key must resolve).
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for a in &self.accounts {
            let ok_name = !a.name.is_empty()
                && a.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok_name {
                errors.push(format!(
                    "duvo.accounts: name {:?} must be letters, digits, - and _",
                    a.name
                ));
            } else if a.name == DEFAULT_ACCOUNT {
                errors.push(format!(
                    "duvo.accounts: {DEFAULT_ACCOUNT:?} is the implicit account of [duvo] itself; name this one otherwise"
                ));
            } else if !names.insert(a.name.clone()) {
                errors.push(format!("duvo.accounts: name {:?} is used twice", a.name));
            }
        }
        let mut keys: Vec<(String, ApiKey)> = Vec::new();
        for (name, d) in self.account_configs() {
            let at = Self::account_at(&name);
            errors.extend(d.check_one(&at));
            if let Ok(k) = d.resolve_api_key_at(&at) {
                if let Some((other, _)) = keys.iter().find(|(_, o)| o.expose() == k.expose()) {
                    errors.push(format!(
                        "{at} uses the same API key as {other}: one key has one budget; give each account its own key"
                    ));
                }
                keys.push((at, k));
            }
        }
        errors
    }

    /// The checks of one account's settings (`at` names it in errors).
    fn check_one(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        let d = self;
        if !(d.base_url.starts_with("http://") || d.base_url.starts_with("https://")) {
            errors.push(format!(
                "{at}.base_url must start with http:// or https:// (got {:?})",
                d.base_url
            ));
        }
        if d.rate_limit_per_minute == 0 {
            errors.push(format!("{at}.rate_limit_per_minute must be at least 1"));
        }
        if !(d.rate_share > 0.0 && d.rate_share <= 1.0) {
            errors.push(format!(
                "{at}.rate_share must be in (0, 1] (got {})",
                d.rate_share
            ));
        }
        if d.burst == 0 {
            errors.push(format!("{at}.burst must be at least 1"));
        }
        if d.timeout_secs == 0 {
            errors.push(format!("{at}.timeout_secs must be at least 1"));
        }
        if let Err(e) = d.resolve_api_key_at(at) {
            errors.push(e);
        }
        errors
    }
}
