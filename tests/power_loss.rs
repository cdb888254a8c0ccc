//! Power cuts: the outbox on a filesystem that forgets every write not
//! covered by an fsync (`tests/powerfs`, FUSE, served by this process).
//! SIGKILL tests cannot see a missing fsync: the kernel's page cache
//! survives a killed process, not a power cut.
//!
//! Needs /dev/fuse and the right to mount (root, or Debian's fusermount3).

mod common;
mod kafka_util;
mod powerfs;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use duvo_bridge::outbox::{NewEvent, Outbox, OutboxConfig, OutboxError};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use serde_json::json;

fn mount() -> (tempfile::TempDir, powerfs::Mounted) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = powerfs::PowerFs::mount(&mnt).expect("mount the power-loss filesystem (/dev/fuse)");
    (dir, m)
}

#[test]
fn the_filesystem_keeps_exactly_what_was_fsynced() {
    let (dir, m) = mount();
    let mnt = dir.path().join("mnt");
    // A synced file in a synced directory survives; its unsynced tail not.
    let mut f = std::fs::File::create(mnt.join("a")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
    f.write_all(b" and lost").unwrap();
    // A synced file whose directory entry was never synced is gone.
    let mut g = std::fs::File::create(mnt.join("b")).unwrap();
    g.write_all(b"orphan").unwrap();
    g.sync_all().unwrap();
    f.write_at(b"D", 0).unwrap();
    drop((f, g));
    assert_eq!(std::fs::read(mnt.join("a")).unwrap(), b"Durable and lost");
    assert!(m.fs.cut() > 0, "the cut dropped something");
    let mut back = String::new();
    std::fs::File::open(mnt.join("a"))
        .unwrap()
        .read_to_string(&mut back)
        .unwrap();
    assert_eq!(back, "durable");
    assert!(!mnt.join("b").exists(), "an entry never synced is gone");
}

/// What the bridge used to rely on: sled's `flush()` alone. On this
/// filesystem (as on a disk after a power cut) it keeps nothing, which is
/// what makes the tests below able to fail.
#[test]
fn sled_flush_alone_is_not_durable() {
    let (dir, m) = mount();
    let path = dir.path().join("mnt").join("bare");
    {
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()
            .unwrap();
        for i in 0u32..2000 {
            db.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
            if i % 100 == 99 {
                db.flush().unwrap();
            }
        }
    }
    m.fs.cut();
    let db = duvo_bridge::outbox::open_raw(&path).unwrap();
    let kept = db.len();
    eprintln!("sled kept {kept} of 2000 records after the cut");
    assert!(kept < 2000, "sled's flush is not an fsync: {kept} kept");
}

fn ev(i: usize, q: uuid::Uuid) -> NewEvent {
    NewEvent {
        source: "power".into(),
        identity: Some(format!("power:{i}")),
        queue_id: q,
        case: duvo_bridge::duvo::NewCase {
            title: format!("Order {i}"),
            data: Some(json!({ "order_id": format!("ORD-{i:06}") }).to_string()),
            labels: Vec::new(),
            priority: None,
        },
        received_at_ms: 1_700_000_000_000,
        origin: None,
    }
}

fn outbox_cfg(path: &std::path::Path) -> OutboxConfig {
    OutboxConfig::new(path)
}

/// Remove the database from an outbox directory and keep its marker: what
/// a cut left of an outbox before the fsync, or a wiped database.
fn remove_all_but_the_marker(outbox: &std::path::Path) {
    for entry in std::fs::read_dir(outbox).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap() == duvo_bridge::outbox::durable::MARKER_FILE {
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// An outbox whose database was lost (here: its files removed, as a cut
/// before this fix left them empty) is refused, with a message naming the
/// path, unless the loss is accepted; it is never silently started empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_lost_its_data_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let q = uuid::Uuid::new_v4();
    {
        let outbox = Outbox::open(outbox_cfg(&path)).await.unwrap();
        outbox
            .append((0..10).map(|i| ev(i, q)).collect())
            .await
            .unwrap();
        // Long enough for the marker to be rewritten with a later sequence.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        outbox.append(vec![ev(10, q)]).await.unwrap();
    }
    remove_all_but_the_marker(&path);
    let err = Outbox::open(outbox_cfg(&path)).await.unwrap_err();
    assert!(matches!(err, OutboxError::DataLost { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("opened empty"), "{msg}");
    assert!(msg.contains("--accept-outbox-loss"), "{msg}");

    let mut cfg = outbox_cfg(&path);
    cfg.accept_data_loss = true;
    let outbox = Outbox::open(cfg).await.unwrap();
    assert_eq!(outbox.depth(), 0);
    outbox.append(vec![ev(11, q)]).await.unwrap();
    drop(outbox);
    // Accepted once: the next start is normal again.
    let outbox = Outbox::open(outbox_cfg(&path)).await.unwrap();
    assert_eq!(outbox.depth(), 1);
}

/// A database replaced by another outbox's (a swapped volume) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_swapped_under_its_marker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    drop(Outbox::open(outbox_cfg(&a)).await.unwrap());
    drop(Outbox::open(outbox_cfg(&b)).await.unwrap());
    std::fs::copy(
        a.join(duvo_bridge::outbox::durable::MARKER_FILE),
        b.join(duvo_bridge::outbox::durable::MARKER_FILE),
    )
    .unwrap();
    let err = Outbox::open(outbox_cfg(&b)).await.unwrap_err();
    assert!(
        err.to_string().contains("but the marker names outbox"),
        "{err}"
    );
}

/// The bridge binary with an HTTP, an AMQP and a Kafka source appending at
/// once, its outbox on the power-loss filesystem: SIGKILL, cut the power,
/// restart, six times. Every event acknowledged (202, a broker ack, a
/// committed offset) becomes exactly one case; the brokers redeliver what
/// was never acknowledged, so every message and record does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_power_cuts_while_every_source_appends_lose_nothing_acknowledged() {
    let mut rng = seeded_rng();
    const HTTP_CHUNKS: usize = 240;
    const HTTP_POSTERS: usize = 4;
    const PER_CHUNK: usize = 50;
    const AMQP_N: usize = 3000;
    const KAFKA_N: usize = 3000;

    let (dir, m) = mount();
    let mnt = dir.path().join("mnt");
    let bs = kafka_util::apache_kafka().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("power-{suffix}");
    kafka_util::create_topics(&bs, &[(&topic, 3)], 1).await;
    let queue = format!("duvo-test-power-{suffix}");
    let amqp_uri = "amqp://guest:guest@127.0.0.1:5672/%2f";

    let mut sc = sim_config();
    sc.rate_limit = 1200;
    let sim = start_sim(sc).await;
    let q = sim.queues()[0];
    let http = free_port();
    let admin = free_port();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        bridge_toml(
            &sim,
            &mnt,
            admin,
            1200,
            &format!(
                r#"
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http}"
queue_id = "{q}"
title = "Order {{/order_id}}"

[[sources]]
type = "amqp"
name = "rabbit"
uri = "{amqp_uri}"
queue = "{queue}"
declare = true
prefetch = 100
queue_id = "{q}"
title = "Order {{/order_id}}"

[[sources]]
type = "kafka"
name = "orders"
brokers = "{bs}"
group_id = "g-power-{suffix}"
group_instance_id = "replica-1"
topics = ["{topic}"]
queue_id = "{q}"
title = "Order {{/order_id}}"
max_batch = 200
[sources.librdkafka]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"auto.commit.interval.ms" = 200
"#
            ),
        ),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let mut bridge = spawn_bridge(&config, &key, &log);
    assert!(wait_ready(admin).await, "bridge ready");

    // Producers: HTTP chunks retried until 202, AMQP with publisher
    // confirms, Kafka with acks=all, all paced over a few seconds.
    // Several posters at once, without pauses: the outbox is mid-write
    // (between a write and its fsync) at most SIGKILLs.
    let posters: Vec<_> = (0..HTTP_POSTERS)
        .map(|p| {
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                for c in (p..HTTP_CHUNKS).step_by(HTTP_POSTERS) {
                    let body: Vec<_> = (0..PER_CHUNK)
                        .map(|j| json!({ "order_id": format!("H-{c}-{j}") }))
                        .collect();
                    post_until_accepted(&client, http, &format!("power-{c}"), &json!(body)).await;
                }
            })
        })
        .collect();
    let amqp_queue = queue.clone();
    let publisher = tokio::spawn(async move {
        let conn = Connection::connect(amqp_uri, ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The source declares the queue (with its dead-letter arguments):
        // publish only once it exists, or the first messages are returned.
        for _ in 0..200 {
            let probe = conn.create_channel().await.unwrap();
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            if probe
                .queue_declare(amqp_queue.as_str().into(), passive, Default::default())
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in 0..AMQP_N {
            let body = json!({ "order_id": format!("A-{i}") }).to_string();
            let props = BasicProperties::default()
                .with_message_id(format!("a-{i}").into())
                .with_delivery_mode(2);
            let confirm = ch
                .basic_publish(
                    "".into(),
                    amqp_queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack(), "message {i} confirmed: {confirm:?}");
            assert!(
                confirm.take_message().is_none(),
                "message {i} routed to {amqp_queue}"
            );
        }
        conn
    });
    let kbs = bs.clone();
    let ktopic = topic.clone();
    let kproducer = tokio::spawn(async move {
        let p = kafka_util::producer(&kbs);
        for c in 0..30 {
            let recs: Vec<kafka_util::Rec> = (c * KAFKA_N / 30..(c + 1) * KAFKA_N / 30)
                .map(|i| {
                    kafka_util::Rec::json(
                        &format!("k-{i}"),
                        &json!({ "order_id": format!("K-{i}") }),
                    )
                })
                .collect();
            kafka_util::produce(&p, &ktopic, &recs).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });

    let mut dropped = Vec::new();
    for cut in 1..=6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        bridge.kill().unwrap(); // SIGKILL
        bridge.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        dropped.push(m.fs.cut());
        eprintln!(
            "cut #{cut}: dropped {} unsynced pages/entries; {} cases so far",
            dropped.last().unwrap(),
            sim.stats().cases_created
        );
        bridge = spawn_bridge(&config, &key, &log);
        let ready = wait_ready(admin).await;
        if !ready {
            let _ = bridge.kill();
            panic!(
                "bridge ready after cut #{cut}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    for p in posters {
        p.await.unwrap();
    }
    let conn = publisher.await.unwrap();
    kproducer.await.unwrap();
    let total = HTTP_CHUNKS * PER_CHUNK + AMQP_N + KAFKA_N;
    let done = wait_until(Duration::from_secs(180), || async {
        sim.stats().cases_created as usize >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_signal(&bridge, "TERM");
    bridge.wait().unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;

    let per = cases_per_order(&sim);
    let mut expected: Vec<String> = Vec::new();
    for c in 0..HTTP_CHUNKS {
        expected.extend((0..PER_CHUNK).map(|j| format!("H-{c}-{j}")));
    }
    expected.extend((0..AMQP_N).map(|i| format!("A-{i}")));
    expected.extend((0..KAFKA_N).map(|i| format!("K-{i}")));
    let count = Count::of(&per, expected);
    eprintln!(
        "cases={} expected={total} missing={} duplicates={} dropped per cut {dropped:?} {:?}",
        per.values().sum::<usize>(),
        count.missing.len(),
        count.dups.len(),
        m.fs.stats()
    );
    if !done || !count.missing.is_empty() {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    count.assert_each_once(&per, total);
}

/// What became of the orders a test produced, counted on the simulator.
struct Count {
    /// Orders that never became a case.
    missing: Vec<String>,
    /// Orders that became more than one case, with how many.
    dups: Vec<(String, usize)>,
}

impl Count {
    fn of(per: &HashMap<String, usize>, expected: impl IntoIterator<Item = String>) -> Count {
        Count {
            missing: expected
                .into_iter()
                .filter(|k| !per.contains_key(k))
                .collect(),
            dups: per
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
        }
    }

    /// Nothing lost, nothing duplicated, nothing else a case.
    fn assert_each_once(&self, per: &HashMap<String, usize>, total: usize) {
        let missing = &self.missing;
        assert!(
            missing.is_empty(),
            "lost: {} e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        assert!(self.dups.is_empty(), "duplicated: {:?}", self.dups);
        assert_eq!(per.len(), total, "nothing else became a case");
    }
}

/// From outside: the binary refuses an outbox that lost its data with exit
/// status 65 and a message naming the path, and starts with
/// `--accept-outbox-loss`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_a_lost_outbox_with_exit_65_until_the_loss_is_accepted() {
    let sim = start_sim(sim_config()).await;
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (free_port(), free_port());
    let config = write_binary_config(
        dir.path(),
        &sim.base_url(),
        sim.queues()[0],
        http,
        admin,
        "api_key_env = \"DUVO_API_KEY\"",
        "",
    );
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let mut bridge = spawn_bridge(&config, &key, &log);
    assert!(wait_ready(admin).await, "bridge ready");
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .json(&json!([{ "order_id": "ORD-1" }, { "order_id": "ORD-2" }]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Past the marker's rewrite interval, then stopped cleanly.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let _ = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .json(&json!({ "order_id": "ORD-3" }))
        .send()
        .await
        .unwrap();
    send_signal(&bridge, "TERM");
    bridge.wait().unwrap();

    let outbox = dir.path().join("outbox");
    remove_all_but_the_marker(&outbox);
    let (cfg2, key2) = (config.clone(), key.clone());
    let refused = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
            .args(["run", "--config"])
            .arg(&cfg2)
            .env("DUVO_API_KEY", &key2)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(30), refused)
        .await
        .expect("the bridge exits instead of starting")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains(&outbox.display().to_string()), "{stderr}");
    assert!(stderr.contains("--accept-outbox-loss"), "{stderr}");

    let mut accepted = std::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
        .args(["run", "--accept-outbox-loss", "--config"])
        .arg(&config)
        .env("DUVO_API_KEY", &key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_ready(admin).await, "starts once the loss is accepted");
    send_signal(&accepted, "TERM");
    accepted.wait().unwrap();
}

/// `duvo-bridge outbox verify` names a damaged record (exit 1) and says
/// OK on a sound outbox (exit 0); a database sled cannot open at all is
/// refused by `run` (exit 65, naming the path and the verify command) and
/// reported by `verify` (exit 2): never started empty in its place.
#[tokio::test]
async fn damage_is_named_by_verify_and_an_unopenable_outbox_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let q = uuid::Uuid::new_v4();
    {
        let o = duvo_bridge::outbox::Outbox::open(duvo_bridge::outbox::OutboxConfig::new(
            outbox.clone(),
        ))
        .await
        .unwrap();
        let events = (0..20)
            .map(|i| duvo_bridge::outbox::NewEvent {
                source: "oms".into(),
                identity: Some(format!("oms:{i}")),
                queue_id: q,
                case: duvo_bridge::duvo::NewCase {
                    title: format!("Order {i}"),
                    data: Some(format!("{{\"order_id\":{i}}}")),
                    labels: vec![],
                    priority: None,
                },
                received_at_ms: 1,
                origin: None,
            })
            .collect();
        o.append(events).await.unwrap();
        o.claim_batch(q, 5, 1 << 20).await.unwrap().unwrap();
    }
    let verify = |path: std::path::PathBuf| {
        std::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
            .args(["outbox", "verify", "--path"])
            .arg(path)
            .output()
            .unwrap()
    };
    let ok = verify(outbox.clone());
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(
        text.contains("20 event") && text.contains("1 batch") && text.contains("OK"),
        "{text}"
    );

    // One event record damaged: named, with what is wrong.
    {
        let db = duvo_bridge::outbox::open_raw(&outbox).unwrap();
        let t = db
            .open_tree(duvo_bridge::outbox::record::EVENTS_TREE)
            .unwrap();
        let k = duvo_bridge::outbox::record::event_key(7);
        let mut v = t.get(k).unwrap().unwrap().to_vec();
        let at = v.len() - 3;
        v[at] ^= 0x41;
        t.insert(k, v).unwrap();
        db.flush().unwrap();
    }
    let bad = verify(outbox.clone());
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(
        text.contains("DAMAGED events/e/7: checksum mismatch"),
        "{text}"
    );

    // The database file itself damaged: sled cannot open it.
    let db_file = outbox.join("db");
    let mut bytes = std::fs::read(&db_file).unwrap();
    for b in bytes.iter_mut().skip(64).step_by(5) {
        *b ^= 0xff;
    }
    std::fs::write(&db_file, bytes).unwrap();
    let unopenable = verify(outbox.clone());
    assert_eq!(
        unopenable.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&unopenable.stderr)
    );
    let (http, admin) = (free_port(), free_port());
    let config = write_binary_config(
        dir.path(),
        "http://127.0.0.1:9",
        q,
        http,
        admin,
        "api_key_env = \"DUVO_API_KEY\"",
        "",
    );
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
            .args(["run", "--config"])
            .arg(&config)
            .env("DUVO_API_KEY", "dv_0123456789abcdef0123456789abcdef")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the bridge exits instead of starting")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "duvo-bridge outbox verify --path {}",
            outbox.display()
        )),
        "{stderr}"
    );
}

/// Compactions (the outbox copied into a new generation and switched to)
/// asked for over and over while events flow, with SIGKILL + power cuts at
/// random moments, some inside a copy or its switch: every acknowledged
/// event is one case, and the outbox opens after every cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_during_compactions_lose_nothing_acknowledged() {
    let mut rng = seeded_rng();
    const CHUNKS: usize = 120;
    const PER_CHUNK: usize = 50;
    let (dir, m) = mount();
    let mnt = dir.path().join("mnt");
    let mut sc = sim_config();
    sc.rate_limit = 1200;
    let sim = start_sim(sc).await;
    let q = sim.queues()[0];
    let (http, admin) = (free_port(), free_port());
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        bridge_toml(&sim, &mnt, admin, 1200, &http_source_toml(http, q)),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let token = "compact-token-0123456789";
    let env = [
        ("DUVO_BRIDGE__ADMIN__TOKEN_ENV", "POWER_ADMIN_TOKEN"),
        ("POWER_ADMIN_TOKEN", token),
    ];
    let spawn = || spawn_bridge_with(&config, &key, &log, &env);
    let mut bridge = spawn();
    assert!(wait_ready(admin).await, "bridge ready");

    let poster = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        for c in 0..CHUNKS {
            let body: Vec<_> = (0..PER_CHUNK)
                .map(|j| json!({ "order_id": format!("C-{c}-{j}") }))
                .collect();
            post_until_accepted(&client, http, &format!("compact-{c}"), &json!(body)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client
                    .post(format!("http://127.0.0.1:{admin}/v1/outbox/compact"))
                    .bearer_auth(token)
                    .send()
                    .await;
                if matches!(&r, Ok(r) if r.status() == 200) {
                    done += 1;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            done
        })
    };
    for cut in 1..=5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        bridge.kill().unwrap(); // SIGKILL
        bridge.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dropped = m.fs.cut();
        eprintln!(
            "cut #{cut}: dropped {dropped}; generation {:?}; {} cases so far",
            duvo_bridge::outbox::compact::current_generation(&mnt.join("outbox")),
            sim.stats().cases_created
        );
        bridge = spawn();
        if !wait_ready(admin).await {
            let _ = bridge.kill();
            panic!(
                "bridge ready after cut #{cut}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    poster.await.unwrap();
    let total = CHUNKS * PER_CHUNK;
    let delivered = wait_until(Duration::from_secs(120), || async {
        sim.stats().cases_created as usize >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let compactions = compactor.await.unwrap();
    send_signal(&bridge, "TERM");
    bridge.wait().unwrap();
    let per = cases_per_order(&sim);
    let count = Count::of(
        &per,
        (0..CHUNKS).flat_map(|c| (0..PER_CHUNK).map(move |j| format!("C-{c}-{j}"))),
    );
    let generation = duvo_bridge::outbox::compact::current_generation(&mnt.join("outbox")).unwrap();
    eprintln!(
        "compactions={compactions} generation={generation} cases={} missing={} duplicates={}",
        per.values().sum::<usize>(),
        count.missing.len(),
        count.dups.len()
    );
    if !delivered || !count.missing.is_empty() {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(
        compactions >= 5,
        "only {compactions} compactions were carried out"
    );
    assert!(
        generation >= 5,
        "generation {generation}: the switches did not stick"
    );
    count.assert_each_once(&per, total);
}
