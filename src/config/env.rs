//! Environment overrides: `DUVO_BRIDGE__<SECTION>__<KEY>=value` sets any key
//! of the configuration file, so one file (a ConfigMap, a package default)
//! can be adjusted per host or per replica without editing it.
//!
//! The scheme:
//! - the prefix `DUVO_BRIDGE__`, then the path of the key, its parts separated
//!   by a double underscore, in any case: `DUVO_BRIDGE__DUVO__RATE_SHARE=0.33`
//!   is `[duvo] rate_share = 0.33`;
//! - deeper tables the same way: `DUVO_BRIDGE__SOURCES__OMS__LABELS__TEAM=ops`;
//! - a source is named by its position (0 is the first `[[sources]]`) or by
//!   its name (`-` in a name is written `_`): `DUVO_BRIDGE__SOURCES__0__LISTEN`
//!   or `DUVO_BRIDGE__SOURCES__OMS__LISTEN`;
//! - the value is read as a TOML value when it is a number, a boolean, an
//!   array (`["a","b"]`) or an inline table (`{a = "b"}`), and as a string
//!   otherwise; quote it to force a string (`DUVO_BRIDGE__SOURCES__0__NAME='"123"'`).
//!
//! An override of a key that does not exist is an error like a typo in the
//! file, and every problem is reported with the variable's name. Values are
//! never echoed (an override may carry a secret).

/// Prefix of every override variable.
pub const PREFIX: &str = "DUVO_BRIDGE__";

/// Apply every `DUVO_BRIDGE__*` variable of `vars` to the parsed file.
/// Returns the names of the variables applied (sorted), or every problem.
pub fn apply(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, Vec<String>> {
    // The prefix in any case too (`duvo_bridge__log__level`): a lower-case
    // one silently ignored would look applied and not be.
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| {
            k.get(..PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
        })
        .collect();
    vars.sort();
    let mut applied = Vec::new();
    let mut errors = Vec::new();
    for (name, raw) in vars {
        let path: Vec<String> = name[PREFIX.len()..]
            .split("__")
            .map(|p| p.to_ascii_lowercase())
            .collect();
        if path.len() < 2 || path.iter().any(String::is_empty) {
            errors.push(format!(
                "environment {name}: expected {PREFIX}<SECTION>__<KEY> (parts separated by `__`)"
            ));
            continue;
        }
        match set(table, &path, parse_value(&raw)) {
            Ok(()) => applied.push(name),
            Err(e) => errors.push(format!("environment {name}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(applied)
    } else {
        Err(errors)
    }
}

/// A TOML number, boolean, array or inline table; anything else is a string.
/// A quoted value (`"..."` or `'...'`) is the string inside.
fn parse_value(raw: &str) -> toml::Value {
    let t = raw.trim();
    let looks_structured = t.starts_with('[')
        || t.starts_with('{')
        || t.starts_with('"')
        || t.starts_with('\'')
        || t == "true"
        || t == "false"
        || t.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+')
        || t == "inf"
        || t == "nan";
    if looks_structured
        && let Ok(mut doc) = format!("v = {t}").parse::<toml::Table>()
        && let Some(v) = doc.remove("v")
        && !matches!(v, toml::Value::Datetime(_))
    {
        return v;
    }
    toml::Value::String(raw.to_string())
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (section, rest) = path.split_first().expect("path has at least two parts");
    if section == "sources" {
        let Some(toml::Value::Array(items)) = table.get_mut("sources") else {
            return Err("the file has no [[sources]] to override".into());
        };
        let (which, rest) = rest.split_first().expect("path has at least two parts");
        let index = match which.parse::<usize>() {
            Ok(i) if i < items.len() => i,
            Ok(i) => {
                return Err(format!(
                    "there is no source #{i} (the file has {}, counted from 0)",
                    items.len()
                ));
            }
            Err(_) => items
                .iter()
                .position(|s| {
                    s.get("name")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| n.to_ascii_lowercase().replace('-', "_") == *which)
                })
                .ok_or_else(|| format!("no source is named {which:?}"))?,
        };
        if rest.is_empty() {
            return Err("name a key of the source, e.g. ..._SOURCES__0__LISTEN".into());
        }
        let toml::Value::Table(source) = &mut items[index] else {
            return Err(format!("source #{index} is not a table"));
        };
        return set_in(source, rest, value);
    }
    set_in(table, path, value)
}

/// Set `path` below `table`, creating intermediate tables.
fn set_in(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (key, rest) = path.split_first().expect("non-empty path");
    if rest.is_empty() {
        table.insert(key.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(key.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => set_in(t, rest, value),
        _ => Err(format!("`{key}` is not a table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn values_are_typed_like_toml_else_strings() {
        assert_eq!(parse_value("120"), toml::Value::Integer(120));
        assert_eq!(parse_value("0.33"), toml::Value::Float(0.33));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(
            parse_value("info,hyper=warn").as_str(),
            Some("info,hyper=warn")
        );
        assert_eq!(
            parse_value("127.0.0.1:9090").as_str(),
            Some("127.0.0.1:9090")
        );
        assert_eq!(parse_value("\"123\"").as_str(), Some("123"));
        assert_eq!(parse_value("2026-01-01").as_str(), Some("2026-01-01"));
        assert_eq!(
            parse_value("7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11").as_str(),
            Some("7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11")
        );
        assert!(parse_value("[\"a\", \"b\"]").is_array());
        assert!(parse_value("{ team = \"ops\" }").is_table());
    }

    #[test]
    fn sections_sources_by_index_and_name_and_nested_tables() {
        let mut t: toml::Table = r#"
[duvo]
rate_limit_per_minute = 300
[[sources]]
type = "http"
name = "oms"
[[sources]]
type = "amqp"
name = "rabbit-eu"
"#
        .parse()
        .unwrap();
        let applied = apply(
            &mut t,
            vars(&[
                ("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE", "120"),
                ("duvo_bridge__log__level", "debug"),
                ("DUVO_BRIDGE__SOURCES__0__LISTEN", "0.0.0.0:8080"),
                ("DUVO_BRIDGE__SOURCES__RABBIT_EU__PREFETCH", "50"),
                ("DUVO_BRIDGE__SOURCES__OMS__LABELS__TEAM", "ops"),
                ("DUVO_BRIDGE_CONFIG", "/not/an/override"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(applied.len(), 5);
        assert_eq!(t["duvo"]["rate_limit_per_minute"].as_integer(), Some(120));
        assert_eq!(t["log"]["level"].as_str(), Some("debug"));
        assert_eq!(t["sources"][0]["listen"].as_str(), Some("0.0.0.0:8080"));
        assert_eq!(t["sources"][0]["labels"]["team"].as_str(), Some("ops"));
        assert_eq!(t["sources"][1]["prefetch"].as_integer(), Some(50));
    }

    #[test]
    fn every_bad_override_is_reported_without_its_value() {
        let mut t: toml::Table = "[[sources]]\nname = \"oms\"\n".parse().unwrap();
        let errs = apply(
            &mut t,
            vars(&[
                ("DUVO_BRIDGE__SOURCES__3__LISTEN", "secret-1"),
                ("DUVO_BRIDGE__SOURCES__NOPE__LISTEN", "secret-2"),
                ("DUVO_BRIDGE__SOURCES__0", "secret-3"),
                ("DUVO_BRIDGE__DUVO", "secret-4"),
                ("DUVO_BRIDGE__SOURCES__OMS__NAME__X", "secret-5"),
            ]),
        )
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:#?}");
        let all = errs.join("\n");
        assert!(all.contains("no source #3"), "{all}");
        assert!(all.contains("no source is named \"nope\""), "{all}");
        assert!(!all.contains("secret-"), "{all}");
    }
}

/// Where an applied override landed, to name its variable in the errors
/// about that key (and keep its value out of them).
#[derive(Debug)]
pub struct Site {
    name: String,
    raw: String,
    /// How an error about the key starts when serde refused it
    /// (`[duvo]`, `sources.0 `), and how a semantic check names it
    /// (`duvo.rate_limit_per_minute`, `sources.oms.listen`).
    parse_prefix: String,
    dotted: Option<String>,
    key: String,
}

/// The site of the applied override `name` (value `raw`) in `table`.
pub fn site(table: &toml::Table, name: &str, raw: &str) -> Option<Site> {
    let path: Vec<String> = name
        .get(PREFIX.len()..)?
        .split("__")
        .map(|p| p.to_ascii_lowercase())
        .collect();
    let (parse_prefix, dotted, key) = if path[0] == "sources" {
        let items = table.get("sources")?.as_array()?;
        let index = match path.get(1)?.parse::<usize>() {
            Ok(i) => i,
            Err(_) => items.iter().position(|s| {
                s.get("name")
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| n.to_ascii_lowercase().replace('-', "_") == path[1])
            })?,
        };
        let key = path.get(2)?.clone();
        let source_name = items.get(index)?.get("name").and_then(|n| n.as_str());
        (
            format!("sources.{index} "),
            source_name.map(|n| format!("sources.{n}.{key}")),
            key,
        )
    } else {
        let key = path.get(1)?.clone();
        (
            format!("[{}]", path[0]),
            Some(format!("{}.{key}", path[0])),
            key,
        )
    };
    Some(Site {
        name: name.to_string(),
        raw: raw.to_string(),
        parse_prefix,
        dotted,
        key,
    })
}

/// `error`, naming the override variable it is about (if one is) and with
/// that variable's value taken out.
pub fn attribute(error: String, sites: &[Site]) -> String {
    for s in sites {
        // The key serde refused, not one in a list of expected keys.
        let k = &s.key;
        let refused = error.starts_with(&s.parse_prefix)
            && [
                format!("in `{k}`"),
                format!("): {k}:"),
                format!("]: {k}:"),
                format!("unknown field `{k}`"),
            ]
            .iter()
            .any(|p| error.contains(p.as_str()));
        let checked = s
            .dotted
            .as_ref()
            .is_some_and(|d| error.contains(d.as_str()));
        if refused || checked {
            let mut e = error;
            if !s.raw.is_empty() {
                for quoted in [
                    format!("`{}`", s.raw),
                    format!("\"{}\"", s.raw),
                    format!("(got {})", s.raw),
                ] {
                    e = e.replace(&quoted, "(the variable's value)");
                }
            }
            return format!("{e} (set by environment variable {})", s.name);
        }
    }
    error
}
