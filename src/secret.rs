//! Secrets (API keys, tokens, broker passwords) wrapped so they cannot leak.
//!
//! `Debug` and `Display` print `[redacted]`, and `Serialize` writes the same,
//! so a secret inside a config struct is safe to log, to print with
//! `--print-config` and to put in an error. The only way to the value is
//! [`Secret::expose`], which makes every use greppable.

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
