//! Secrets (API keys, tokens, broker passwords) wrapped so they cannot leak.
//!
//! `Debug` and `Display` print `[redacted]`, and `Serialize` writes the same,
//! so a secret inside a config struct is safe to log, to print with
//! `--print-config` and to put in an error. The only way to the value is
//! [`Secret::expose`], which makes every use greppable.
//!
//! Also here: reading a secret from a systemd credential, and scrubbing
//! secrets out of text that libraries produce (URIs, error messages).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const REDACTED: &str = "[redacted]";

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call sites are where it leaves the process (an
    /// `Authorization` header, an HMAC key); keep them few.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A Duvo API key (`dv_...`). A distinct type so it cannot be passed where
/// another secret is expected.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Secret);

impl ApiKey {
    pub fn new(value: impl Into<String>) -> Self {
        ApiKey(Secret::new(value))
    }
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
    /// A short, non-reversible tag (first 8 hex of SHA-256) to tell keys apart
    /// in logs and metrics without revealing them.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(self.expose().as_bytes());
        d.iter().take(4).map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({REDACTED})")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Read the systemd credential `name` from `$CREDENTIALS_DIRECTORY`
/// (trimmed); `at` names the config key in errors.
/// Compare two secrets in time independent of where they differ (a
/// bearer token check must not tell an attacker how much of a guess was
/// right).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A bearer token's value from `Authorization: Bearer <token>`, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

pub fn read_credential(at: &str, name: &str) -> Result<String, String> {
    if name.is_empty() || name.contains('/') {
        return Err(format!("{at} {name:?} must be a credential name (no '/')"));
    }
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        return Err(format!(
            "{at} {name:?}: CREDENTIALS_DIRECTORY is not set \
             (run under systemd with LoadCredential={name}:<file>)"
        ));
    };
    let path = std::path::Path::new(&dir).join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(format!("{at}: {} is empty", path.display())),
        Err(e) => Err(format!("{at}: {} cannot be read: {e}", path.display())),
    }
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`. Anything
/// that does not look like a URI with credentials is reduced to its scheme
/// and host part so a malformed value cannot leak a password either.
pub fn redact_amqp_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "[unparseable uri]".into();
    };
    // Authority ends at the first '/', '?' or '#'; the password may contain
    // anything else, so the last '@' in the authority separates userinfo.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let tail = tail.split(['?', '#']).next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// Whether a configuration key holds a secret value (not the name of a
/// variable, file or credential that holds one): `api_key`, `uri`,
/// `callback_secret`, and librdkafka keys naming a password, a secret or
/// a private key.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_env") || k.ends_with("_file") || k.ends_with("_credential") {
        return false;
    }
    matches!(k.as_str(), "api_key" | "uri") || names_a_secret(&k)
}

/// Whether a key's name says its value is secret: it mentions a password
/// or a secret, or is a private key or an OAuth configuration.
pub fn names_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || matches!(k.as_str(), "ssl.key.pem" | "sasl.oauthbearer.config")
}

/// `text` with every one of `secrets` (3 characters or more, so a tiny
/// one cannot mangle every message) replaced by [`REDACTED`].
pub fn scrub_all(text: String, secrets: &[String]) -> String {
    let mut out = text;
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

/// A URL as `--print-config` shows it: no password, no query.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                u.set_query(Some(REDACTED));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "[unparsable url]".into(),
    }
}

/// The password of a parsed AMQP URI, to scrub from library error texts
/// (only from 3 characters on, so a tiny one cannot mangle every message).
pub fn amqp_uri_password(uri: &lapin::uri::AMQPUri) -> Option<String> {
    Some(uri.authority.userinfo.password.clone()).filter(|p| p.len() >= 3)
}

/// `text` with every occurrence of `password` replaced by `***`.
pub fn scrub_password(text: String, password: Option<&str>) -> String {
    match password {
        Some(p) => text.replace(p, "***"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let k = ApiKey::new("dv_supersecretvalue1234567890abcdef");
        assert!(!format!("{k:?}").contains("supersecret"));
        assert!(!format!("{k}").contains("supersecret"));
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(k.fingerprint().len(), 8);
        assert_eq!(k.expose(), "dv_supersecretvalue1234567890abcdef");
    }
}
