//! The outbox's case-tracking records: followed cases, listing pages applied
//! atomically with the watermark, TTL expiry, reports, and recovery of all of
//! it after a reopen.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use duvo_bridge::duvo::{Case, CaseStatus, NewCase};
use duvo_bridge::outbox::{
    EventId, ListingStream, NewEvent, Origin, Outbox, OutboxConfig, TrackPhase, TrackingPolicy,
};
use duvo_bridge::report::ReportStatus;
use uuid::Uuid;

fn cfg(dir: &tempfile::TempDir, ttl: Duration) -> OutboxConfig {
    let mut cfg = OutboxConfig::new(dir.path().join("outbox"));
    cfg.cache_capacity_bytes = 16 * 1024 * 1024;
    cfg.retention = Duration::from_millis(1);
    cfg.tracking = Some(TrackingPolicy {
        track_cases: true,
        ttl,
        report_sources: BTreeSet::from(["oms".to_string()]),
        report_statuses: BTreeSet::from([ReportStatus::Failed, ReportStatus::Canceled]),
    });
    cfg
}

fn ev(queue_id: Uuid, i: usize) -> NewEvent {
    NewEvent {
        source: "oms".into(),
        identity: Some(format!("oms:{i}")),
        queue_id,
        case: NewCase {
            title: format!("Order {i}"),
            data: Some(format!("{{\"order_id\":{i}}}")),
            labels: Vec::new(),
            priority: None,
        },
        received_at_ms: 1,
        origin: Some(Origin::Http {
            callback_url: None,
            callback_ref: None,
        }),
    }
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

fn listed(id: Uuid, queue_id: Uuid, status: CaseStatus, updated: i64) -> Case {
    Case {
        id,
        queue_id,
        title: "t".into(),
        data: None,
        status,
        labels: Vec::new(),
        priority: None,
        claimed_at: None,
        claimed_by_run_id: None,
        completed_at: None,
        postponed_to: None,
        pending_human_request_id: None,
        agent_run_status: None,
        created_at: at(0),
        updated_at: at(updated),
    }
}

/// Append `n` events, claim and deliver them; returns (event ids, case ids).
async fn delivered(outbox: &Outbox, q: Uuid, n: usize) -> (Vec<EventId>, Vec<Uuid>) {
    outbox
        .append((0..n).map(|i| ev(q, i)).collect())
        .await
        .unwrap();
    let batch = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
    let cases: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    outbox
        .settle_delivered_at(&batch, &cases, Some(at(0)))
        .await
        .unwrap();
    (batch.event_ids(), cases)
}

#[tokio::test]
async fn a_listing_page_reports_failures_forgets_completions_and_moves_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir, Duration::from_secs(3600)))
        .await
        .unwrap();
    let q = Uuid::new_v4();
    let (events, cases) = delivered(&outbox, q, 4).await;
    assert_eq!(
        outbox.watermark(q, ListingStream::Reports).unwrap(),
        Some(at(0))
    );
    assert_eq!(outbox.tracked_queues()[0].open, 4);

    let page = vec![
        listed(cases[0], q, CaseStatus::Completed, 5),
        listed(cases[1], q, CaseStatus::Failed, 6),
        listed(Uuid::new_v4(), q, CaseStatus::Failed, 7), // someone else's case
    ];
    let o = outbox
        .apply_listing(q, ListingStream::Reports, &page, at(7))
        .await
        .unwrap();
    assert_eq!((o.ours, o.transitions, o.reports, o.finished), (2, 2, 1, 1));
    assert_eq!(
        outbox.watermark(q, ListingStream::Reports).unwrap(),
        Some(at(7))
    );
    // Each stream has its own watermark.
    assert_eq!(
        outbox.watermark(q, ListingStream::Cleanup).unwrap(),
        Some(at(0))
    );
    let t = outbox.tracked_queues()[0];
    assert_eq!((t.open, t.watching), (2, 1));

    // Re-reading the same page (lookback, or a crash before the next page)
    // changes nothing and reports nothing.
    let again = outbox
        .apply_listing(q, ListingStream::Reports, &page, at(7))
        .await
        .unwrap();
    assert_eq!((again.transitions, again.reports), (0, 0));
    // The watermark never moves backwards.
    outbox
        .apply_listing(q, ListingStream::Reports, &[], at(3))
        .await
        .unwrap();
    assert_eq!(
        outbox.watermark(q, ListingStream::Reports).unwrap(),
        Some(at(7))
    );

    let pending = outbox.pending_reports();
    assert_eq!(pending.get("oms"), Some(&1));
    let ids = outbox.pending_report_ids("oms", 10, &BTreeSet::new());
    let report = outbox.report(ids[0]).unwrap().unwrap();
    assert_eq!(report.status, ReportStatus::Failed);
    assert_eq!(report.case_id, Some(cases[1]));
    assert_eq!(report.event_id, events[1]);
    assert_eq!(report.event.as_deref(), Some("{\"order_id\":1}"));
    assert_eq!(
        report.origin,
        Some(Origin::Http {
            callback_url: None,
            callback_ref: None,
        })
    );

    // The completed case is a tombstone now; the failed one is watched.
    let done = outbox.get(events[0]).unwrap().unwrap();
    assert_eq!(done.tracking.unwrap().phase, TrackPhase::Done);
    let watched = outbox.get(events[1]).unwrap().unwrap();
    let tr = watched.tracking.unwrap();
    assert_eq!(tr.phase, TrackPhase::Watching);
    assert_eq!(tr.history.len(), 1);
    assert!(tr.history[0].reported);

    // Retried in Duvo and failed again: a new transition, a new report.
    let o = outbox
        .apply_listing(
            q,
            ListingStream::Reports,
            &[listed(cases[1], q, CaseStatus::Failed, 9)],
            at(9),
        )
        .await
        .unwrap();
    assert_eq!((o.transitions, o.reports), (1, 1));
    // An older state seen out of order is ignored.
    let o = outbox
        .apply_listing(
            q,
            ListingStream::Reports,
            &[listed(cases[1], q, CaseStatus::Completed, 8)],
            at(9),
        )
        .await
        .unwrap();
    assert_eq!(o.transitions, 0);

    // Settling a report removes it; settling twice is an error.
    outbox.settle_report(ids[0]).await.unwrap();
    assert!(outbox.report(ids[0]).unwrap().is_none());
    assert!(outbox.settle_report(ids[0]).await.is_err());
    assert_eq!(outbox.pending_reports().get("oms"), Some(&1));
}

#[tokio::test]
async fn tracking_state_and_reports_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let q = Uuid::new_v4();
    let (events, cases) = {
        let outbox = Outbox::open(cfg(&dir, Duration::from_secs(3600)))
            .await
            .unwrap();
        let (events, cases) = delivered(&outbox, q, 3).await;
        outbox
            .apply_listing(
                q,
                ListingStream::Reports,
                &[listed(cases[2], q, CaseStatus::Canceled, 4)],
                at(4),
            )
            .await
            .unwrap();
        (events, cases)
    };
    let outbox = Outbox::open(cfg(&dir, Duration::from_secs(3600)))
        .await
        .unwrap();
    let t = outbox.tracked_queues();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].open, t[0].watching), (2, 1));
    assert_eq!(
        outbox.watermark(q, ListingStream::Reports).unwrap(),
        Some(at(4))
    );
    assert_eq!(outbox.pending_reports().get("oms"), Some(&1));
    // The reopened outbox still recognises the handled transition.
    let o = outbox
        .apply_listing(
            q,
            ListingStream::Reports,
            &[listed(cases[2], q, CaseStatus::Canceled, 4)],
            at(4),
        )
        .await
        .unwrap();
    assert_eq!(o.reports, 0);
    // Tracked events are not purged with the tombstones, whatever retention.
    tokio::time::sleep(Duration::from_millis(5)).await;
    outbox.purge_expired(u64::MAX / 2).unwrap();
    for id in &events {
        assert!(
            outbox.get(*id).unwrap().is_some(),
            "tracked event {id} kept"
        );
    }
}

#[tokio::test]
async fn open_cases_past_the_ttl_are_reported_expired_and_watched_ones_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir, Duration::from_millis(50)))
        .await
        .unwrap();
    let q = Uuid::new_v4();
    let (events, cases) = delivered(&outbox, q, 3).await;
    outbox
        .apply_listing(
            q,
            ListingStream::Reports,
            &[listed(cases[0], q, CaseStatus::Failed, 1)],
            at(1),
        )
        .await
        .unwrap();
    // Before the deadline nothing happens.
    let none = outbox.expire_tracking(0, 100).await.unwrap();
    assert_eq!((none.expired, none.forgotten), (0, 0));
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1_000;
    let o = outbox.expire_tracking(later, 100).await.unwrap();
    assert_eq!((o.expired, o.forgotten, o.reports), (2, 1, 2));
    assert!(outbox.tracked_queues().is_empty());
    let ids = outbox.pending_report_ids("oms", 10, &BTreeSet::new());
    let statuses: Vec<ReportStatus> = ids
        .iter()
        .map(|id| outbox.report(*id).unwrap().unwrap().status)
        .collect();
    assert_eq!(
        statuses,
        vec![
            ReportStatus::Failed,
            ReportStatus::Expired,
            ReportStatus::Expired
        ]
    );
    // A forgotten case listed again changes nothing.
    let o = outbox
        .apply_listing(
            q,
            ListingStream::Reports,
            &[listed(cases[1], q, CaseStatus::Failed, 9)],
            at(9),
        )
        .await
        .unwrap();
    assert_eq!((o.ours, o.reports), (0, 0));
    // Idempotent: a second pass finds nothing.
    let again = outbox.expire_tracking(later, 100).await.unwrap();
    assert_eq!((again.expired, again.forgotten), (0, 0));
    // The tombstones now expire like any other.
    assert!(outbox.purge_expired(later + 10_000).unwrap() >= 3);
    assert!(outbox.get(events[1]).unwrap().is_none());
}

#[tokio::test]
async fn sources_without_a_reporter_are_tracked_but_never_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir, Duration::from_secs(3600));
    c.tracking.as_mut().unwrap().report_sources.clear();
    let outbox = Outbox::open(c).await.unwrap();
    let q = Uuid::new_v4();
    let (events, cases) = delivered(&outbox, q, 1).await;
    let o = outbox
        .apply_listing(
            q,
            ListingStream::Reports,
            &[listed(cases[0], q, CaseStatus::Failed, 2)],
            at(2),
        )
        .await
        .unwrap();
    assert_eq!((o.transitions, o.reports), (1, 0));
    let tr = outbox.get(events[0]).unwrap().unwrap().tracking.unwrap();
    assert!(!tr.history[0].reported);
    assert!(outbox.pending_reports().is_empty());
}

/// A batch whose answer came late (its cases were created before the
/// streams' watermarks: a retry, a re-send after a restart) sends both
/// streams back to the cases' creation, durably, so a failure of one of
/// them that a listing passed over while it was not known is still seen.
#[tokio::test]
async fn a_batch_settled_behind_the_watermark_rewinds_both_streams() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir, Duration::from_secs(3600)))
        .await
        .unwrap();
    let q = Uuid::new_v4();
    let (_, first) = delivered(&outbox, q, 2).await;
    // Both streams move to 100 s.
    for stream in ListingStream::ALL {
        let page = vec![listed(first[0], q, CaseStatus::Completed, 100)];
        outbox
            .apply_listing(q, stream, &page, at(100))
            .await
            .unwrap();
        assert_eq!(outbox.watermark(q, stream).unwrap(), Some(at(100)));
    }
    // A batch settled on time (its cases created after 100 s): no rewind.
    outbox
        .append((10..12).map(|i| ev(q, i)).collect())
        .await
        .unwrap();
    let b = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
    let on_time: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
    outbox
        .settle_delivered_at(&b, &on_time, Some(at(101)))
        .await
        .unwrap();
    assert_eq!(outbox.take_rewind(q, ListingStream::Reports), None);

    // A late one: its cases were created at 40 s.
    outbox
        .append((20..22).map(|i| ev(q, i)).collect())
        .await
        .unwrap();
    let b = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
    let late: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
    outbox
        .settle_delivered_at(&b, &late, Some(at(40)))
        .await
        .unwrap();
    for stream in ListingStream::ALL {
        assert_eq!(outbox.watermark(q, stream).unwrap(), Some(at(40)));
    }
    // Until the tracker takes the rewind, a page read before it cannot
    // move the persisted watermark past it.
    outbox
        .apply_listing(q, ListingStream::Cleanup, &[], at(120))
        .await
        .unwrap();
    assert_eq!(
        outbox.watermark(q, ListingStream::Cleanup).unwrap(),
        Some(at(40))
    );
    assert_eq!(outbox.take_rewind(q, ListingStream::Reports), Some(at(40)));
    assert_eq!(outbox.take_rewind(q, ListingStream::Cleanup), Some(at(40)));
    assert_eq!(outbox.take_rewind(q, ListingStream::Cleanup), None);

    // The failure the listing passed over is now seen, and reported once.
    let page = vec![listed(late[1], q, CaseStatus::Failed, 50)];
    let o = outbox
        .apply_listing(q, ListingStream::Reports, &page, at(50))
        .await
        .unwrap();
    assert_eq!(o.reports, 1, "{o:?}");
    let again = outbox
        .apply_listing(q, ListingStream::Reports, &page, at(50))
        .await
        .unwrap();
    assert_eq!(
        again.reports, 0,
        "a re-read transition is not reported twice"
    );
}

/// Keys with `prefix` in the outbox's events tree, and whether any event
/// record (`e` keys) contains `needle`; read with the outbox closed.
fn raw_scan(dir: &tempfile::TempDir, prefix: u8, needle: &str) -> (usize, bool) {
    let db = duvo_bridge::outbox::open_raw(&dir.path().join("outbox")).unwrap();
    let tree = db
        .open_tree(duvo_bridge::outbox::record::EVENTS_TREE)
        .unwrap();
    let n = tree.scan_prefix([prefix]).count();
    let found = tree.scan_prefix([b'e']).any(|kv| {
        let (_, v) = kv.unwrap();
        v.windows(needle.len()).any(|w| w == needle.as_bytes())
    });
    (n, found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_is_stored_once_reaches_its_reports_and_goes_with_its_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://oms.example/cb/{}", "x".repeat(1900));
    let q = Uuid::new_v4();
    let with_url = |i: usize| {
        let mut e = ev(q, i);
        e.origin = Some(Origin::Http {
            callback_url: Some(url.clone()),
            callback_ref: None,
        });
        e
    };
    let cases: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    {
        let outbox = Outbox::open(cfg(&dir, Duration::from_millis(50)))
            .await
            .unwrap();
        outbox
            .append((0..100).map(with_url).collect())
            .await
            .unwrap();
        // The same request again: duplicates, no new references.
        let again = outbox
            .append((0..100).map(with_url).collect())
            .await
            .unwrap();
        assert!(
            again
                .iter()
                .all(|o| matches!(o, duvo_bridge::outbox::AppendOutcome::Duplicate(_)))
        );
        let batch = outbox.claim_batch(q, 100, 1 << 22).await.unwrap().unwrap();
        outbox
            .settle_delivered_at(&batch, &cases, Some(at(0)))
            .await
            .unwrap();
    }
    assert_eq!(
        raw_scan(&dir, b'u', &url),
        (1, false),
        "one URL record; no event record holds the URL"
    );

    let outbox = Outbox::open(cfg(&dir, Duration::from_millis(50)))
        .await
        .unwrap();
    let mut page = vec![listed(cases[0], q, CaseStatus::Failed, 1)];
    page.extend(
        cases[1..]
            .iter()
            .map(|c| listed(*c, q, CaseStatus::Completed, 1)),
    );
    let o = outbox
        .apply_listing(q, ListingStream::Reports, &page, at(1))
        .await
        .unwrap();
    assert_eq!((o.reports, o.finished), (1, 99));
    let ids = outbox.pending_report_ids("oms", 10, &BTreeSet::new());
    let report = outbox.report(ids[0]).unwrap().unwrap();
    assert_eq!(
        report.origin,
        Some(Origin::Http {
            callback_url: Some(url.clone()),
            callback_ref: None,
        }),
        "the report carries the URL itself"
    );
    drop(outbox);
    assert_eq!(
        raw_scan(&dir, b'u', &url).0,
        1,
        "the watched case still refers to it"
    );

    let outbox = Outbox::open(cfg(&dir, Duration::from_millis(50)))
        .await
        .unwrap();
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1_000;
    let o = outbox.expire_tracking(later, 100).await.unwrap();
    assert_eq!(o.forgotten, 1);
    // The report outlives the record it came from.
    assert_eq!(
        outbox.report(ids[0]).unwrap().unwrap().origin,
        report.origin
    );
    drop(outbox);
    assert_eq!(raw_scan(&dir, b'u', &url).0, 0, "the last reference went");
}

#[tokio::test]
async fn purging_tombstones_releases_their_callback_urls() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir, Duration::from_secs(3600));
    c.tracking.as_mut().unwrap().track_cases = false;
    let q = Uuid::new_v4();
    {
        let outbox = Outbox::open(c.clone()).await.unwrap();
        let events = (0..10)
            .map(|i| {
                let mut e = ev(q, i);
                e.origin = Some(Origin::Http {
                    callback_url: Some(format!("https://oms.example/cb/{}", i % 2)),
                    callback_ref: None,
                });
                e
            })
            .collect();
        outbox.append(events).await.unwrap();
        let batch = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
        let cases: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
        outbox
            .settle_delivered_at(&batch, &cases, None)
            .await
            .unwrap();
        outbox.flush().await.unwrap();
    }
    assert_eq!(raw_scan(&dir, b'u', "oms.example").0, 2);
    {
        let outbox = Outbox::open(c.clone()).await.unwrap();
        assert_eq!(outbox.purge_expired(u64::MAX / 2).unwrap(), 10);
        outbox.flush().await.unwrap();
    }
    assert_eq!(raw_scan(&dir, b'u', "oms.example"), (0, false));
}
