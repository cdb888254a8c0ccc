//! Integration tests of the durable outbox against a real sled database in
//! a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use duvo_bridge::duvo::{CreateCasesRequest, NewCase};
use duvo_bridge::outbox::record::{EVENTS_TREE, event_key};
use duvo_bridge::outbox::{
    AppendOutcome, EventId, EventState, NewEvent, Outbox, OutboxConfig, OutboxError,
};
use uuid::Uuid;

fn cfg(dir: &tempfile::TempDir) -> OutboxConfig {
    let mut cfg = OutboxConfig::new(dir.path().join("outbox"));
    cfg.cache_capacity_bytes = 16 * 1024 * 1024;
    cfg
}

fn case(title: &str) -> NewCase {
    NewCase {
        title: title.to_string(),
        data: Some(format!("{{\"title\":\"{title}\"}}")),
        labels: Vec::new(),
        priority: None,
    }
}

fn ev(queue_id: Uuid, identity: Option<&str>, title: &str) -> NewEvent {
    NewEvent {
        source: "oms".to_string(),
        identity: identity.map(str::to_string),
        queue_id,
        case: case(title),
        received_at_ms: 1_700_000_000_000,
        origin: None,
    }
}

fn stored_ids(outcomes: &[AppendOutcome]) -> Vec<EventId> {
    outcomes
        .iter()
        .map(|o| match o {
            AppendOutcome::Stored(id) => *id,
            AppendOutcome::Duplicate(id) => panic!("unexpected duplicate {id}"),
        })
        .collect()
}

#[tokio::test]
async fn append_then_get() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let q = Uuid::new_v4();
    let out = outbox
        .append(vec![ev(q, Some("a"), "first"), ev(q, None, "second")])
        .await
        .unwrap();
    let ids = stored_ids(&out);
    assert!(ids[0] < ids[1], "ids are monotonic");

    let view = outbox.get(ids[0]).unwrap().expect("stored");
    assert_eq!(view.title, "first");
    assert_eq!(view.source, "oms");
    assert_eq!(view.queue_id, q);
    assert_eq!(view.state, EventState::Stored);
    assert_eq!(view.received_at_ms, 1_700_000_000_000);
    assert!(outbox.get(EventId(ids[1].0 + 1_000)).unwrap().is_none());

    let stats = outbox.stats();
    assert_eq!((stats.depth, stats.ready, stats.batched), (2, 2, 0));
    assert_eq!(stats.appended, 2);
    assert!(stats.flushes >= 1);
    assert!(outbox.size_on_disk() > 0);
    let summary = outbox.ready_summary();
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].queue_id, q);
    assert_eq!(summary[0].count, 2);
    // An append leaves a wake-up for the batcher even if it was not waiting.
    tokio::time::timeout(Duration::from_secs(5), outbox.ready_notified())
        .await
        .expect("ready notification kept");
}

#[tokio::test]
async fn event_id_serialises_as_string() {
    assert_eq!(serde_json::to_string(&EventId(42)).unwrap(), "\"42\"");
    let back: EventId = serde_json::from_str("\"18446744073709551615\"").unwrap();
    assert_eq!(back, EventId(u64::MAX));
    assert_eq!("7".parse::<EventId>().unwrap(), EventId(7));
    assert_eq!(EventId(7).to_string(), "7");
}

#[tokio::test]
async fn dedupe_within_call_across_calls_and_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let q = Uuid::new_v4();
    let first_id = {
        let outbox = Outbox::open(cfg(&dir)).await.unwrap();
        let out = outbox
            .append(vec![
                ev(q, Some("kafka:t:0:1"), "a"),
                ev(q, Some("kafka:t:0:2"), "b"),
                ev(q, Some("kafka:t:0:1"), "a again"),
            ])
            .await
            .unwrap();
        let first = out[0].id();
        assert_eq!(out[0], AppendOutcome::Stored(first));
        assert!(matches!(out[1], AppendOutcome::Stored(_)));
        assert_eq!(out[2], AppendOutcome::Duplicate(first));

        let again = outbox
            .append(vec![
                ev(q, Some("kafka:t:0:2"), "b"),
                ev(q, Some("kafka:t:0:3"), "c"),
            ])
            .await
            .unwrap();
        assert_eq!(again[0], AppendOutcome::Duplicate(out[1].id()));
        assert!(matches!(again[1], AppendOutcome::Stored(_)));
        let stats = outbox.stats();
        assert_eq!(stats.appended, 3);
        assert_eq!(stats.duplicates, 2);
        assert_eq!(stats.depth, 3);
        first
    };
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let out = outbox
        .append(vec![ev(
            q,
            Some("kafka:t:0:1"),
            "a, redelivered after restart",
        )])
        .await
        .unwrap();
    assert_eq!(out, vec![AppendOutcome::Duplicate(first_id)]);
    assert_eq!(outbox.depth(), 3);
    assert_eq!(outbox.get(first_id).unwrap().unwrap().title, "a");
}

#[tokio::test]
async fn claim_respects_max_cases_body_size_and_order_per_queue() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let (q1, q2) = (Uuid::new_v4(), Uuid::new_v4());
    let mut q1_ids = Vec::new();
    for i in 0..5 {
        let out = outbox
            .append(vec![
                ev(q1, None, &format!("q1-{i}")),
                ev(q2, None, &format!("q2-{i}")),
            ])
            .await
            .unwrap();
        q1_ids.push(out[0].id());
    }
    assert!(
        outbox
            .claim_batch(Uuid::new_v4(), 10, 1 << 20)
            .await
            .unwrap()
            .is_none()
    );

    let b1 = outbox.claim_batch(q1, 2, 1 << 20).await.unwrap().unwrap();
    assert_eq!(b1.queue_id, q1);
    assert_eq!(b1.event_ids(), q1_ids[..2].to_vec());
    assert_eq!(b1.cases()[0].title, "q1-0");
    assert_eq!(b1.attempts, 0);
    // `<outbox uuid>-<batch id>`: unique per outbox and rebuildable.
    let (outbox_part, batch_part) = b1.idempotency_key.rsplit_once('-').unwrap();
    assert!(
        Uuid::parse_str(outbox_part).is_ok(),
        "{}",
        b1.idempotency_key
    );
    assert_eq!(batch_part, b1.id.to_string());
    assert_eq!(
        outbox.get(q1_ids[0]).unwrap().unwrap().state,
        EventState::Batched { batch_id: b1.id }
    );

    // Body limit: exactly two of the remaining cases fit.
    let two = serde_json::to_vec(&CreateCasesRequest::batch(vec![case("q1-2"), case("q1-3")]))
        .unwrap()
        .len();
    let b2 = outbox.claim_batch(q1, 100, two).await.unwrap().unwrap();
    assert_eq!(b2.event_ids(), q1_ids[2..4].to_vec());
    let body = serde_json::to_vec(&CreateCasesRequest::batch(b2.cases())).unwrap();
    assert!(body.len() <= two);
    assert_ne!(b1.idempotency_key, b2.idempotency_key);

    // An event larger than the limit still comes alone.
    let b3 = outbox.claim_batch(q1, 100, 10).await.unwrap().unwrap();
    assert_eq!(b3.event_ids(), vec![q1_ids[4]]);
    assert!(
        outbox
            .claim_batch(q1, 100, 1 << 20)
            .await
            .unwrap()
            .is_none()
    );

    // The other queue was untouched.
    let summary = outbox.ready_summary();
    assert_eq!(summary.len(), 1);
    assert_eq!((summary[0].queue_id, summary[0].count), (q2, 5));
    let stats = outbox.stats();
    assert_eq!((stats.depth, stats.ready, stats.batched), (10, 5, 5));
    assert!(matches!(
        outbox.claim_batch(q2, 0, 1 << 20).await,
        Err(OutboxError::Invalid(_))
    ));
}

#[tokio::test]
async fn settle_delivered_leaves_tombstone_and_removes_batch() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let q = Uuid::new_v4();
    let ids = stored_ids(
        &outbox
            .append(vec![ev(q, Some("x1"), "one"), ev(q, Some("x2"), "two")])
            .await
            .unwrap(),
    );
    let batch = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
    assert_eq!(outbox.record_attempt(batch.id).unwrap(), 1);
    assert_eq!(outbox.record_attempt(batch.id).unwrap(), 2);

    let case_ids = [Uuid::new_v4(), Uuid::new_v4()];
    assert!(matches!(
        outbox.settle_delivered(&batch, &case_ids[..1]).await,
        Err(OutboxError::Invalid(_))
    ));
    outbox.settle_delivered(&batch, &case_ids).await.unwrap();
    for (id, case_id) in ids.iter().zip(case_ids) {
        match outbox.get(*id).unwrap().unwrap().state {
            EventState::Delivered { case_id: got, .. } => assert_eq!(got, case_id),
            other => panic!("expected delivered, got {other:?}"),
        }
    }
    assert_eq!(outbox.depth(), 0);
    assert!(outbox.unsettled_batches().unwrap().is_empty());
    // Settling twice is refused: the batch record is gone.
    assert!(matches!(
        outbox.settle_delivered(&batch, &case_ids).await,
        Err(OutboxError::UnknownBatch(id)) if id == batch.id
    ));
    assert!(matches!(
        outbox.record_attempt(batch.id),
        Err(OutboxError::UnknownBatch(_))
    ));
    // The identity is still remembered after delivery.
    let again = outbox.append(vec![ev(q, Some("x1"), "one")]).await.unwrap();
    assert_eq!(again, vec![AppendOutcome::Duplicate(ids[0])]);
}

#[tokio::test]
async fn split_then_reject_moves_event_to_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let q = Uuid::new_v4();
    let ids = stored_ids(
        &outbox
            .append((0..3).map(|i| ev(q, None, &format!("c{i}"))).collect())
            .await
            .unwrap(),
    );
    let batch = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
    let (a, b) = outbox.split_batch(&batch).await.unwrap();
    assert_eq!(a.event_ids(), ids[..2].to_vec());
    assert_eq!(b.event_ids(), ids[2..].to_vec());
    assert_ne!(a.idempotency_key, batch.idempotency_key);
    assert_ne!(b.idempotency_key, batch.idempotency_key);
    assert_ne!(a.idempotency_key, b.idempotency_key);
    assert_eq!(
        outbox.get(ids[2]).unwrap().unwrap().state,
        EventState::Batched { batch_id: b.id }
    );
    let mut unsettled: Vec<u64> = outbox
        .unsettled_batches()
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    unsettled.sort_unstable();
    assert_eq!(unsettled, vec![a.id, b.id]);
    // The old batch is gone.
    assert!(matches!(
        outbox.split_batch(&batch).await,
        Err(OutboxError::UnknownBatch(_))
    ));

    // Single-event batches cannot be split; multi-event ones cannot be rejected.
    assert!(matches!(
        outbox.split_batch(&b).await,
        Err(OutboxError::Invalid(_))
    ));
    assert!(matches!(
        outbox.reject(&a, 400, "bad_request", "nope").await,
        Err(OutboxError::Invalid(_))
    ));

    outbox
        .reject(&b, 400, "validation_error", "title too long")
        .await
        .unwrap();
    assert_eq!(
        outbox.get(ids[2]).unwrap().unwrap().state,
        EventState::Rejected {
            status: 400,
            error: "validation_error".into(),
            message: "title too long".into()
        }
    );
    let dead = outbox.dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, ids[2]);
    assert_eq!(dead[0].case, case("c2"));
    assert_eq!(dead[0].queue_id, q);
    assert_eq!(dead[0].source, "oms");
    assert_eq!(
        (dead[0].status, dead[0].message.as_str()),
        (400, "title too long")
    );
    assert_eq!(outbox.depth(), 2);
    let stats = outbox.stats();
    assert_eq!((stats.ready, stats.batched), (0, 2));
}

#[tokio::test]
async fn reopen_recovers_ready_events_and_unsettled_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (q1, q2) = (Uuid::new_v4(), Uuid::new_v4());
    let (batch, ready_ids) = {
        let outbox = Outbox::open(cfg(&dir)).await.unwrap();
        outbox
            .append((0..4).map(|i| ev(q1, None, &format!("a{i}"))).collect())
            .await
            .unwrap();
        let ready = outbox
            .append(vec![ev(q2, None, "b0"), ev(q2, None, "b1")])
            .await
            .unwrap();
        let batch = outbox.claim_batch(q1, 3, 1 << 20).await.unwrap().unwrap();
        outbox.record_attempt(batch.id).unwrap();
        outbox.flush().await.unwrap();
        (batch, stored_ids(&ready))
    };

    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let stats = outbox.stats();
    assert_eq!((stats.depth, stats.ready, stats.batched), (6, 3, 3));
    let unsettled = outbox.unsettled_batches().unwrap();
    assert_eq!(unsettled.len(), 1);
    let got = &unsettled[0];
    assert_eq!(got.id, batch.id);
    assert_eq!(got.idempotency_key, batch.idempotency_key);
    assert_eq!(got.events, batch.events);
    assert_eq!(got.attempts, 1);

    let mut summary = outbox.ready_summary();
    summary.sort_by_key(|s| s.count);
    assert_eq!(
        summary
            .iter()
            .map(|s| (s.queue_id, s.count))
            .collect::<Vec<_>>(),
        vec![(q1, 1), (q2, 2)]
    );
    let b = outbox.claim_batch(q2, 100, 1 << 20).await.unwrap().unwrap();
    assert_eq!(b.event_ids(), ready_ids);
    // Recovered batches settle normally.
    outbox
        .settle_delivered(got, &[Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()])
        .await
        .unwrap();
    assert_eq!(outbox.depth(), 3);
}

#[tokio::test]
async fn checksum_corruption_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let q = Uuid::new_v4();
    let ids = {
        let outbox = Outbox::open(cfg(&dir)).await.unwrap();
        stored_ids(
            &outbox
                .append(vec![
                    ev(q, None, "good"),
                    ev(q, None, "doomed"),
                    ev(q, None, "fine"),
                ])
                .await
                .unwrap(),
        )
    };
    {
        let db = duvo_bridge::outbox::open_raw(&dir.path().join("outbox")).unwrap();
        let tree = db.open_tree(EVENTS_TREE).unwrap();
        let key = event_key(ids[1].0);
        let mut raw = tree.get(key).unwrap().unwrap().to_vec();
        let at = raw.len() - 3;
        raw[at] ^= 0x5a;
        tree.insert(key, raw).unwrap();
        db.flush().unwrap();
    }
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    // Found during recovery: counted, left out of the index, not fatal.
    assert_eq!(outbox.stats().corrupt, 1);
    assert_eq!(outbox.stats().ready, 2);
    match outbox.get(ids[1]) {
        Err(OutboxError::Corrupt { key, reason }) => {
            assert_eq!(key, format!("events/e/{}", ids[1]));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(outbox.stats().corrupt, 2);
    assert_eq!(outbox.get(ids[0]).unwrap().unwrap().title, "good");
    let batch = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
    assert_eq!(batch.event_ids(), vec![ids[0], ids[2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let q = Uuid::new_v4();
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let outbox = outbox.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let id = format!("task-{i}");
            outbox.append(vec![ev(q, Some(&id), &id)]).await.unwrap()[0].id()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let stats = outbox.stats();
    assert_eq!(stats.appended, 50);
    assert!(
        stats.flushes < 50,
        "group commit: {} flushes for 50 appends",
        stats.flushes
    );
    drop(outbox);

    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    assert_eq!(outbox.depth(), 50);
    for id in ids {
        assert!(outbox.get(id).unwrap().is_some());
    }
}

#[tokio::test]
async fn high_water_has_hysteresis() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir);
    c.high_water_events = 4;
    c.low_water_events = 2;
    let outbox = Outbox::open(c).await.unwrap();
    let q = Uuid::new_v4();
    outbox
        .append((0..4).map(|i| ev(q, None, &format!("{i}"))).collect())
        .await
        .unwrap();
    assert!(!outbox.over_high_water(), "4 is not above 4");
    outbox.append(vec![ev(q, None, "5")]).await.unwrap();
    assert!(outbox.over_high_water());

    // Deliver one at a time: stays over until depth < 2.
    let mut depth_when_cleared = None;
    while let Some(b) = outbox.claim_batch(q, 1, 1 << 20).await.unwrap() {
        outbox
            .settle_delivered(&b, &[Uuid::new_v4()])
            .await
            .unwrap();
        if !outbox.over_high_water() && depth_when_cleared.is_none() {
            depth_when_cleared = Some(outbox.depth());
        }
        if depth_when_cleared.is_none() {
            assert!(outbox.depth() >= 2);
        }
    }
    assert_eq!(depth_when_cleared, Some(1));

    // Bytes high water trips on its own.
    let dir2 = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir2);
    c.high_water_bytes = 1;
    let outbox = Outbox::open(c).await.unwrap();
    outbox.append(vec![ev(q, None, "x")]).await.unwrap();
    assert!(outbox.size_on_disk() > 1);
    assert!(outbox.over_high_water());
}

#[tokio::test]
async fn purge_expired_removes_old_tombstones_and_identities() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir);
    c.retention = Duration::from_secs(3600);
    let outbox = Outbox::open(c).await.unwrap();
    let q = Uuid::new_v4();
    let ids = stored_ids(
        &outbox
            .append(vec![
                ev(q, Some("p1"), "one"),
                ev(q, Some("p2"), "two"),
                ev(q, Some("p3"), "three"),
            ])
            .await
            .unwrap(),
    );
    let b = outbox.claim_batch(q, 2, 1 << 20).await.unwrap().unwrap();
    let (b1, b2) = outbox.split_batch(&b).await.unwrap();
    outbox
        .settle_delivered(&b1, &[Uuid::new_v4()])
        .await
        .unwrap();
    outbox
        .reject(&b2, 413, "payload_too_large", "too big")
        .await
        .unwrap();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(outbox.purge_expired(now).unwrap(), 0, "within retention");
    assert_eq!(outbox.purge_expired(now + 3_600_000 + 1_000).unwrap(), 2);
    assert!(outbox.get(ids[0]).unwrap().is_none());
    assert!(outbox.get(ids[1]).unwrap().is_none());
    // The pending event is untouched, the dead letter stays.
    assert_eq!(
        outbox.get(ids[2]).unwrap().unwrap().state,
        EventState::Stored
    );
    assert_eq!(outbox.dead_letters().unwrap().len(), 1);
    // Identities are forgotten with their tombstones: a redelivery is new.
    let again = outbox
        .append(vec![ev(q, Some("p1"), "one"), ev(q, Some("p3"), "three")])
        .await
        .unwrap();
    assert!(matches!(again[0], AppendOutcome::Stored(id) if id != ids[0]));
    assert_eq!(again[1], AppendOutcome::Duplicate(ids[2]));
    assert_eq!(outbox.purge_expired(now + 3_600_000 + 2_000).unwrap(), 0);
}

/// Run by `lock_is_released_when_a_process_dies` in a child process: append
/// one event, print its id, and die without running any destructor.
#[tokio::test]
async fn crash_child_helper() {
    let Ok(path) = std::env::var("DUVO_OUTBOX_CRASH_CHILD_PATH") else {
        return;
    };
    let mut c = OutboxConfig::new(path);
    c.cache_capacity_bytes = 16 * 1024 * 1024;
    let outbox = Outbox::open(c).await.unwrap();
    let out = outbox
        .append(vec![ev(Uuid::nil(), Some("child"), "from the child")])
        .await
        .unwrap();
    println!("CHILD_EVENT_ID={}", out[0].id());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    std::process::abort();
}

#[tokio::test]
async fn lock_is_released_when_a_process_dies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DUVO_OUTBOX_CRASH_CHILD_PATH", &path)
        .output()
        .unwrap();
    assert!(!output.status.success(), "child must die abruptly");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let id: EventId = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD_EVENT_ID=").map(|(_, id)| id))
        .unwrap_or_else(|| panic!("child printed no id: {stdout}"))
        .trim()
        .parse()
        .unwrap();
    let outbox = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
    let view = outbox
        .get(id)
        .unwrap()
        .expect("acknowledged event survived the crash");
    assert_eq!(view.title, "from the child");
    assert_eq!(outbox.depth(), 1);
}

/// A start with a backlog: `open` returns before the stored events are
/// loaded; they are offered oldest first as the load reaches them, events
/// appended meanwhile come after every one of them, a batch split while the
/// load goes on is not mistaken for an orphan, and when the load ends every
/// event has been offered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_load_offers_every_stored_event_oldest_first_and_new_ones_after() {
    let dir = tempfile::tempdir().unwrap();
    let q = Uuid::new_v4();
    const STORED: usize = 30_000;
    let resumed = {
        let outbox = Outbox::open(cfg(&dir)).await.unwrap();
        for chunk in 0..STORED / 1000 {
            let evs = (0..1000)
                .map(|i| ev(q, None, &format!("old {}", chunk * 1000 + i)))
                .collect();
            outbox.append(evs).await.unwrap();
        }
        // Two batches in flight at the "crash": events 0..200.
        let a = outbox
            .claim_batch(q, 100, usize::MAX)
            .await
            .unwrap()
            .unwrap();
        let b = outbox
            .claim_batch(q, 100, usize::MAX)
            .await
            .unwrap()
            .unwrap();
        outbox.flush().await.unwrap();
        vec![a.id, b.id]
    };
    let mut c = cfg(&dir);
    c.background_load = true;
    let outbox = Outbox::open(c).await.unwrap();
    // Intake at once: these must wait behind every stored event.
    let fresh = stored_ids(
        &outbox
            .append((0..50).map(|i| ev(q, None, &format!("new {i}"))).collect())
            .await
            .unwrap(),
    );
    // A resumed batch split while the load goes on (as after a partial
    // reconciliation): its events stay batched, not made ready again.
    let unsettled = outbox.unsettled_batches().unwrap();
    assert_eq!(
        unsettled.iter().map(|b| b.id).collect::<Vec<_>>(),
        resumed,
        "persisted batches are known at once"
    );
    let (h1, h2) = outbox.split_batch(&unsettled[1]).await.unwrap();

    let mut offered: Vec<u64> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match outbox.claim_batch(q, 100, usize::MAX).await.unwrap() {
            Some(b) => offered.extend(b.events.iter().map(|(id, _)| id.0)),
            None if !outbox.is_loading() && outbox.ready_summary().is_empty() => break,
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
        assert!(std::time::Instant::now() < deadline, "load never ended");
    }
    outbox.loaded().await;
    assert!(
        offered.windows(2).all(|w| w[0] < w[1]),
        "offered oldest first, each once"
    );
    assert_eq!(offered.len(), STORED - 200 + 50);
    assert_eq!(
        &offered[offered.len() - 50..],
        &fresh.iter().map(|e| e.0).collect::<Vec<_>>()[..]
    );
    let split: std::collections::HashSet<u64> = h1
        .events
        .iter()
        .chain(&h2.events)
        .map(|(id, _)| id.0)
        .collect();
    assert!(
        offered.iter().all(|id| !split.contains(id)),
        "a split batch's events were offered again"
    );
    let s = outbox.stats();
    assert_eq!(s.ready, 0);
    assert_eq!(s.batched as usize, STORED + 50, "every event is in a batch");
}

/// A second opener of a directory whose outbox is open is refused by name
/// (not taken for damage), after waiting out a lock that is only being let
/// go of.
#[tokio::test]
async fn an_outbox_in_use_is_refused_as_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Outbox::open(cfg(&dir)).await.unwrap();
    match Outbox::open(cfg(&dir)).await {
        Err(OutboxError::InUse { path }) => assert_eq!(path, dir.path().join("outbox")),
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("opened twice"),
    }
}
