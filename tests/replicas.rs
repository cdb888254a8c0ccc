//! Scaling out: three real bridge processes share one API key, each with
//! `rate_share = 1/3`. Together they must use nearly all of the key's budget
//! and never make the server repeat itself (no request from any replica
//! while a 429's deadline for the key is still running).
//!
//! The simulator's window is shortened to 5 s (25 requests, i.e. 300/min)
//! so several windows fit in a test; `scripts/replicas-budget.py` measures
//! the same at any window, including the production minute.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

const WINDOW: u64 = 5;
const LIMIT: u32 = 25;
const REPLICAS: usize = 3;

/// Sleep until `offset_ms` after the next multiple of `WINDOW` seconds since
/// the epoch (the simulator's windows are epoch-aligned).
async fn to_boundary(offset_ms: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let next = Duration::from_secs((now.as_secs() / WINDOW + 1) * WINDOW)
        + Duration::from_millis(offset_ms);
    tokio::time::sleep(next - now).await;
}

fn accepted(s: &duvo_bridge::sim::SimStats) -> u64 {
    s.responses
        .iter()
        .filter(|(code, _)| code.starts_with('2'))
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_key_without_early_retries_and_use_the_budget() {
    let mut sc = sim_config();
    sc.rate_limit = LIMIT;
    sc.window_secs = WINDOW;
    let sim = start_sim(sc).await;
    let key = sim.api_keys()[0].clone();
    let rpm = u64::from(LIMIT) * 60 / WINDOW;
    let mut children = Vec::new();
    let mut ports = Vec::new();
    let dirs: Vec<_> = (0..REPLICAS)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    for dir in &dirs {
        let (http, admin) = (free_port(), free_port());
        let config = write_binary_config(
            dir.path(),
            &sim.base_url(),
            sim.queues()[0],
            http,
            admin,
            &format!("rate_limit_per_minute = {rpm}\nrate_share = 0.3333"),
            "",
        );
        // Small batches: the budget is counted in requests, not cases.
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("[delivery]", "[delivery]\nmax_batch = 2");
        std::fs::write(&config, text).unwrap();
        children.push(spawn_bridge(&config, &key, &dir.path().join("bridge.log")));
        ports.push((http, admin));
    }
    for (_, admin) in &ports {
        assert!(wait_ready(*admin).await, "replica ready");
    }
    // A backlog none of them can finish during the test.
    let client = reqwest::Client::new();
    for (i, (http, _)) in ports.iter().enumerate() {
        let addr = format!("127.0.0.1:{http}").parse().unwrap();
        let body = json!(orders(i * 1000..i * 1000 + 600));
        let r = post_events(&client, addr, &body, Some(&format!("backlog-{i}"))).await;
        assert_eq!(r.status(), 202);
    }

    // Warm-up: each gate learns the 5 s window from two consecutive resets
    // (until then it assumes a minute and paces at a twelfth of the rate).
    for _ in 0..4 {
        to_boundary(50).await;
    }
    let before = sim.stats();
    const MEASURED: u64 = 4;
    let mut per_window = Vec::new();
    let mut prev = accepted(&before);
    for _ in 0..MEASURED {
        to_boundary(50).await;
        let a = accepted(&sim.stats());
        per_window.push(a - prev);
        prev = a;
    }
    let after = sim.stats();
    let used = accepted(&after) - accepted(&before);
    let budget = u64::from(LIMIT) * MEASURED;
    let usage = used as f64 / budget as f64;
    eprintln!("per window {per_window:?}, usage {usage:.3}, stats {after:?}");

    assert_eq!(after.early_retries, 0, "{after:?}");
    assert!(used <= budget, "{per_window:?}");
    assert!(
        usage >= 0.9,
        "three replicas used {usage:.3} of the budget: {per_window:?}"
    );
    for (_, admin) in &ports {
        let rpm_now = scrape_metric(
            *admin,
            "duvo_bridge_rate_gate_effective_rpm{account=\"default\"}",
        )
        .await;
        let rpm_now = rpm_now.expect("effective rpm exported");
        assert!((rpm_now - rpm as f64 / 3.0).abs() < 1.0, "{rpm_now}");
    }
    // Each replica delivered its part: the intake is spread, the key shared.
    let per = cases_per_order(&sim);
    for i in 0..REPLICAS {
        let prefix = format!("ORD-{:03}", i);
        let n = per.keys().filter(|k| k.starts_with(&prefix)).count();
        assert!(n > 0, "replica {i} delivered nothing");
    }
    assert!(per.values().all(|n| *n == 1), "a case was created twice");
}
