//! On-disk layout and record encoding.
//!
//! Everything about one event lives in ONE sled tree ([`EVENTS_TREE`]) so an
//! append (record + identity) or a state change (events + batch record) is a
//! single atomic `apply_batch` on one tree. Key spaces are told apart by a
//! one-byte prefix:
//!
//! | key                                   | value                          |
//! |---------------------------------------|--------------------------------|
//! | `e` + event id (u64 BE)               | [`EventRecord`]                |
//! | `i` + identity (UTF-8)                | event id (u64)                 |
//! | `b` + batch id (u64 BE)               | [`BatchRecord`]                |
//! | `t` + settled_at_ms (u64 BE) + id     | empty record (expiry index)    |
//! | `c` + case id (16 bytes)              | event id (u64): tracked cases  |
//! | `x` + deadline_ms (u64 BE) + id       | empty record (tracking TTL)    |
//! | `w` + queue id (16 bytes) + stream    | [`Watermark`]                  |
//! | `r` + report id (u64 BE)              | [`Report`](super::Report) |
//! | `d` + report id (u64 BE)              | [`DeadReport`](super::DeadReport): given up |
//! | `u` + URL digest (16 bytes)           | a callback URL and its reference count (`callbacks`) |
//! | `z` + original key                    | a damaged record's bytes, kept after a rebuild |
//!
//! A tracked case's state is in its event record ([`EventRecord::tracking`]);
//! the `c` key exists exactly while the case is followed (phase open or
//! watching), and its `x` key is the TTL index. A report is written in the
//! same sled batch as the change that caused it.
//!
//! The `t` keys sort by settle time, so `purge_expired` reads only the
//! expired range instead of scanning every event.
//!
//! Dead letters live in their own tree ([`DEAD_LETTERS_TREE`], key = event
//! id u64 BE, value = [`DeadLetter`](super::DeadLetter)).
//!
//! Every value is framed as `[version u8][crc32 of payload, u32 LE][payload]`
//! with a serde_json payload. The checksum is verified on every read, so a
//! torn or bit-flipped value surfaces as `OutboxError::Corrupt` instead of
//! as a wrong case sent to the API.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use super::types::{EventState, ListingStream, Origin, OutboxError, Tracking};
use crate::duvo::NewCase;

/// Tree holding events, identities, batches and the expiry index.
pub const EVENTS_TREE: &str = "events";
/// Tree holding dead letters.
pub const DEAD_LETTERS_TREE: &str = "dead_letters";

/// Current record format version (first byte of every value).
pub const RECORD_VERSION: u8 = 1;
const HEADER_LEN: usize = 5;

pub(crate) const EVENT_PREFIX: u8 = b'e';
pub(crate) const IDENTITY_PREFIX: u8 = b'i';
pub(crate) const BATCH_PREFIX: u8 = b'b';
pub(crate) const EXPIRY_PREFIX: u8 = b't';
pub(crate) const CASE_PREFIX: u8 = b'c';
pub(crate) const DEADLINE_PREFIX: u8 = b'x';
pub(crate) const WATERMARK_PREFIX: u8 = b'w';
pub(crate) const REPORT_PREFIX: u8 = b'r';
pub(crate) const DEAD_REPORT_PREFIX: u8 = b'd';
pub(crate) const QUARANTINE_PREFIX: u8 = b'z';

/// Key of an event record in [`EVENTS_TREE`] (public so tools and tests can
/// inspect the raw database).
pub fn event_key(id: u64) -> [u8; 9] {
    prefixed_u64(EVENT_PREFIX, id)
}

/// Key of a batch record in [`EVENTS_TREE`].
pub fn batch_key(id: u64) -> [u8; 9] {
    prefixed_u64(BATCH_PREFIX, id)
}

/// Key of an identity in [`EVENTS_TREE`].
pub fn identity_key(identity: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + identity.len());
    k.push(IDENTITY_PREFIX);
    k.extend_from_slice(identity.as_bytes());
    k
}

pub(crate) fn expiry_key(settled_at_ms: u64, id: u64) -> [u8; 17] {
    time_key(EXPIRY_PREFIX, settled_at_ms, id)
}

/// Key of a tracked case's TTL entry.
pub(crate) fn deadline_key(deadline_ms: u64, id: u64) -> [u8; 17] {
    time_key(DEADLINE_PREFIX, deadline_ms, id)
}

fn time_key(prefix: u8, at_ms: u64, id: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..9].copy_from_slice(&at_ms.to_be_bytes());
    k[9..17].copy_from_slice(&id.to_be_bytes());
    k
}

/// Event id of an expiry key, if well formed.
pub(crate) fn expiry_key_id(key: &[u8]) -> Option<u64> {
    time_key_id(EXPIRY_PREFIX, key)
}

/// Event id of a deadline key, if well formed.
pub(crate) fn deadline_key_id(key: &[u8]) -> Option<u64> {
    time_key_id(DEADLINE_PREFIX, key)
}

fn time_key_id(prefix: u8, key: &[u8]) -> Option<u64> {
    if key.len() != 17 || key[0] != prefix {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[9..17]);
    Some(u64::from_be_bytes(b))
}

/// Key of a tracked case (case id -> event id).
pub fn case_key(case_id: Uuid) -> [u8; 17] {
    prefixed_uuid(CASE_PREFIX, case_id)
}

/// Key of a queue's tracking watermark for one listing stream.
pub fn watermark_key(queue_id: Uuid, stream: ListingStream) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..17].copy_from_slice(&prefixed_uuid(WATERMARK_PREFIX, queue_id));
    k[17] = stream.byte();
    k
}

/// Key of a pending report.
pub fn report_key(id: u64) -> [u8; 9] {
    prefixed_u64(REPORT_PREFIX, id)
}

/// Where a damaged record's bytes are kept once the outbox rebuilt what
/// they stood for: `z` + the original key.
pub(crate) fn quarantine_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(QUARANTINE_PREFIX);
    k.extend_from_slice(key);
    k
}

/// Key of a report given up on.
pub fn dead_report_key(id: u64) -> [u8; 9] {
    prefixed_u64(DEAD_REPORT_PREFIX, id)
}

fn prefixed_uuid(prefix: u8, id: Uuid) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// The uuid after a one-byte prefix, if the key is exactly that.
pub(crate) fn key_uuid(key: &[u8]) -> Option<Uuid> {
    if key.len() != 17 {
        return None;
    }
    Uuid::from_slice(&key[1..]).ok()
}

/// The u64 after a one-byte prefix, if the key is exactly that.
pub(crate) fn key_u64(key: &[u8]) -> Option<u64> {
    if key.len() != 9 {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[1..9]);
    Some(u64::from_be_bytes(b))
}

fn prefixed_u64(prefix: u8, v: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&v.to_be_bytes());
    k
}

/// Readable form of a raw key for errors and logs.
pub fn describe_key(key: &[u8]) -> String {
    match key.first() {
        Some(&EVENT_PREFIX) if key.len() == 9 => format!("events/e/{}", key_u64(key).unwrap_or(0)),
        Some(&BATCH_PREFIX) if key.len() == 9 => format!("events/b/{}", key_u64(key).unwrap_or(0)),
        Some(&IDENTITY_PREFIX) => format!("events/i/{}", String::from_utf8_lossy(&key[1..])),
        Some(&EXPIRY_PREFIX) => format!("events/t/{:02x?}", &key[1..]),
        Some(&DEADLINE_PREFIX) => format!("events/x/{:02x?}", &key[1..]),
        Some(&REPORT_PREFIX) if key.len() == 9 => {
            format!("events/r/{}", key_u64(key).unwrap_or(0))
        }
        Some(&QUARANTINE_PREFIX) => format!("events/z/{}", describe_key(&key[1..])),
        Some(&DEAD_REPORT_PREFIX) if key.len() == 9 => {
            format!("events/d/{}", key_u64(key).unwrap_or(0))
        }
        Some(&CASE_PREFIX) if key.len() == 17 => {
            format!("events/c/{}", key_uuid(key).unwrap_or_default())
        }
        Some(&WATERMARK_PREFIX) if key.len() == 18 => format!(
            "events/w/{}/{}",
            key_uuid(&key[..17]).unwrap_or_default(),
            key[17] as char
        ),
        _ => format!("{key:02x?}"),
    }
}

/// Frame a payload: version byte, crc32, serde_json bytes.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, OutboxError> {
    let payload = serde_json::to_vec(value)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Verify the frame and decode the payload; any mismatch is `Corrupt`.
pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, OutboxError> {
    decode_borrowed(key, bytes)
}

/// [`decode`] into a type that may borrow from `bytes` (no copies of the
/// fields it leaves as `&str` or `&RawValue`).
pub(crate) fn decode_borrowed<'a, T: Deserialize<'a>>(
    key: &[u8],
    bytes: &'a [u8],
) -> Result<T, OutboxError> {
    let corrupt = |reason: String| OutboxError::Corrupt {
        key: describe_key(key),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!("record too short ({} bytes)", bytes.len())));
    }
    if bytes[0] != RECORD_VERSION {
        return Err(corrupt(format!("unknown record version {}", bytes[0])));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[1..HEADER_LEN]);
    let stored = u32::from_le_bytes(crc);
    let payload = &bytes[HEADER_LEN..];
    let actual = crc32fast::hash(payload);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    serde_json::from_slice(payload).map_err(|e| corrupt(format!("undecodable payload: {e}")))
}

/// The whole state of one event.
///
/// While the event is pending, `case` holds the payload; once settled the
/// payload is dropped and the record shrinks to a tombstone (title, state,
/// times) kept for `retention` so dedupe and `get` keep working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EventRecord {
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub queue_id: Uuid,
    pub received_at_ms: u64,
    pub title: String,
    pub state: EventState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<NewCase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at_ms: Option<u64>,
    /// Where the event came from (for failure reports); kept while the
    /// case is tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Case tracking (delivered events, when tracking is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

impl EventRecord {
    /// Followed by the tracker right now (its `c` key exists).
    pub fn is_tracked(&self) -> bool {
        self.tracking
            .as_ref()
            .is_some_and(|t| t.phase != super::types::TrackPhase::Done)
    }
}

/// What opening the outbox needs of an event record, read without copying
/// its payload: a million waiting events are scanned at every start, and
/// decoding each whole record (then serialising its case again to size it)
/// was most of the time to ready.
#[derive(Debug, Deserialize)]
pub(crate) struct EventScan<'a> {
    pub queue_id: Uuid,
    pub received_at_ms: u64,
    pub state: EventState,
    /// The case as stored: exactly the bytes `serde_json` writes for it in a
    /// create body, so its length is [`case_body_size`] without a copy.
    #[serde(default, borrow)]
    pub case: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    pub tracking: Option<TrackingPhase>,
}

/// The part of [`Tracking`] the open-time counts need.
#[derive(Debug, Deserialize)]
pub(crate) struct TrackingPhase {
    pub phase: super::types::TrackPhase,
}

/// Where a queue's tracking listing resumes: cases updated at or after
/// `updated_at` (server clock) have not all been seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A persisted batch: ids only, the payloads stay in the event records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    pub idempotency_key: String,
    pub queue_id: Uuid,
    pub event_ids: Vec<u64>,
    pub created_at_ms: u64,
    pub attempts: u32,
}

/// Size in bytes of a case as serialised inside a `{"cases":[...]}` body.
pub(crate) fn case_body_size(case: &NewCase) -> Result<u64, OutboxError> {
    Ok(serde_json::to_vec(case)?.len() as u64)
}

/// Size of `{"cases":[c1,c2,...]}` given the number of cases and the sum of
/// their serialised sizes: 12 bytes of envelope plus the commas.
pub(crate) fn batch_body_size(count: u64, cases_bytes: u64) -> u64 {
    if count == 0 {
        return 12;
    }
    12 + cases_bytes + (count - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duvo::{CreateCasesRequest, Label, Priority};

    fn case(title: &str) -> NewCase {
        NewCase {
            title: title.to_string(),
            data: Some("{\"k\":\"v \\\" é\"}".to_string()),
            labels: vec![Label {
                key: "a".into(),
                value: "b".into(),
            }],
            priority: Some(Priority::High),
        }
    }

    #[test]
    fn body_size_matches_serde_json() {
        for n in 1..5 {
            let cases: Vec<NewCase> = (0..n).map(|i| case(&format!("t{i}"))).collect();
            let sum: u64 = cases.iter().map(|c| case_body_size(c).unwrap()).sum();
            let body = serde_json::to_vec(&CreateCasesRequest::batch(cases)).unwrap();
            assert_eq!(batch_body_size(n, sum), body.len() as u64);
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let key = event_key(7);
        let bytes = encode(&case("x")).unwrap();
        assert_eq!(bytes[0], RECORD_VERSION);
        let back: NewCase = decode(&key, &bytes).unwrap();
        assert_eq!(back, case("x"));

        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        match decode::<NewCase>(&key, &flipped) {
            Err(OutboxError::Corrupt { key, reason }) => {
                assert_eq!(key, "events/e/7");
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            decode::<NewCase>(&key, b"ab"),
            Err(OutboxError::Corrupt { .. })
        ));
        let mut wrong_version = bytes;
        wrong_version[0] = 9;
        assert!(matches!(
            decode::<NewCase>(&key, &wrong_version),
            Err(OutboxError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_open_scan_reads_what_a_full_decode_reads_and_sizes_cases_exactly() {
        use crate::duvo::{Label, Priority};
        let cases = [
            case("x"),
            NewCase {
                title: "Ünïcode \"quoted\" \\ \u{1F600} \t".into(),
                data: Some(
                    r#"{"order_id":123456789012345678901234567890,"s":"a\"b\u00e9"}"#.into(),
                ),
                labels: vec![Label {
                    key: "duvo-bridge-batch".into(),
                    value: "k/\u{7f}".into(),
                }],
                priority: Some(Priority::High),
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let rec = EventRecord {
                source: "oms".into(),
                identity: Some("idem:1".into()),
                queue_id: Uuid::from_u128(9),
                received_at_ms: 1_700_000_000_000 + i as u64,
                title: c.title.clone(),
                state: EventState::Batched { batch_id: 4 },
                case: Some(c.clone()),
                settled_at_ms: None,
                origin: None,
                tracking: None,
            };
            let key = event_key(i as u64);
            let bytes = encode(&rec).unwrap();
            let scan: EventScan<'_> = decode_borrowed(&key, &bytes).unwrap();
            assert_eq!(scan.queue_id, rec.queue_id);
            assert_eq!(scan.received_at_ms, rec.received_at_ms);
            assert_eq!(scan.state, rec.state);
            assert!(scan.tracking.is_none());
            assert_eq!(
                scan.case.unwrap().get().len() as u64,
                case_body_size(c).unwrap(),
                "case {i}"
            );
        }
    }

    #[test]
    fn keys_order_and_parse() {
        assert!(event_key(1) < event_key(256));
        assert_eq!(key_u64(&batch_key(42)), Some(42));
        let k = expiry_key(1000, 5);
        assert_eq!(expiry_key_id(&k), Some(5));
        assert!(expiry_key(999, 9) < expiry_key(1000, 1));
        assert_eq!(
            describe_key(&identity_key("kafka:t:0:1")),
            "events/i/kafka:t:0:1"
        );
    }

    #[test]
    fn event_state_serde_is_snake_case_tagged() {
        let s = serde_json::to_value(EventState::Batched { batch_id: 3 }).unwrap();
        assert_eq!(s, serde_json::json!({"state": "batched", "batch_id": 3}));
        let s = serde_json::to_value(EventState::Stored).unwrap();
        assert_eq!(s, serde_json::json!({"state": "stored"}));
    }

    proptest::proptest! {
        /// Whatever bytes a disk hands back, decoding is a typed error or a
        /// value, never a panic: raw garbage, and garbage framed with a
        /// valid checksum (so the JSON decoder sees it).
        #[test]
        fn any_bytes_decode_to_a_value_or_a_typed_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            framed in proptest::prelude::any::<bool>(),
        ) {
            let value = if framed {
                let mut v = vec![RECORD_VERSION];
                v.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
                v.extend_from_slice(&bytes);
                v
            } else {
                bytes
            };
            let key = event_key(1);
            for r in [
                decode::<EventRecord>(&key, &value).map(|_| ()),
                decode::<BatchRecord>(&key, &value).map(|_| ()),
                decode::<crate::outbox::Report>(&key, &value).map(|_| ()),
                decode::<u64>(&key, &value).map(|_| ()),
            ] {
                if let Err(e) = r {
                    proptest::prop_assert!(matches!(e, OutboxError::Corrupt { .. }), "{e}");
                }
            }
        }
    }
}
