//! Per-request callback URLs, stored once.
//!
//! A webhook request may name where its failure reports go
//! (`X-Duvo-Callback-Url`, up to 2 KiB). Copied into each of its events, a
//! request of thousands of small events multiplies that header thousands of
//! times on disk. So the outbox keeps each distinct URL once, under
//! `u` + the first 16 bytes of its SHA-256, with a count of the events that
//! refer to it; an event's origin keeps only the digest
//! ([`Origin::Http::callback_ref`]). A report resolves the digest to the
//! URL when it is created, so reports (rare, and short-lived) carry the URL
//! itself and never depend on the record.
//!
//! Every change to a count is written in the same sled batch as the event
//! change that causes it (the append that stores the events, the tracking
//! step or purge that drops their origin), under [`CallbackLock`], so the
//! count is exact across crashes: a record exists exactly while an event
//! refers to it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::{decode, encode};
use super::types::{Origin, OutboxError};

pub(crate) const CALLBACK_PREFIX: u8 = b'u';

/// A stored callback URL and how many events refer to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CallbackUrl {
    pub url: String,
    pub refs: u64,
}

/// The digest naming `url`: 16 bytes of SHA-256, hex in origins.
fn digest(url: &str) -> [u8; 16] {
    let full = Sha256::digest(url.as_bytes());
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

fn hex(d: &[u8; 16]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut d = [0u8; 16];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

/// Key of a stored callback URL.
pub(crate) fn callback_key(d: &[u8; 16]) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = CALLBACK_PREFIX;
    k[1..].copy_from_slice(d);
    k
}

/// Count changes gathered while building one sled batch.
#[derive(Debug, Default)]
pub(crate) struct CallbackRefs {
    changes: HashMap<[u8; 16], (Option<String>, i64)>,
}

impl CallbackRefs {
    /// An event about to be stored: move its URL out of the origin,
    /// leaving the digest. Returns the digest and URL for [`Self::acquire`]
    /// once the event is known to be stored (not a duplicate).
    pub fn intern(origin: &mut Option<Origin>) -> Option<([u8; 16], String)> {
        if let Some(Origin::Http {
            callback_url,
            callback_ref,
        }) = origin
            && let Some(url) = callback_url.take()
        {
            let d = digest(&url);
            *callback_ref = Some(hex(&d));
            return Some((d, url));
        }
        None
    }

    /// One more stored event refers to `url`.
    pub fn acquire(&mut self, (d, url): ([u8; 16], String)) {
        let e = self.changes.entry(d).or_insert((None, 0));
        e.0 = Some(url);
        e.1 += 1;
    }

    /// An event dropping `origin` (its tracking ended, or it is purged).
    pub fn release(&mut self, origin: Option<&Origin>) {
        if let Some(Origin::Http {
            callback_ref: Some(r),
            ..
        }) = origin
        {
            match unhex(r) {
                Some(d) => self.changes.entry(d).or_insert((None, 0)).1 -= 1,
                None => tracing::error!(callback_ref = %r, "malformed callback reference; ignored"),
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.values().all(|(_, n)| *n == 0)
    }

    /// Add the count changes to `sb`. The returned guard must be held until
    /// `sb` is applied, so no other batch reads a count in between.
    pub fn write<'l>(
        self,
        lock: &'l CallbackLock,
        tree: &sled::Tree,
        sb: &mut sled::Batch,
    ) -> Result<Option<MutexGuard<'l, ()>>, OutboxError> {
        if self.is_empty() {
            return Ok(None);
        }
        let guard = super::lock(&lock.0);
        for (d, (url, delta)) in self.changes {
            if delta == 0 {
                continue;
            }
            let key = callback_key(&d);
            let current: Option<CallbackUrl> = match tree.get(key)? {
                Some(raw) => Some(decode(&key, &raw)?),
                None => None,
            };
            let refs = current.as_ref().map_or(0, |c| c.refs as i64) + delta;
            match current.map(|c| c.url).or(url) {
                Some(url) if refs > 0 => sb.insert(
                    &key[..],
                    encode(&CallbackUrl {
                        url,
                        refs: refs as u64,
                    })?,
                ),
                _ => {
                    if refs < 0 {
                        tracing::error!(refs, "callback URL released more often than stored");
                    }
                    sb.remove(&key[..]);
                }
            }
        }
        Ok(Some(guard))
    }
}

/// Serialises the read-modify-write of callback counts.
#[derive(Debug, Default)]
pub(crate) struct CallbackLock(Mutex<()>);

/// `origin` with its callback reference resolved to the URL (what a report
/// carries). A reference whose record is missing resolves to no URL, and
/// says so: the report then goes where the source is configured to send.
pub(crate) fn resolve(tree: &sled::Tree, origin: Option<&Origin>) -> Option<Origin> {
    match origin {
        Some(Origin::Http {
            callback_url,
            callback_ref: Some(r),
        }) => {
            let url = callback_url.clone().or_else(|| {
                read_url(tree, r)
                    .map_err(|problem| {
                        tracing::error!(callback_ref = %r, %problem,
                            "the event's callback URL cannot be read; its report goes to the source's callback_url");
                    })
                    .ok()
            });
            Some(Origin::Http {
                callback_url: url,
                callback_ref: None,
            })
        }
        other => other.cloned(),
    }
}

fn read_url(tree: &sled::Tree, r: &str) -> Result<String, String> {
    let d = unhex(r).ok_or("malformed reference")?;
    let key = callback_key(&d);
    let raw = tree
        .get(key)
        .map_err(|e| e.to_string())?
        .ok_or("no such record")?;
    decode::<CallbackUrl>(&key, &raw)
        .map(|c| c.url)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_through_hex() {
        let d = digest("https://oms.example/cb?x=1");
        assert_eq!(unhex(&hex(&d)), Some(d));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(32)), None);
    }

    #[test]
    fn counts_add_up_and_the_record_goes_with_the_last_reference() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        let lock = CallbackLock::default();
        let http = |url: &str| {
            Some(Origin::Http {
                callback_url: Some(url.into()),
                callback_ref: None,
            })
        };
        let mut origins = vec![
            http("https://a/cb"),
            http("https://a/cb"),
            http("https://b/cb"),
        ];
        let mut refs = CallbackRefs::default();
        for o in &mut origins {
            refs.acquire(CallbackRefs::intern(o).unwrap());
        }
        let mut sb = sled::Batch::default();
        let g = refs.write(&lock, &tree, &mut sb).unwrap();
        tree.apply_batch(sb).unwrap();
        drop(g);
        assert_eq!(tree.len(), 2, "one record per distinct URL");
        assert!(origins.iter().all(|o| matches!(
            o,
            Some(Origin::Http {
                callback_url: None,
                callback_ref: Some(_)
            })
        )));
        assert_eq!(
            resolve(&tree, origins[0].as_ref()),
            http("https://a/cb").map(|o| match o {
                Origin::Http { callback_url, .. } => Origin::Http {
                    callback_url,
                    callback_ref: None
                },
                o => o,
            })
        );
        // Release one of the two `a` events and the `b` one.
        let mut refs = CallbackRefs::default();
        refs.release(origins[0].as_ref());
        refs.release(origins[2].as_ref());
        let mut sb = sled::Batch::default();
        let g = refs.write(&lock, &tree, &mut sb).unwrap();
        tree.apply_batch(sb).unwrap();
        drop(g);
        assert_eq!(tree.len(), 1);
        assert!(matches!(resolve(&tree, origins[1].as_ref()),
            Some(Origin::Http { callback_url: Some(u), .. }) if u == "https://a/cb"));
        let mut refs = CallbackRefs::default();
        refs.release(origins[1].as_ref());
        let mut sb = sled::Batch::default();
        let g = refs.write(&lock, &tree, &mut sb).unwrap();
        tree.apply_batch(sb).unwrap();
        drop(g);
        assert_eq!(tree.len(), 0);
        // A dangling reference resolves to no URL rather than failing.
        assert!(matches!(
            resolve(&tree, origins[1].as_ref()),
            Some(Origin::Http {
                callback_url: None,
                callback_ref: None
            })
        ));
    }
}
