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
        }
    }
}

impl DuvoConfig {
    /// Resolve the API key from `api_key`, `api_key_file`,
    /// `api_key_credential` or `api_key_env`, in that order.
    pub fn resolve_api_key(&self) -> Result<ApiKey, String> {
        if let Some(k) = &self.api_key {
            if k.is_empty() {
                return Err("duvo.api_key is empty".into());
            }
            return Ok(ApiKey::new(k.expose()));
        }
        if let Some(path) = &self.api_key_file {
            return match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => Ok(ApiKey::new(s.trim())),
                Ok(_) => Err(format!("duvo.api_key_file {} is empty", path.display())),
                Err(e) => Err(format!(
                    "duvo.api_key_file {} cannot be read: {e}",
                    path.display()
                )),
            };
        }
        if let Some(name) = &self.api_key_credential {
            return crate::secret::read_credential("duvo.api_key_credential", name)
                .map(ApiKey::new);
        }
        if let Some(var) = &self.api_key_env {
            return match std::env::var(var) {
                Ok(s) if !s.trim().is_empty() => Ok(ApiKey::new(s.trim())),
                _ => Err(format!(
                    "duvo.api_key_env: environment variable {var} is not set or empty"
                )),
            };
        }
        Err("duvo: no API key configured (set api_key_env, api_key_file or api_key)".into())
    }
}

impl DuvoConfig {
    /// Every problem with the `[duvo]` section (the key must resolve).
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let d = self;
        if !(d.base_url.starts_with("http://") || d.base_url.starts_with("https://")) {
            errors.push(format!(
                "duvo.base_url must start with http:// or https:// (got {:?})",
                d.base_url
            ));
        }
        if d.rate_limit_per_minute == 0 {
            errors.push("duvo.rate_limit_per_minute must be at least 1".into());
        }
        if !(d.rate_share > 0.0 && d.rate_share <= 1.0) {
            errors.push(format!(
                "duvo.rate_share must be in (0, 1] (got {})",
                d.rate_share
            ));
        }
        if d.burst == 0 {
            errors.push("duvo.burst must be at least 1".into());
        }
        if d.timeout_secs == 0 {
            errors.push("duvo.timeout_secs must be at least 1".into());
        }
        if let Err(e) = d.resolve_api_key() {
            errors.push(e);
        }
        errors
    }
}
