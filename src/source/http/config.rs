//! The HTTP source's `[[sources]]` entry (`type = "http"`): where it
//! listens, who may post, how events become cases, and where signed
//! failure callbacks go.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::duvo::Priority;
use crate::mapping::MappingConfig;
use crate::report::callback_policy::CallbackPolicy;
use crate::report::http::HttpTarget;
use crate::secret::Secret;
use crate::source::{check_name, check_routing};

/// HTTP inbound source: `POST /v1/events` (JSON object, array or NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Unique name; appears in metrics and event identities.
    pub name: String,
    /// Address to listen on.
    #[serde(default = "default_http_listen")]
    pub listen: String,
    /// Duvo queue the cases go to: the default route. Empty (left out)
    /// with `routes`: an event no route matches is refused (422 `no_route`).
    #[serde(default)]
    pub queue_id: String,
    /// Content-based routes (`[[sources.routes]]`), first match wins, on a
    /// JSON pointer of the event or a request header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::routing::RouteConfig>,
    /// The Duvo account (`[[duvo.accounts]]` name) whose key and budget
    /// deliver these cases; default: `[duvo]` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Title template: `{/json/pointer}` fields, `{/ptr|fallback}`.
    #[serde(default = "crate::mapping::default_title")]
    pub title: String,
    /// Title when the template renders empty.
    #[serde(default = "crate::mapping::default_title_fallback")]
    pub title_fallback: String,
    /// Labels; values may be templates like the title.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Static priority: none, medium or high.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// JSON pointer whose value (none/medium/high) overrides `priority`.
    #[serde(default)]
    pub priority_field: Option<String>,
    /// JSON pointer of a producer-supplied event id used for dedupe when
    /// the request has no Idempotency-Key (e.g. `/event_id`).
    #[serde(default)]
    pub event_id_field: Option<String>,
    /// Environment variable holding a bearer token clients must send.
    /// Unset: no authentication (bind to localhost then).
    #[serde(default)]
    pub auth_token_env: Option<String>,
    /// Name of a systemd credential holding the bearer token
    /// (`$CREDENTIALS_DIRECTORY/<name>`); takes precedence over
    /// `auth_token_env`.
    #[serde(default)]
    pub auth_token_credential: Option<String>,
    /// Accept an intake without a token on an address other than loopback
    /// (anyone who reaches the port can then post events and read
    /// `GET /v1/events/{id}`). Off: `validate` refuses that setup.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Largest accepted request body, bytes.
    #[serde(default = "default_http_max_body")]
    pub max_body_bytes: usize,
    /// Most request-body bytes being read or decoded at once, over all
    /// connections of this source: a request announcing more than is left
    /// is answered 503 with Retry-After before its body is read. Bounds the
    /// intake's memory whatever the number of clients.
    #[serde(default = "default_http_max_inflight_bytes")]
    pub max_inflight_bytes: usize,
    /// Longest time a client may take to send a request's headers (also
    /// while a keep-alive connection waits for its next request), ms.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Longest time a client may take to send a request's body, ms
    /// (answered 408, nothing stored).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Most connections open at once; more wait in the kernel's backlog.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// Most events in one request.
    #[serde(default = "default_http_max_events")]
    pub max_events_per_request: usize,
    /// Where failure reports about this source's events are POSTed (JSON
    /// with `event_id`, `case_id`, `queue_id`, `status`, `reason` and the
    /// original `event`), signed with `X-Duvo-Bridge-Signature:
    /// sha256=<hex HMAC-SHA256 of the body>`. Retried until a 2xx answer.
    #[serde(default, serialize_with = "redacted_url")]
    pub callback_url: Option<String>,
    /// Environment variable holding the HMAC secret of the callbacks
    /// (required with `callback_url` or `callback_url_header`).
    #[serde(default)]
    pub callback_secret_env: Option<String>,
    /// The HMAC secret itself. Discouraged (it ends up in a file readable
    /// by whoever reads the config); prefer `callback_secret_env`.
    #[serde(default)]
    pub callback_secret: Option<Secret>,
    /// Accept a per-request callback URL in the `X-Duvo-Callback-Url`
    /// header (overrides `callback_url` for the events of that request).
    /// Off by default: whoever can post events could make the bridge call
    /// any URL.
    #[serde(default)]
    pub callback_url_header: bool,
    /// Internal destinations a per-request callback URL may name anyway:
    /// host names, addresses or prefixes (`"10.20.0.0/16"`). Without an
    /// entry, a header URL naming (or resolving to) this host, a private,
    /// link-local or metadata address is refused.
    #[serde(default)]
    pub callback_allow: Vec<String>,
    /// How long a report to a URL given in `X-Duvo-Callback-Url` is retried
    /// while that URL fails, in hours after the report was created. Then it
    /// is set aside as a dead report (kept in the outbox, counted in
    /// `duvo_bridge_reports_given_up_total`) instead of being retried
    /// forever for a client that went away. Reports to `callback_url` are
    /// retried until acknowledged. Default: 24.
    #[serde(default = "default_callback_header_max_age")]
    pub callback_header_max_age_hours: u64,
    /// Timeout of one callback request, seconds.
    #[serde(default = "default_callback_timeout")]
    pub callback_timeout_secs: u64,
}

/// `callback_url` as `--print-config` shows it (no password, no query).
fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&crate::secret::redact_url(u)),
        None => s.serialize_none(),
    }
}

fn default_callback_timeout() -> u64 {
    10
}

fn default_callback_header_max_age() -> u64 {
    24
}

fn default_http_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_http_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_http_max_connections() -> usize {
    1024
}
fn default_http_max_inflight_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_http_max_events() -> usize {
    10_000
}

impl HttpSourceConfig {
    /// A source with every default, listening on an ephemeral port.
    pub fn new(name: &str, queue_id: Uuid) -> Self {
        HttpSourceConfig {
            name: name.to_string(),
            listen: "127.0.0.1:0".into(),
            queue_id: queue_id.to_string(),
            routes: Vec::new(),
            account: None,
            title: crate::mapping::default_title(),
            title_fallback: crate::mapping::default_title_fallback(),
            labels: Default::default(),
            priority: None,
            priority_field: None,
            event_id_field: None,
            auth_token_env: None,
            auth_token_credential: None,
            max_body_bytes: default_http_max_body(),
            allow_unauthenticated: false,
            max_inflight_bytes: default_http_max_inflight_bytes(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            max_connections: default_http_max_connections(),
            max_events_per_request: default_http_max_events(),
            callback_url: None,
            callback_secret_env: None,
            callback_secret: None,
            callback_url_header: false,
            callback_allow: Vec::new(),
            callback_header_max_age_hours: default_callback_header_max_age(),
            callback_timeout_secs: default_callback_timeout(),
        }
    }

    /// Whether failure reports of this source go anywhere.
    pub fn reports(&self) -> bool {
        self.callback_url.is_some() || self.callback_url_header
    }

    /// The callback HMAC secret, from `callback_secret_env`.
    pub fn callback_secret(&self) -> Result<Option<Secret>, String> {
        if let Some(s) = &self.callback_secret {
            if s.is_empty() {
                return Err(format!("sources.{}.callback_secret is empty", self.name));
            }
            return Ok(Some(s.clone()));
        }
        match &self.callback_secret_env {
            None if self.reports() => Err(format!(
                "sources.{}: callback_secret_env (or callback_secret) is required with callback_url or callback_url_header (callbacks are signed)",
                self.name
            )),
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Ok(Some(Secret::new(s))),
                _ => Err(format!(
                    "sources.{}.callback_secret_env: environment variable {var} is not set or empty",
                    self.name
                )),
            },
        }
    }

    pub fn mapping(&self) -> MappingConfig {
        MappingConfig {
            title: self.title.clone(),
            title_fallback: self.title_fallback.clone(),
            labels: self.labels.clone(),
            priority: self.priority,
            priority_field: self.priority_field.clone(),
        }
    }

    pub fn auth_token(&self) -> Result<Option<Secret>, String> {
        if let Some(name) = &self.auth_token_credential {
            let at = format!("sources.{}.auth_token_credential", self.name);
            return crate::secret::read_credential(&at, name).map(|t| Some(Secret::new(t)));
        }
        match &self.auth_token_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Ok(Some(Secret::new(s))),
                _ => Err(format!(
                    "sources.{}.auth_token_env: environment variable {var} is not set or empty",
                    self.name
                )),
            },
        }
    }

    /// Every problem with this source's `[[sources]]` entry.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let h = self;
        let at = format!("sources.{}", h.name);
        check_name(&at, &h.name, &mut errors);
        match h.listen.parse::<SocketAddr>() {
            Err(_) => errors.push(format!("{at}.listen {:?} is not an address", h.listen)),
            Ok(addr)
                if !addr.ip().is_loopback()
                    && h.auth_token_env.is_none()
                    && h.auth_token_credential.is_none()
                    && !h.allow_unauthenticated =>
            {
                errors.push(format!(
                    "{at}.listen {addr} is reachable from other hosts but no auth_token_env or auth_token_credential is set: anyone could post events; set a token, listen on 127.0.0.1, or set {at}.allow_unauthenticated = true"
                ));
            }
            Ok(_) => {}
        }
        check_routing(
            &at,
            &h.queue_id,
            &h.mapping(),
            &h.routes,
            ("event_id_field", h.event_id_field.as_deref()),
            &mut errors,
        );
        if let Err(e) = h.auth_token() {
            errors.push(e);
        }
        if h.max_body_bytes < 1024 {
            errors.push(format!("{at}.max_body_bytes must be at least 1024"));
        }
        if h.max_inflight_bytes < h.max_body_bytes || h.max_inflight_bytes > u32::MAX as usize {
            errors.push(format!(
                "{at}.max_inflight_bytes must be within max_body_bytes ({})..={}",
                h.max_body_bytes,
                u32::MAX
            ));
        }
        for (key, v) in [
            ("header_read_timeout_ms", h.header_read_timeout_ms),
            ("body_read_timeout_ms", h.body_read_timeout_ms),
            ("max_connections", h.max_connections as u64),
        ] {
            if v == 0 {
                errors.push(format!("{at}.{key} must be at least 1"));
            }
        }
        if h.max_events_per_request == 0 {
            errors.push(format!("{at}.max_events_per_request must be at least 1"));
        }
        if let Some(u) = &h.callback_url
            && let Err(e) = check_http_url(u)
        {
            errors.push(format!("{at}.callback_url {u:?}: {e}"));
        }
        if let Err(e) = h.callback_secret() {
            errors.push(e);
        }
        if let Err(errs) = CallbackPolicy::new(&h.callback_allow) {
            for e in errs {
                errors.push(format!("{at}.callback_allow: {e}"));
            }
        }
        if h.callback_header_max_age_hours == 0 {
            errors.push(format!(
                "{at}.callback_header_max_age_hours must be at least 1"
            ));
        }
        if h.callback_timeout_secs == 0 {
            errors.push(format!("{at}.callback_timeout_secs must be at least 1"));
        }
        errors
    }

    /// The per-request callback policy (a bad entry, refused by `check`,
    /// is left out).
    pub fn callback_policy(&self) -> CallbackPolicy {
        let ok: Vec<String> = self
            .callback_allow
            .iter()
            .filter(|e| CallbackPolicy::new(std::slice::from_ref(e)).is_ok())
            .cloned()
            .collect();
        CallbackPolicy::new(&ok).unwrap_or_default()
    }

    /// Where this source's failure reports go; `None` without a callback.
    pub fn report_target(&self) -> Result<Option<HttpTarget>, String> {
        if !self.reports() {
            return Ok(None);
        }
        let secret = self
            .callback_secret()?
            .ok_or_else(|| format!("source {}: callback_secret_env is required", self.name))?;
        Ok(Some(HttpTarget {
            source: self.name.clone(),
            default_url: self.callback_url.clone(),
            secret,
            timeout: Duration::from_secs(self.callback_timeout_secs),
            policy: self.callback_policy(),
            header_url_max_age: Duration::from_secs(
                self.callback_header_max_age_hours.saturating_mul(3600),
            ),
        }))
    }
}

/// An absolute http(s) URL with a host.
pub fn check_http_url(u: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(u).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intake_reachable_from_other_hosts_needs_a_token_or_an_explicit_yes() {
        let mut h = HttpSourceConfig::new("oms", Uuid::nil());
        h.listen = "127.0.0.1:8080".into();
        assert_eq!(h.check(), Vec::<String>::new());
        for listen in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080"] {
            h.listen = listen.into();
            let errs = h.check();
            assert_eq!(errs.len(), 1, "{listen}: {errs:?}");
            assert!(errs[0].contains("allow_unauthenticated"), "{errs:?}");
        }
        h.allow_unauthenticated = true;
        assert_eq!(h.check(), Vec::<String>::new());
        h.allow_unauthenticated = false;
        h.listen = "[::1]:8080".into();
        assert_eq!(h.check(), Vec::<String>::new());
    }
}
