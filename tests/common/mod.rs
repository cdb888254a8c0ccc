//! Shared helpers for the integration tests: an in-process simulator, a
//! bridge configuration pointing at it, and bounded waits.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use duvo_bridge::config::{Config, HttpSourceConfig, SourceConfig};
use duvo_bridge::secret::Secret;
use duvo_bridge::sim::{SimConfig, SimHandle};

pub fn sim_config() -> SimConfig {
    SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate_limit: 6000,
        window_secs: 60,
        process_ms: 200,
        ..SimConfig::default()
    }
}

pub async fn start_sim(cfg: SimConfig) -> SimHandle {
    duvo_bridge::sim::start(cfg)
        .await
        .expect("simulator starts")
}

/// A bridge config with one HTTP source `oms` on an ephemeral port.
pub fn bridge_config(sim: &SimHandle, outbox: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.duvo.base_url = sim.base_url();
    cfg.duvo.api_key = Some(Secret::new(sim.api_keys()[0].clone()));
    cfg.duvo.api_key_env = None;
    cfg.duvo.rate_limit_per_minute = 6000;
    cfg.duvo.timeout_secs = 5;
    cfg.delivery.retry_initial_ms = 20;
    cfg.delivery.retry_max_ms = 500;
    cfg.delivery.linger_ms = 50;
    cfg.outbox.path = outbox.to_path_buf();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.shutdown.grace_period_secs = 5;
    cfg.sources.push(SourceConfig::Http(HttpSourceConfig {
        name: "oms".into(),
        listen: "127.0.0.1:0".into(),
        queue_id: sim.queues()[0].to_string(),
        title: "Order {/order_id}".into(),
        title_fallback: "Untitled".into(),
        labels: BTreeMap::from([("channel".to_string(), "{/channel}".to_string())]),
        priority: None,
        priority_field: None,
        event_id_field: None,
        auth_token_env: None,
        max_body_bytes: 2 * 1024 * 1024,
        max_events_per_request: 10_000,
    }));
    cfg
}

pub fn order(i: usize) -> serde_json::Value {
    serde_json::json!({ "order_id": format!("ORD-{i:06}"), "channel": "web", "amount": i })
}

pub fn orders(range: std::ops::Range<usize>) -> Vec<serde_json::Value> {
    range.map(order).collect()
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many cases the simulator holds per order id (from the case data).
pub fn cases_per_order(sim: &SimHandle) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for c in sim.cases() {
        let data: serde_json::Value =
            serde_json::from_str(c.data.as_deref().unwrap_or("null")).unwrap_or_default();
        let id = data["order_id"].as_str().unwrap_or("?").to_string();
        *m.entry(id).or_insert(0) += 1;
    }
    m
}

pub async fn post_events(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    body: &serde_json::Value,
    idem: Option<&str>,
) -> reqwest::Response {
    let mut rb = client.post(format!("http://{addr}/v1/events")).json(body);
    if let Some(k) = idem {
        rb = rb.header("Idempotency-Key", k);
    }
    rb.send().await.expect("bridge answers")
}
