//! SIGHUP: re-read the configuration file (with its environment overrides)
//! and apply what can change without a restart: the rate
//! (`duvo.rate_limit_per_minute`, `duvo.rate_share`, applied to the rate
//! gate at once, even to requests already waiting) and the log level
//! (`log.level`, swapped in the tracing filter). A file that does not
//! validate is refused as a whole with every problem logged, and the bridge
//! keeps running with what it had. Any other changed section is named in a
//! warning: it takes effect at the next restart.

use std::path::PathBuf;

use crate::config::{Config, ConfigErrors};
use crate::deliver::gate::RateGate;

/// What one reload changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReloadOutcome {
    /// Settings applied, as `key: old -> new`.
    pub applied: Vec<String>,
    /// Top-level sections (or `sources`) that changed but need a restart.
    pub needs_restart: Vec<String>,
}

impl ReloadOutcome {
    /// One line for logs and `STATUS=`.
    pub fn summary(&self) -> String {
        let applied = if self.applied.is_empty() {
            "nothing to apply".to_string()
        } else {
            self.applied.join(", ")
        };
        if self.needs_restart.is_empty() {
            format!("reloaded: {applied}")
        } else {
            format!(
                "reloaded: {applied}; changed, applied at the next restart: {}",
                self.needs_restart.join(", ")
            )
        }
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
}

/// Holds the configuration in force and applies new versions of the file.
pub struct Reloader {
    path: PathBuf,
    current: Config,
    /// Each account's gate by account name.
    gates: Vec<(String, RateGate)>,
}

impl Reloader {
    /// `gates`: each account's rate gate, by account name.
    pub fn new(path: PathBuf, current: Config, gates: Vec<(String, RateGate)>) -> Self {
        Reloader {
            path,
            current,
            gates,
        }
    }

    /// Re-read the file and apply it; on error nothing changes.
    pub fn reload(&mut self) -> Result<ReloadOutcome, ReloadError> {
        let next = Config::load(&self.path)?;
        Ok(self.apply(next))
    }

    /// Apply `next` over the configuration in force.
    pub fn apply(&mut self, next: Config) -> ReloadOutcome {
        let mut out = ReloadOutcome::default();
        let olds = self.current.duvo.account_configs();
        for (name, new) in next.duvo.account_configs() {
            // An account added or removed needs a restart (named below).
            let (Some((_, old)), Some((_, gate))) = (
                olds.iter().find(|(n, _)| *n == name),
                self.gates.iter().find(|(n, _)| *n == name),
            ) else {
                continue;
            };
            let at = crate::duvo::config::DuvoConfig::account_at(&name);
            if old.rate_limit_per_minute != new.rate_limit_per_minute {
                gate.set_rate(new.rate_limit_per_minute);
                out.applied.push(format!(
                    "{at}.rate_limit_per_minute: {} -> {}",
                    old.rate_limit_per_minute, new.rate_limit_per_minute
                ));
            }
            if old.rate_share != new.rate_share {
                gate.set_share(new.rate_share);
                out.applied.push(format!(
                    "{at}.rate_share: {} -> {}",
                    old.rate_share, new.rate_share
                ));
            }
        }
        if self.current.log.level != next.log.level {
            match crate::telemetry::set_log_level(&next.log.level) {
                Ok(()) => out.applied.push(format!(
                    "log.level: {:?} -> {:?}",
                    self.current.log.level, next.log.level
                )),
                Err(e) => tracing::warn!(error = %e, "log level not changed"),
            }
        }
        out.needs_restart = changed_sections(&self.current, &next);
        self.current = next;
        out
    }
}

/// Sections that differ once the reloadable keys are set equal. Secrets are
/// compared redacted, so a changed key or password is not detected here
/// (it needs a restart either way).
fn changed_sections(old: &Config, new: &Config) -> Vec<String> {
    let mut aligned = new.clone();
    aligned.duvo.rate_limit_per_minute = old.duvo.rate_limit_per_minute;
    aligned.duvo.rate_share = old.duvo.rate_share;
    for a in &mut aligned.duvo.accounts {
        if let Some(o) = old.duvo.accounts.iter().find(|o| o.name == a.name) {
            a.rate_limit_per_minute = o.rate_limit_per_minute;
            a.rate_share = o.rate_share;
        }
    }
    aligned.log.level = old.log.level.clone();
    let (Ok(toml::Value::Table(a)), Ok(toml::Value::Table(b))) =
        (toml::Value::try_from(old), toml::Value::try_from(&aligned))
    else {
        return vec!["(cannot compare)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Reload on every SIGHUP until `stop` is cancelled. `hup` is created by the
/// caller before start-up so a SIGHUP during start-up does not kill the
/// process (its default action).
#[cfg(unix)]
pub async fn on_sighup(
    mut hup: tokio::signal::unix::Signal,
    mut reloader: Reloader,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = stop.cancelled() => return,
        }
        crate::systemd::reloading();
        tracing::info!(path = %reloader.path.display(), "SIGHUP: reloading the configuration");
        let status = match reloader.reload() {
            Ok(out) => {
                if out.needs_restart.is_empty() {
                    tracing::info!("{}", out.summary());
                } else {
                    tracing::warn!("{}", out.summary());
                }
                out.summary()
            }
            Err(e) => {
                tracing::error!(
                    "configuration not reloaded, keeping the one in force: {}",
                    e.to_string().replace('\n', " ")
                );
                "reload refused: invalid configuration (see the log)".to_string()
            }
        };
        crate::systemd::reloaded(&status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::gate::RateGateConfig;

    const BASE: &str = r#"
[duvo]
api_key = "dv_reload_test_key_000000000000000"
[outbox]
path = "/tmp/x"
[[sources]]
type = "http"
name = "oms"
queue_id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
"#;

    #[test]
    fn applies_rate_and_share_and_names_sections_needing_a_restart() {
        let cur = Config::parse(BASE).unwrap();
        let gate = RateGate::new(RateGateConfig::default());
        let mut r = Reloader::new(
            "/nonexistent".into(),
            cur,
            vec![("default".into(), gate.clone())],
        );
        let next = Config::parse(&BASE.replace(
            "[outbox]",
            "rate_limit_per_minute = 120\nrate_share = 0.5\n[outbox]\nhigh_water_events = 10\nlow_water_events = 5",
        ))
        .unwrap();
        let out = r.apply(next);
        assert_eq!(
            out.applied,
            vec![
                "duvo.rate_limit_per_minute: 300 -> 120".to_string(),
                "duvo.rate_share: 1 -> 0.5".to_string()
            ]
        );
        assert_eq!(out.needs_restart, vec!["outbox".to_string()]);
        assert_eq!(gate.config().rate_per_minute, 120);
        assert_eq!(gate.config().share, 0.5);
        assert_eq!(gate.stats().effective_rpm, 120.0);
        // The same file again changes nothing.
        let again = r.apply(r.current.clone());
        assert_eq!(again, ReloadOutcome::default());
        assert_eq!(again.summary(), "reloaded: nothing to apply");
    }

    #[test]
    fn each_accounts_rate_applies_to_its_own_gate() {
        let with_b = |rate: u32, extra: &str| {
            BASE.replace(
                "[outbox]",
                &format!(
                    "[[duvo.accounts]]\nname = \"b\"\napi_key = \"dv_reload_test_key_b00000000000000\"\nrate_limit_per_minute = {rate}\n{extra}[outbox]"
                ),
            )
        };
        let (a, b) = (
            RateGate::new(RateGateConfig::default()),
            RateGate::new(RateGateConfig::default()),
        );
        let gates = vec![
            ("default".to_string(), a.clone()),
            ("b".to_string(), b.clone()),
        ];
        let mut r = Reloader::new(
            "/nonexistent".into(),
            Config::parse(&with_b(300, "")).unwrap(),
            gates,
        );
        let out = r.apply(Config::parse(&with_b(60, "")).unwrap());
        assert_eq!(
            out.applied,
            vec!["duvo.accounts.b.rate_limit_per_minute: 300 -> 60".to_string()]
        );
        assert!(out.needs_restart.is_empty(), "{out:?}");
        assert_eq!(b.config().rate_per_minute, 60);
        assert_eq!(
            a.config().rate_per_minute,
            300,
            "the other account keeps its rate"
        );
        // A new account is a restart.
        let more = with_b(60, "").replace(
            "[outbox]",
            "[[duvo.accounts]]\nname = \"c\"\napi_key = \"dv_reload_test_key_c00000000000000\"\n[outbox]",
        );
        let out = r.apply(Config::parse(&more).unwrap());
        assert_eq!(out.needs_restart, vec!["duvo".to_string()]);
    }

    #[test]
    fn an_invalid_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, BASE.replace("[outbox]", "burst = 0\n[outbox]")).unwrap();
        let gate = RateGate::new(RateGateConfig::default());
        let mut r = Reloader::new(
            path,
            Config::parse(BASE).unwrap(),
            vec![("default".into(), gate.clone())],
        );
        let e = r.reload().unwrap_err().to_string();
        assert!(e.contains("duvo.burst"), "{e}");
        assert_eq!(gate.config(), RateGateConfig::default());
    }
}
