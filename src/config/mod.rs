//! The top-level configuration (TOML): loading, environment overrides,
//! collecting every problem at once, and the redacted echo.
//!
//! Each section's typed struct, defaults and checks live with the
//! component that owns it (`duvo::config`, `outbox::config`,
//! `deliver::config`, `track::config`, `admin`, `telemetry`, `shutdown`,
//! and one `config` module per source); this module only assembles them,
//! and no component imports it.
//!
//! The doc comments on the fields are the user documentation: they are what
//! `config/duvo-bridge.example.toml` explains. Every struct denies unknown
//! fields, so a typo is an error rather than a silently ignored setting.
//!
//! Loading is two-phase: each section is deserialised on its own so that one
//! bad section does not hide the errors of the others, then semantic checks
//! (addresses, queue ids, templates, secrets present) run over the result.
//! `duvo-bridge validate` prints every error and exits 64 (EX_USAGE).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::admin::AdminConfig;
pub use crate::deliver::config::DeliveryConfig;
pub use crate::duvo::config::DuvoConfig;
pub use crate::outbox::config::OutboxSection;
use crate::secret::Secret;
pub use crate::shutdown::ShutdownConfig;
pub use crate::source::SourceConfig;
use crate::source::http::config::HttpSourceConfig;
pub use crate::telemetry::{LogConfig, LogFormat};
pub use crate::track::config::TrackingConfig;

pub mod env;
#[cfg(test)]
mod tests;

/// Exit code for a bad configuration (sysexits EX_USAGE / EX_CONFIG family).
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub duvo: DuvoConfig,
    #[serde(default)]
    pub outbox: OutboxSection,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub tracking: TrackingConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
}

const NO_SOURCES: &str = "no [[sources]] configured: the bridge would have nothing to do";

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// A complete local configuration: the API at `base_url` with a literal
    /// key, the outbox in `outbox`, the admin listener and one HTTP source
    /// on ephemeral ports. The demo, the tests and the benchmarks start
    /// from this and adjust what they measure.
    pub fn local(base_url: &str, api_key: &str, outbox: &Path, source: HttpSourceConfig) -> Config {
        let mut cfg = Config::default();
        cfg.duvo.base_url = base_url.to_string();
        cfg.duvo.api_key = Some(Secret::new(api_key));
        cfg.duvo.api_key_env = None;
        cfg.outbox.path = outbox.to_path_buf();
        cfg.admin.listen = "127.0.0.1:0".into();
        cfg.sources.push(SourceConfig::Http(source));
        cfg
    }

    /// Read a file, apply the `DUVO_BRIDGE__*` environment overrides (see
    /// [`env`]), parse and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with_env(path, process_env()).map(|(c, _)| c)
    }

    /// [`Config::load`] with the environment given; also returns the names
    /// of the override variables applied.
    pub fn load_with_env(
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        let mut table = parse_table(&text)?;
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let (applied, env_errors) = match env::apply(&mut table, vars.iter().cloned()) {
            Ok(applied) => (applied, Vec::new()),
            Err(errors) => (Vec::new(), errors),
        };
        let sites: Vec<env::Site> = applied
            .iter()
            .filter_map(|name| {
                let raw = vars
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())?;
                env::site(&table, name, raw)
            })
            .collect();
        Config::from_table(table, env_errors)
            .map(|c| (c, applied))
            .map_err(|ConfigErrors(errors)| {
                ConfigErrors(
                    errors
                        .into_iter()
                        .map(|e| env::attribute(e, &sites))
                        .collect(),
                )
            })
    }

    /// Parse and validate TOML text, collecting every error.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_table(parse_table(text)?, Vec::new())
    }

    /// Deserialise and check `table`; `errors` already found are reported
    /// with the rest.
    fn from_table(table: toml::Table, mut errors: Vec<String>) -> Result<Config, ConfigErrors> {
        let mut cfg = Config::default();
        let mut unparsed_sources = 0;

        fn section<T: serde::de::DeserializeOwned + Default>(
            table: &toml::Table,
            name: &str,
            errors: &mut Vec<String>,
        ) -> T {
            match table.get(name) {
                None => T::default(),
                Some(v) => deserialize_all(v, &format!("[{name}]"), errors).unwrap_or_default(),
            }
        }
        for key in table.keys() {
            if !matches!(
                key.as_str(),
                "duvo"
                    | "outbox"
                    | "delivery"
                    | "admin"
                    | "log"
                    | "shutdown"
                    | "tracking"
                    | "sources"
            ) {
                errors.push(format!(
                    "unknown section `{key}` (expected duvo, outbox, delivery, admin, log, shutdown, tracking, sources)"
                ));
            }
        }
        cfg.duvo = section(&table, "duvo", &mut errors);
        cfg.outbox = section(&table, "outbox", &mut errors);
        cfg.delivery = section(&table, "delivery", &mut errors);
        cfg.admin = section(&table, "admin", &mut errors);
        cfg.log = section(&table, "log", &mut errors);
        cfg.shutdown = section(&table, "shutdown", &mut errors);
        cfg.tracking = section(&table, "tracking", &mut errors);
        match table.get("sources") {
            None => {}
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    // Numbered from 0 like the environment overrides
                    // (`DUVO_BRIDGE__SOURCES__0__...`).
                    let name = item
                        .get("name")
                        .and_then(|n| n.as_str())
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default();
                    match deserialize_all::<SourceConfig>(
                        item,
                        &format!("sources.{i}{name}"),
                        &mut errors,
                    ) {
                        Some(s) => cfg.sources.push(s),
                        None => unparsed_sources += 1,
                    }
                }
            }
            Some(_) => errors.push("`sources` must be an array of tables ([[sources]])".into()),
        }
        // "No sources" would be wrong when some were written but refused.
        errors.extend(
            cfg.check()
                .into_iter()
                .filter(|e| unparsed_sources == 0 || e != NO_SOURCES),
        );
        if errors.is_empty() {
            Ok(cfg)
        } else {
            // serde's type errors quote the value they refused: never a
            // secret's.
            let secrets = secret_values(&toml::Value::Table(table), None);
            Err(ConfigErrors(
                errors
                    .into_iter()
                    .map(|e| crate::secret::scrub_all(e, &secrets))
                    .collect(),
            ))
        }
    }

    /// Semantic checks over a typed config; every problem is returned.
    /// Each section checks itself; what spans sections (unique source
    /// names, two listeners on one address) is checked here.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        errors.extend(self.duvo.check());
        errors.extend(self.outbox.check());
        errors.extend(self.delivery.check());
        errors.extend(self.tracking.check());
        errors.extend(self.admin.check());
        errors.extend(self.log.check());
        let mut listens: Vec<(String, &str)> = Vec::new();
        if self.admin.listen.parse::<SocketAddr>().is_ok() {
            listens.push(("admin.listen".into(), &self.admin.listen));
        }
        if self.sources.is_empty() {
            errors.push(NO_SOURCES.into());
        }
        let mut names = BTreeSet::new();
        for s in &self.sources {
            if !names.insert(s.name().to_string()) {
                errors.push(format!("sources: name {:?} is used twice", s.name()));
            }
            errors.extend(s.check());
            listens.extend(s.listen());
        }
        for (i, (a, addr)) in listens.iter().enumerate() {
            for (b, other) in &listens[i + 1..] {
                if addr == other && !addr.ends_with(":0") {
                    errors.push(format!("{a} and {b} both listen on {addr}"));
                }
            }
        }
        errors.extend(self.queue_accounts().err().unwrap_or_default());
        errors
    }

    /// Which account delivers each queue the sources name. A queue is in
    /// one team, so naming it under two accounts, or naming an account
    /// `[[duvo.accounts]]` does not define, is an error (all of them).
    pub fn queue_accounts(&self) -> Result<BTreeMap<uuid::Uuid, String>, Vec<String>> {
        let known: BTreeSet<String> = self
            .duvo
            .account_configs()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut map: BTreeMap<uuid::Uuid, (String, String)> = BTreeMap::new();
        let mut errors = Vec::new();
        for s in &self.sources {
            for (at, queue, account) in s.targets() {
                if !known.contains(&account) {
                    errors.push(format!(
                        "{at}.account {account:?} is not an account: define it in [[duvo.accounts]] (known: {})",
                        known.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                    continue;
                }
                let Ok(q) = uuid::Uuid::parse_str(&queue) else {
                    continue; // the source's own check names it
                };
                match map.get(&q) {
                    Some((other_at, other)) if *other != account => errors.push(format!(
                        "queue {q} is delivered by account {other:?} ({other_at}) and by {account:?} ({at}): a queue belongs to one team; use one account for it"
                    )),
                    Some(_) => {}
                    None => {
                        map.insert(q, (at, account));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(map.into_iter().map(|(q, (_, a))| (q, a)).collect())
        } else {
            Err(errors)
        }
    }

    /// The configuration as TOML with secrets redacted (`--print-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Parse TOML text. A syntax error names its line and column, never the
/// text there (the line may hold a secret).
fn parse_table(text: &str) -> Result<toml::Table, ConfigErrors> {
    text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|sp| {
                let before = &text[..sp.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        ConfigErrors(vec![format!("TOML syntax{at}: {}", one_line(e.message()))])
    })
}

/// Deserialise `value` as `T`, reporting every key serde refuses (each
/// error prefixed with `at`), not only the first: serde stops at its first
/// error, so when the whole table fails, its keys are tried one at a time on
/// top of the ones accepted so far. An error while a key is read (its type,
/// an unknown key, a bad variant) belongs to that key; a missing required
/// key only shows once every key is in, and is reported then. Returns what
/// the accepted keys make when that deserialises (so the semantic checks
/// see what was written), `None` otherwise.
fn deserialize_all<T: serde::de::DeserializeOwned>(
    value: &toml::Value,
    at: &str,
    errors: &mut Vec<String>,
) -> Option<T> {
    let first = match value.clone().try_into::<T>() {
        Ok(t) => return Some(t),
        Err(e) => e,
    };
    let Some(table) = value.as_table() else {
        errors.push(format!("{at}: {}", one_line(&first.to_string())));
        return None;
    };
    let missing = |e: &toml::de::Error| e.to_string().starts_with("missing field");
    let mut accepted = toml::Table::new();
    let mut refused = BTreeSet::new();
    // A tagged enum's tag first (`type` of a source): without it every
    // other key would only meet "missing field `type`".
    let mut keys: Vec<(&String, &toml::Value)> = table.iter().collect();
    keys.sort_by_key(|(k, _)| k.as_str() != "type");
    for (key, v) in keys {
        let mut candidate = accepted.clone();
        candidate.insert(key.clone(), v.clone());
        match toml::Value::Table(candidate).try_into::<T>() {
            Err(e) if !missing(&e) => {
                let message = with_key(&e.to_string(), key);
                let message = did_you_mean(&message).unwrap_or(message);
                errors.push(format!("{at}: {}", one_line(&message)));
                refused.insert(key.clone());
            }
            _ => {
                accepted.insert(key.clone(), v.clone());
            }
        }
    }
    match toml::Value::Table(accepted).try_into::<T>() {
        // With keys refused this is not what was written, but the other
        // keys still get their semantic checks.
        Ok(t) => Some(t),
        Err(e) => {
            // A required key that is absent, not one that was refused.
            let named = e
                .to_string()
                .split('`')
                .nth(1)
                .is_some_and(|k| refused.contains(k));
            if refused.is_empty() || !named {
                errors.push(format!("{at}: {}", one_line(&e.to_string())));
            }
            None
        }
    }
}

/// For serde's "unknown field (or variant) `x`, expected one of `a`,
/// `b`": the expected name nearest to the one written (`topics` for
/// `topic`, `queue_id` for `queue-id`, `kafka` for `kafak`), told right
/// after the name written, before the long list: the message with
/// "(did you mean `...`?)". None when no expected name is near enough to
/// be a likely typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .split_once("unknown field `")
        .or_else(|| message.split_once("unknown variant `"))?
        .1;
    let (written, rest) = rest.split_once('`')?;
    let expected = rest.split("expected").nth(1)?;
    let normal = |k: &str| k.to_ascii_lowercase().replace('-', "_");
    let w = normal(written);
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (strsim::damerau_levenshtein(&w, &normal(k)), k))
        .filter(|(d, k)| *d <= (k.len() / 4).clamp(1, 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| {
            message.replacen(
                &format!("`{written}`"),
                &format!("`{written}` (did you mean `{k}`?)"),
                1,
            )
        })
}

/// serde's message for one key, naming the key when serde did not.
fn with_key(message: &str, key: &str) -> String {
    if message.contains(&format!("`{key}`")) {
        message.to_string()
    } else {
        format!("{key}: {message}")
    }
}

/// The values of secret-holding keys anywhere in `v` (`key` is the key
/// `v` sits under), as the text an error would quote them as.
fn secret_values(v: &toml::Value, key: Option<&str>) -> Vec<String> {
    match v {
        toml::Value::Table(t) => t
            .iter()
            .flat_map(|(k, v)| secret_values(v, Some(k)))
            .collect(),
        toml::Value::Array(a) => a.iter().flat_map(|v| secret_values(v, key)).collect(),
        scalar if key.is_some_and(crate::secret::is_secret_key) => match scalar {
            toml::Value::String(s) => vec![s.clone()],
            other => vec![other.to_string()],
        },
        _ => Vec::new(),
    }
}

/// The process environment (variables that are not UTF-8 cannot be
/// overrides and are skipped).
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
