//! Several Duvo accounts in one bridge, run as the real binary against a
//! simulator with three keys: each account's queues are delivered with its
//! own key and budget, every event exactly once; one key revoked mid-run
//! holds only its own account back (its events wait, nothing is lost) while
//! the others go on at their rate; a queue the key cannot use is named at
//! start (`validate --online`, `run` refuses with 64 unless
//! `--start-anyway`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use duvo_bridge::sim::{FaultsPatch, SimHandle};

const KEYS: [&str; 3] = [
    "dv_acct_a_0000000000000000000000000a",
    "dv_acct_b_0000000000000000000000000b",
    "dv_acct_c_0000000000000000000000000c",
];

async fn three_key_sim() -> SimHandle {
    let mut sc = sim_config();
    sc.api_keys = KEYS.iter().map(|k| k.to_string()).collect();
    sc.queues = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    sc.rate_limit = 600; // per key per window
    sc.window_secs = 10;
    start_sim(sc).await
}

/// A config with three HTTP sources, source i on queue i with account i
/// (`default`, `b`, `c`), each at `rate` requests/min.
fn three_account_config(
    sim: &SimHandle,
    dir: &std::path::Path,
    admin: u16,
    http: [u16; 3],
    rate: u32,
) -> String {
    let q = sim.queues();
    let mut s = format!(
        r#"
[duvo]
base_url = "{base}"
api_key_env = "KEY_A"
rate_limit_per_minute = {rate}
timeout_secs = 5
[[duvo.accounts]]
name = "b"
api_key_env = "KEY_B"
rate_limit_per_minute = {rate}
[[duvo.accounts]]
name = "c"
api_key_env = "KEY_C"
rate_limit_per_minute = {rate}
[outbox]
path = "{outbox}"
[delivery]
linger_ms = 50
retry_initial_ms = 20
retry_max_ms = 500
[admin]
listen = "127.0.0.1:{admin}"
[shutdown]
grace_period_secs = 2
"#,
        base = sim.base_url(),
        outbox = dir.join("outbox").display(),
    );
    for (i, account) in ["", "b", "c"].iter().enumerate() {
        s.push_str(&format!(
            r#"
[[sources]]
type = "http"
name = "oms-{i}"
listen = "127.0.0.1:{port}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
{account_line}
"#,
            port = http[i],
            queue = q[i],
            account_line = if account.is_empty() {
                String::new()
            } else {
                format!("account = \"{account}\"")
            },
        ));
    }
    s
}

fn key_env() -> Vec<(&'static str, &'static str)> {
    vec![("KEY_A", KEYS[0]), ("KEY_B", KEYS[1]), ("KEY_C", KEYS[2])]
}

async fn post_orders(http: u16, prefix: &str, from: usize, n: usize) {
    let c = reqwest::Client::new();
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(250) {
        let events: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| serde_json::json!({"order_id": format!("{prefix}-{i:06}")}))
            .collect();
        let r = c
            .post(format!("http://127.0.0.1:{http}/v1/events"))
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
}

/// Cases per queue, and how many times each order id appears.
fn by_queue(sim: &SimHandle) -> (HashMap<uuid::Uuid, usize>, HashMap<String, usize>) {
    let (mut q, mut orders) = (HashMap::new(), HashMap::new());
    for c in sim.cases() {
        *q.entry(c.queue_id).or_insert(0) += 1;
        *orders.entry(c.title.clone()).or_insert(0) += 1;
    }
    (q, orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_account_delivers_its_queues_with_its_key_and_a_revoked_key_holds_back_only_its_own() {
    let sim = three_key_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let (admin, http) = (free_port(), [free_port(), free_port(), free_port()]);
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        three_account_config(&sim, dir.path(), admin, http, 3600),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
        .args(["validate", "--online", "--config"])
        .arg(&config)
        .envs(key_env())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _bridge = spawn_bridge_with(&config, KEYS[0], &log, &key_env());
    assert!(wait_ready(admin).await, "bridge ready");
    let q = sim.queues();

    for (i, p) in ["A", "B", "C"].iter().enumerate() {
        post_orders(http[i], p, 0, 500).await;
    }
    expect_cases(&sim, 1500, 30).await;
    let (per_queue, orders) = by_queue(&sim);
    for qi in &q {
        assert_eq!(per_queue.get(qi), Some(&500), "{per_queue:?}");
    }
    assert!(orders.values().all(|n| *n == 1), "exactly once");
    // Each account's requests carry its own key: the metrics say who sent
    // what (counted right after the outbox settles: allow a moment).
    let scrape = || async {
        reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    for (account, queue) in [("default", q[0]), ("b", q[1]), ("c", q[2])] {
        let line = format!(
            "duvo_bridge_cases_created_total{{queue=\"{queue}\",account=\"{account}\"}} 500"
        );
        let seen = wait_until(Duration::from_secs(5), || async {
            scrape().await.contains(&line)
        })
        .await;
        assert!(seen, "{account}: {line} in\n{}", scrape().await);
    }

    // Account c's key is revoked: its events wait; a and b go on.
    sim.set_faults(FaultsPatch {
        revoked_keys: Some(vec![KEYS[2].to_string()]),
        ..FaultsPatch::default()
    });
    for (i, p) in ["A", "B", "C"].iter().enumerate() {
        post_orders(http[i], p, 500, 1000).await;
    }
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (pq, _) = by_queue(&sim);
            pq.get(&q[0]) == Some(&1500) && pq.get(&q[1]) == Some(&1500)
        })
        .await,
        "a and b deliver while c is revoked: {:?}",
        by_queue(&sim).0
    );
    assert_eq!(by_queue(&sim).0.get(&q[2]), Some(&500), "c waits");
    assert!(sim.stats().unauthorized > 0, "c was refused");

    // The key comes back: c's events are delivered, none lost, none twice.
    sim.set_faults(FaultsPatch {
        revoked_keys: Some(Vec::new()),
        ..FaultsPatch::default()
    });
    expect_cases(&sim, 4500, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (per_queue, orders) = by_queue(&sim);
    for qi in &q {
        assert_eq!(per_queue.get(qi), Some(&1500), "{per_queue:?}");
    }
    assert_eq!(orders.len(), 4500);
    assert!(orders.values().all(|n| *n == 1), "exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_its_account_cannot_use_is_named_before_anything_is_acknowledged() {
    let sim = three_key_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let (admin, http) = (free_port(), [free_port(), free_port(), free_port()]);
    let config = dir.path().join("bridge.toml");
    let wrong = uuid::Uuid::new_v4();
    let text = three_account_config(&sim, dir.path(), admin, http, 600)
        .replace(&sim.queues()[1].to_string(), &wrong.to_string());
    std::fs::write(&config, text).unwrap();
    let bin = env!("CARGO_BIN_EXE_duvo-bridge");

    let out = std::process::Command::new(bin)
        .args(["validate", "--online", "--config"])
        .arg(&config)
        .envs(key_env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&wrong.to_string()) && err.contains("not found (404)"),
        "{err}"
    );
    assert!(
        err.contains("sources.oms-1") && err.contains("\"b\""),
        "names route and account: {err}"
    );

    // `run` refuses the same, before any listener opens.
    let out = std::process::Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .envs(key_env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&wrong.to_string()), "{err}");
    assert_eq!(sim.stats().create_requests, 0);

    // --start-anyway starts; the other accounts deliver.
    let log = dir.path().join("bridge.log");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["run", "--start-anyway", "--config"])
        .arg(&config)
        .envs(key_env())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap());
    let _bridge = BridgeProcess(cmd.spawn().unwrap());
    assert!(wait_ready(admin).await, "bridge ready");
    post_orders(http[0], "A", 0, 10).await;
    expect_cases(&sim, 10, 20).await;

    // An unknown account is a config error, named.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("account = \"c\"", "account = \"nope\"");
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(bin)
        .args(["validate", "--config"])
        .arg(&config)
        .envs(key_env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("\"nope\" is not an account"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_stream_is_routed_by_content_to_each_queue_and_account_exactly_once() {
    let sim = three_key_sim().await;
    let q = sim.queues();
    let dir = tempfile::tempdir().unwrap();
    let (admin, http) = (free_port(), [free_port(), free_port(), free_port()]);
    let config = dir.path().join("bridge.toml");
    // One source, no default queue: returns (by a header) to account b,
    // B2B orders (by a field) to account c, web orders to the default.
    let base = three_account_config(&sim, dir.path(), admin, http, 3600);
    let head = &base[..base.find("[[sources]]").unwrap()];
    let text = format!(
        r#"{head}
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{port}"
title = "Order {{/order_id}}"
[[sources.routes]]
name = "returns"
header = "X-Order-Kind"
equals = "return"
queue_id = "{q1}"
account = "b"
title = "Return {{/order_id}}"
[[sources.routes]]
name = "b2b"
pointer = "/customer/segment"
one_of = ["b2b", "wholesale"]
queue_id = "{q2}"
account = "c"
[[sources.routes]]
name = "web"
pointer = "/channel"
prefix = "web"
queue_id = "{q0}"
"#,
        port = http[0],
        q0 = q[0],
        q1 = q[1],
        q2 = q[2],
    );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("bridge.log");
    let _bridge = spawn_bridge_with(&config, KEYS[0], &log, &key_env());
    assert!(wait_ready(admin).await, "bridge ready");
    let c = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/v1/events", http[0]);
    let mut want: HashMap<String, (uuid::Uuid, &str)> = HashMap::new();
    for batch in 0..10 {
        // Returns come in their own requests (the header is per request).
        let returns: Vec<serde_json::Value> = (0..10)
            .map(|i| serde_json::json!({"order_id": format!("R-{batch}-{i}"), "channel": "web"}))
            .collect();
        for r in &returns {
            want.insert(
                format!("Return {}", r["order_id"].as_str().unwrap()),
                (q[1], "returns"),
            );
        }
        let r = c
            .post(&url)
            .header("X-Order-Kind", "return")
            .json(&returns)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let mixed: Vec<serde_json::Value> = (0..20)
            .map(|i| {
                let id = format!("M-{batch}-{i}");
                if i % 2 == 0 {
                    want.insert(format!("Order {id}"), (q[2], "b2b"));
                    serde_json::json!({"order_id": id, "customer": {"segment": if i % 4 == 0 { "b2b" } else { "wholesale" }}})
                } else {
                    want.insert(format!("Order {id}"), (q[0], "web"));
                    serde_json::json!({"order_id": id, "channel": "web-shop"})
                }
            })
            .collect();
        let r = c.post(&url).json(&mixed).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    // An event no route takes, and no default: the whole request is
    // refused and nothing of it stored.
    let r = c
        .post(&url)
        .json(&serde_json::json!([{"order_id": "X-1", "channel": "web"}, {"order_id": "X-2", "channel": "phone"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["index"], 1);

    expect_cases(&sim, want.len() as u64, 30).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cases = sim.cases();
    assert_eq!(
        cases.len(),
        want.len(),
        "exactly once, nothing of the refused request"
    );
    for case in &cases {
        let (queue, route) = want
            .get(&case.title)
            .unwrap_or_else(|| panic!("unexpected case {}", case.title));
        assert_eq!(case.queue_id, *queue, "{} via {route}", case.title);
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (route, n) in [("returns", 100), ("b2b", 100), ("web", 100)] {
        let line =
            format!("duvo_bridge_events_routed_total{{source=\"oms\",route=\"{route}\"}} {n}");
        assert!(metrics.contains(&line), "{line}");
    }
}
