//! Reconciliation: which cases of a batch exist on the server, found without
//! trusting `Idempotency-Key`.
//!
//! The contract presents the key as advice, not a promise: a server that
//! ignores it creates a batch's cases again on every re-send after an answer
//! that never arrived. So every case carries a label naming its batch
//! (`delivery.batch_label_key` = the batch's idempotency key), and before a
//! batch whose last attempt may have been carried out is sent again, the
//! batcher lists the queue's cases created since the batch was claimed
//! (less a clock-skew margin), oldest first, under the rate gate, and picks
//! out those with the label. Cases are matched to the batch's events by
//! title and data (a multiset: identical events match one case each), so
//! the batcher can settle what exists and send only what does not.
//!
//! The listing uses only documented parameters (`created_at_from`,
//! `sort_by`, `sort_order`, `limit`, `offset`); ascending creation order
//! keeps offset paging stable while cases are added.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::deliver::gate::{RateGate, RequestClass, ServerFeedback};
use crate::duvo::{ApiError, Case, DuvoClient, ListQuery, SortBy, SortOrder};
use crate::outbox::Batch;
use crate::retry::RetryPolicy;

/// Margin around an attempt's window on top of the offset estimate's own
/// uncertainty (half the observed round trip): the server's time to commit.
const MARGIN_KNOWN: Duration = Duration::from_millis(500);
/// Margin while no create has been answered yet: clocks of NTP-synced
/// hosts are well within it.
const MARGIN_UNKNOWN: Duration = Duration::from_secs(120);

/// The server's clock relative to ours. Best from answered creates (a
/// case's `created_at` lies between our send and our receipt, to the
/// millisecond); until one is answered, from any answer's `Date` header
/// (whole seconds), so a restarted bridge looking for a batch an earlier run
/// may have sent need not assume two minutes of skew.
#[derive(Debug, Default)]
pub struct ServerClock {
    estimate: std::sync::Mutex<Option<Estimate>>,
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Server minus local, milliseconds.
    offset: i64,
    /// How far off `offset` may be, milliseconds.
    uncertainty: i64,
    /// From a case's `created_at` (not a whole-second `Date`).
    precise: bool,
}

fn unix_ms(t: SystemTime) -> i64 {
    crate::clock::unix_ms(t) as i64
}

impl ServerClock {
    pub fn observe(&self, sent: SystemTime, received: SystemTime, created_at: DateTime<Utc>) {
        let (s, r) = (unix_ms(sent), unix_ms(received));
        let half = (r - s).max(0) / 2;
        let offset = created_at.timestamp_millis() - (s + half);
        *self.estimate.lock().unwrap_or_else(|e| e.into_inner()) = Some(Estimate {
            offset,
            uncertainty: half,
            precise: true,
        });
    }

    /// An answer's `Date` header: the server's clock was in `[date, date +
    /// 1 s)` at some instant between `sent` and `received`. Kept only while
    /// no create has given a precise estimate.
    pub fn observe_date(&self, sent: SystemTime, received: SystemTime, date: SystemTime) {
        let (s, r) = (unix_ms(sent), unix_ms(received));
        let half = (r - s).max(0) / 2;
        let mut e = self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_some_and(|e| e.precise) {
            return;
        }
        *e = Some(Estimate {
            offset: unix_ms(date) + 500 - (s + half),
            uncertainty: half + 500,
            precise: false,
        });
    }

    /// Whether any answer has told us the server's time.
    pub fn is_known(&self) -> bool {
        self.estimate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The server-clock window in which cases of an attempt made between
    /// `start` and `end` (local clock) can have been created.
    pub fn window(&self, start: SystemTime, end: SystemTime) -> (DateTime<Utc>, DateTime<Utc>) {
        let estimate = *self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        let (offset, margin) = match estimate {
            Some(e) => (e.offset, e.uncertainty + MARGIN_KNOWN.as_millis() as i64),
            None => (0, MARGIN_UNKNOWN.as_millis() as i64),
        };
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        (
            at(unix_ms(start) + offset - margin),
            at(unix_ms(end) + offset + margin),
        )
    }
}

/// Cases per listing page (the API's maximum).
const PAGE: u32 = 100;

/// What the server holds of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Per event, in batch order: the case created for it, if any.
    pub cases: Vec<Option<Case>>,
    /// Cases with the batch's label that match no event (or an event
    /// already matched): duplicates created earlier, or foreign.
    pub extra: usize,
    /// Listing pages read.
    pub pages: u32,
}

impl Found {
    pub fn count(&self) -> usize {
        self.cases.iter().filter(|c| c.is_some()).count()
    }
}

/// List the queue's cases created while an attempt made between `attempt`'s
/// start and end (local clock) may have been carried out, for `batch`'s
/// labelled ones, and match them to its events. Each page takes a create
/// permit (it stands in for a create); the walk ends at the window's end or
/// as soon as every event is found. While `clock` knows nothing of the
/// server's time (a fresh start), the first page asks for one case only,
/// to learn it from the answer's `Date`: one request instead of walking two
/// minutes of skew margin. A page that fails transiently (5xx, 429,
/// timeout) is asked for again after `retry`'s backoff, so a flaky server
/// does not restart the walk; any other failure ends it.
pub async fn find_batch(
    client: &DuvoClient,
    gate: &RateGate,
    label_key: &str,
    batch: &Batch,
    clock: &ServerClock,
    attempt: (SystemTime, SystemTime),
    retry: RetryPolicy,
) -> Result<Found, ApiError> {
    let mut schedule = retry.new_schedule();
    let mut probe = !clock.is_known();
    let (mut since, mut until) = clock.window(attempt.0, attempt.1);
    let mut labelled: Vec<Case> = Vec::new();
    let mut offset = 0u64;
    let mut pages = 0u32;
    loop {
        let permit = gate.acquire(RequestClass::Create).await;
        let q = ListQuery {
            limit: Some(if probe { 1 } else { PAGE }),
            offset: Some(offset),
            created_at_from: Some(since),
            sort_by: Some(SortBy::CreatedAt),
            sort_order: Some(SortOrder::Asc),
            ..ListQuery::default()
        };
        let sent = SystemTime::now();
        let res = client.list_cases(batch.queue_id, &q).await;
        pages += 1;
        if let Ok(r) = &res
            && let Some(date) = r.date
        {
            clock.observe_date(sent, SystemTime::now(), date);
        }
        metrics::counter!("duvo_bridge_api_requests_total", "endpoint" => "reconcile",
            "account" => gate.account().to_string(),
            "outcome" => match &res { Ok(r) => r.status.as_u16().to_string(), Err(e) => e.status().map_or("transport_error".into(), |s| s.as_u16().to_string()) })
        .increment(1);
        let page = match res {
            Ok(r) => {
                let mut fb = ServerFeedback::from_info(&r.rate, SystemTime::now());
                fb.status = Some(r.status.as_u16());
                permit.observe(&fb);
                if std::mem::take(&mut probe) && clock.is_known() {
                    // Now the window can be narrow: walk it from its start.
                    (since, until) = clock.window(attempt.0, attempt.1);
                    continue;
                }
                r.body
            }
            Err(e) => {
                if let Some(rate) = e.rate() {
                    let mut fb = ServerFeedback::from_info(rate, SystemTime::now());
                    fb.status = e.status().map(|s| s.as_u16());
                    permit.observe(&fb);
                }
                if !e.is_transient() {
                    return Err(e);
                }
                tracing::debug!(batch = batch.id, offset, error = %e, "listing page failed; asking again");
                // A 429's retry-after is the gate's to honour.
                if e.status().map(|s| s.as_u16()) != Some(429) {
                    tokio::time::sleep(schedule.next_delay()).await;
                }
                continue;
            }
        };
        schedule = retry.new_schedule();
        let n = page.cases.len();
        let past_window = page.cases.last().is_some_and(|c| c.created_at > until);
        labelled.extend(page.cases.into_iter().filter(|c| {
            c.labels
                .iter()
                .any(|l| l.key == label_key && l.value == batch.idempotency_key)
        }));
        offset += n as u64;
        // Every event found: later pages can only hold surplus copies,
        // which change nothing about what to send.
        let complete = labelled.len() >= batch.events.len()
            && match_cases(batch, labelled.clone(), pages).count() == batch.events.len();
        if n < PAGE as usize || past_window || complete {
            break;
        }
    }
    Ok(match_cases(batch, labelled, pages))
}

/// Pair labelled cases with the batch's events by (title, data).
fn match_cases(batch: &Batch, labelled: Vec<Case>, pages: u32) -> Found {
    let mut by_content: HashMap<(String, Option<String>), Vec<Case>> = HashMap::new();
    let total = labelled.len();
    for c in labelled.into_iter().rev() {
        by_content
            .entry((c.title.clone(), c.data.clone()))
            .or_default()
            .push(c);
    }
    let cases: Vec<Option<Case>> = batch
        .events
        .iter()
        .map(|(_, nc)| {
            by_content
                .get_mut(&(nc.title.clone(), nc.data.clone()))
                .and_then(Vec::pop)
        })
        .collect();
    let matched = cases.iter().filter(|c| c.is_some()).count();
    Found {
        cases,
        extra: total - matched,
        pages,
    }
}

/// The case ids of a fully found batch, in batch order.
pub fn all_ids(found: &Found) -> Option<Vec<Uuid>> {
    found
        .cases
        .iter()
        .map(|c| c.as_ref().map(|c| c.id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duvo::{CaseStatus, Label, NewCase};
    use crate::outbox::EventId;

    fn case(title: &str, data: &str) -> Case {
        let t = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        Case {
            id: Uuid::new_v4(),
            queue_id: Uuid::nil(),
            title: title.into(),
            data: Some(data.into()),
            status: CaseStatus::Pending,
            labels: vec![Label {
                key: "k".into(),
                value: "v".into(),
            }],
            priority: None,
            claimed_at: None,
            claimed_by_run_id: None,
            completed_at: None,
            postponed_to: None,
            pending_human_request_id: None,
            agent_run_status: None,
            created_at: t,
            updated_at: t,
        }
    }

    fn batch(contents: &[(&str, &str)]) -> Batch {
        Batch {
            id: 1,
            idempotency_key: "v".into(),
            queue_id: Uuid::nil(),
            events: contents
                .iter()
                .enumerate()
                .map(|(i, (t, d))| {
                    (
                        EventId(i as u64),
                        NewCase {
                            title: (*t).into(),
                            data: Some((*d).into()),
                            labels: vec![],
                            priority: None,
                        },
                    )
                })
                .collect(),
            created_at_ms: 0,
            attempts: 1,
        }
    }

    #[test]
    fn the_window_follows_the_servers_clock() {
        let clock = ServerClock::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (from, until) = clock.window(t0, t0 + Duration::from_secs(5));
        assert_eq!(
            until - from,
            chrono::Duration::seconds(5 + 240),
            "unknown: wide"
        );
        // The server is 10 s ahead; a create took 200 ms.
        let created = DateTime::<Utc>::from_timestamp(1_800_000_010, 100_000_000).unwrap();
        clock.observe(t0, t0 + Duration::from_millis(200), created);
        let (from, until) = clock.window(t0, t0 + Duration::from_secs(5));
        assert_eq!(
            from,
            DateTime::<Utc>::from_timestamp(1_800_000_009, 400_000_000).unwrap()
        );
        assert_eq!(
            until,
            DateTime::<Utc>::from_timestamp(1_800_000_015, 600_000_000).unwrap()
        );
    }

    #[test]
    fn a_date_header_narrows_an_unknown_clock_and_never_overrides_a_create() {
        let clock = ServerClock::default();
        assert!(!clock.is_known());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // The server is 10 s ahead; its answer took 200 ms and said 10:00:10.
        let date = t0 + Duration::from_secs(10);
        clock.observe_date(t0, t0 + Duration::from_millis(200), date);
        assert!(clock.is_known());
        let (from, until) = clock.window(t0, t0 + Duration::from_secs(5));
        // Offset 10.4 s (the date's mid-second less half the round trip),
        // margin 0.1 + 0.5 (whole seconds) + 0.5.
        assert_eq!(
            from,
            DateTime::<Utc>::from_timestamp(1_800_000_009, 300_000_000).unwrap()
        );
        assert_eq!(
            until,
            DateTime::<Utc>::from_timestamp(1_800_000_016, 500_000_000).unwrap()
        );
        let created = DateTime::<Utc>::from_timestamp(1_800_000_010, 100_000_000).unwrap();
        clock.observe(t0, t0 + Duration::from_millis(200), created);
        clock.observe_date(t0, t0 + Duration::from_millis(200), t0);
        let (from, _) = clock.window(t0, t0 + Duration::from_secs(5));
        assert_eq!(
            from,
            DateTime::<Utc>::from_timestamp(1_800_000_009, 400_000_000).unwrap(),
            "the create's estimate stands"
        );
    }

    #[test]
    fn identical_events_match_one_case_each_and_surplus_is_counted() {
        let b = batch(&[("A", "1"), ("A", "1"), ("B", "2"), ("C", "3")]);
        let found = match_cases(
            &b,
            vec![
                case("A", "1"),
                case("B", "2"),
                case("B", "2"),
                case("Z", "9"),
            ],
            1,
        );
        let got: Vec<bool> = found.cases.iter().map(Option::is_some).collect();
        assert_eq!(got, vec![true, false, true, false]);
        assert_eq!(found.count(), 2);
        assert_eq!(found.extra, 2, "the second B and the foreign Z");
        assert_eq!(all_ids(&found), None);
        let all = match_cases(
            &b,
            vec![
                case("A", "1"),
                case("A", "1"),
                case("B", "2"),
                case("C", "3"),
            ],
            1,
        );
        assert_eq!(all_ids(&all).map(|v| v.len()), Some(4));
    }
}
