//! Compaction: the outbox copies its records into a fresh database and
//! switches to it while it runs, giving disk back; nothing it held is lost
//! or changed, ids keep growing, and a crash at any point leaves one
//! complete generation current.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use duvo_bridge::duvo::NewCase;
use duvo_bridge::outbox::compact::{current_generation, generation_dir};
use duvo_bridge::outbox::{AppendOutcome, EventId, EventState, NewEvent, Outbox, OutboxConfig};
use uuid::Uuid;

fn cfg(dir: &tempfile::TempDir) -> OutboxConfig {
    let mut cfg = OutboxConfig::new(dir.path().join("outbox"));
    cfg.compact_min_bytes = 0; // only when the test asks
    cfg
}

fn ev(queue_id: Uuid, identity: String) -> NewEvent {
    NewEvent {
        source: "oms".to_string(),
        case: NewCase {
            title: format!("Order {identity}"),
            data: Some(format!(
                "{{\"order\":\"{identity}\",\"pad\":\"{}\"}}",
                "x".repeat(400)
            )),
            labels: Vec::new(),
            priority: None,
        },
        identity: Some(identity),
        queue_id,
        received_at_ms: 1_700_000_000_000,
        origin: None,
    }
}

/// Append `n` events with identities `{prefix}-{i}` in requests of 200;
/// their ids by identity.
async fn append(outbox: &Outbox, q: Uuid, prefix: &str, n: usize) -> HashMap<String, EventId> {
    let mut ids = HashMap::new();
    for start in (0..n).step_by(200) {
        let idents: Vec<String> = (start..(start + 200).min(n))
            .map(|i| format!("{prefix}-{i}"))
            .collect();
        let events = idents.iter().map(|i| ev(q, i.clone())).collect();
        for (ident, out) in idents.into_iter().zip(outbox.append(events).await.unwrap()) {
            let AppendOutcome::Stored(id) = out else {
                panic!("{ident} was a duplicate")
            };
            ids.insert(ident, id);
        }
    }
    ids
}

/// Claim and settle everything waiting in `q` (the cases "created").
async fn deliver_all(outbox: &Outbox, q: Uuid) -> usize {
    let mut n = 0;
    while let Some(batch) = outbox.claim_batch(q, 100, 1 << 20).await.unwrap() {
        let cases: Vec<Uuid> = batch.events.iter().map(|_| Uuid::new_v4()).collect();
        outbox.settle_delivered(&batch, &cases).await.unwrap();
        n += cases.len();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_every_record_gives_disk_back_and_ids_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let q = Uuid::new_v4();
    let delivered = append(&outbox, q, "done", 20_000).await;
    assert_eq!(deliver_all(&outbox, q).await, 20_000);
    let waiting = append(&outbox, q, "wait", 300).await;
    let max_id = delivered
        .values()
        .chain(waiting.values())
        .map(|i| i.0)
        .max()
        .unwrap();

    let ob = outbox.clone();
    let done = tokio::task::spawn_blocking(move || ob.compact())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.generation, 1);
    assert!(
        done.bytes_after * 2 < done.bytes_before,
        "no disk given back: {done:?}"
    );
    let root = dir.path().join("outbox");
    assert_eq!(current_generation(&root).unwrap(), 1);
    // Given back for real: no descriptor left on the deleted files. (A
    // write sled handed to its IO thread before the switch may hold the
    // old file for a moment after the last handle went.)
    let held = || -> Vec<String> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .filter(|p| p.starts_with(&root.display().to_string()) && p.ends_with("(deleted)"))
            .collect()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !held().is_empty() && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(held().is_empty(), "deleted files still open: {:?}", held());
    assert!(
        !root.join("db").exists(),
        "generation 0's file is still there"
    );
    assert!(generation_dir(&root, 1).join("db").exists());

    // Everything is still there, as it was; dedupe still answers.
    for (ident, id) in delivered.iter().take(500) {
        let e = outbox.get(*id).unwrap().unwrap();
        assert!(
            matches!(e.state, EventState::Delivered { .. }),
            "{ident}: {:?}",
            e.state
        );
    }
    let again = outbox.append(vec![ev(q, "done-7".into())]).await.unwrap();
    assert_eq!(again, vec![AppendOutcome::Duplicate(delivered["done-7"])]);
    // New ids continue above every old one (sled's counter restarts in a copy).
    let fresh = append(&outbox, q, "new", 10).await;
    assert!(
        fresh.values().all(|i| i.0 > max_id),
        "{fresh:?} vs {max_id}"
    );
    assert_eq!(outbox.depth(), 310);
    assert_eq!(deliver_all(&outbox, q).await, 310);

    // A second compaction, then a reopen: generation 2, all there.
    let ob = outbox.clone();
    let done = tokio::task::spawn_blocking(move || ob.compact())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.generation, 2);
    drop(outbox);
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    assert!(!generation_dir(&root, 1).exists());
    for id in delivered
        .values()
        .chain(waiting.values())
        .chain(fresh.values())
    {
        assert!(outbox.get(*id).unwrap().is_some(), "event {id} lost");
    }
    let newer = append(&outbox, q, "newer", 1).await;
    assert!(newer.values().all(|i| fresh.values().all(|f| i.0 > f.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_during_a_compaction_are_all_in_the_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    let q = Uuid::new_v4();
    append(&outbox, q, "old", 20_000).await;
    assert_eq!(deliver_all(&outbox, q).await, 20_000);

    // Writers append and deliver (which rewrites existing records) the
    // whole time the compaction copies.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (outbox, stop) = (outbox.clone(), stop.clone());
        let q = if w == 0 { q } else { Uuid::new_v4() };
        writers.push(tokio::spawn(async move {
            let mut acked = HashMap::new();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) || round < 3 {
                acked.extend(append(&outbox, q, &format!("w{w}-{round}"), 200).await);
                if round % 2 == 1 {
                    deliver_all(&outbox, q).await;
                }
                round += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let ob = outbox.clone();
    let done = tokio::task::spawn_blocking(move || ob.compact())
        .await
        .unwrap()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashMap::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(done.recopied > 0, "no write met the copy: {done:?}");
    // What was acknowledged is in the current generation, and after a reopen.
    let states = |outbox: &Outbox| {
        acked
            .values()
            .map(|id| match outbox.get(*id).unwrap() {
                Some(e) => matches!(e.state, EventState::Delivered { .. }),
                None => panic!("acknowledged event {id} lost"),
            })
            .filter(|d| *d)
            .count()
    };
    let delivered_before = states(&outbox);
    let depth = outbox.depth();
    assert_eq!(delivered_before as u64 + depth, acked.len() as u64);
    drop(outbox);
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    assert_eq!(states(&outbox), delivered_before);
    assert_eq!(outbox.depth(), depth);
}

#[tokio::test]
async fn a_crash_leaves_one_whole_generation_and_open_clears_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("outbox");
    let q = Uuid::new_v4();
    let ids = {
        let outbox = Outbox::open(cfg(&dir)).await.unwrap();
        append(&outbox, q, "a", 400).await
    };
    // A copy a crash left half made (the marker still names generation 0).
    std::fs::create_dir_all(generation_dir(&root, 1)).unwrap();
    std::fs::write(generation_dir(&root, 1).join("db"), b"half a copy").unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    assert!(
        !generation_dir(&root, 1).exists(),
        "the half copy is still there"
    );
    assert_eq!(outbox.depth(), 400);
    // Switched, then killed before the old files were deleted: they go at
    // the next open, and the new generation is what opens.
    let ob = outbox.clone();
    tokio::task::spawn_blocking(move || ob.compact())
        .await
        .unwrap()
        .unwrap();
    drop(outbox);
    std::fs::write(root.join("db"), b"left behind").unwrap();
    std::fs::write(root.join("conf"), b"left behind").unwrap();
    let outbox = Outbox::open(cfg(&dir)).await.unwrap();
    assert!(!root.join("db").exists() && !root.join("conf").exists());
    assert_eq!(outbox.depth(), 400);
    for id in ids.values() {
        assert!(outbox.get(*id).unwrap().is_some());
    }
    // A generation the marker names but that is gone is lost data, refused.
    drop(outbox);
    std::fs::remove_dir_all(generation_dir(&root, 1)).unwrap();
    match Outbox::open(cfg(&dir)).await {
        Err(duvo_bridge::outbox::OutboxError::DataLost { .. }) => {}
        Err(e) => panic!("expected DataLost, got {e}"),
        Ok(_) => panic!("an outbox whose generation is gone opened"),
    }
}
