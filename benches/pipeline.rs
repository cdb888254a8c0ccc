//! Pipeline benchmarks (not tests): `cargo bench --bench pipeline`.
//!
//! Each measurement is reported as a ratio against a baseline run in the
//! same process, on the same machine, at the same time, so the numbers
//! mean something on any machine:
//!
//! 1. HTTP ingest: events/s through `POST /v1/events` (decode, map,
//!    outbox append + fsync, 202) against the same HTTP traffic to a bare
//!    axum handler that only decodes the body.
//! 2. Delivery efficiency under backlog: cases/s delivered to the
//!    simulator divided by the physical maximum (rate x 100 cases), creates
//!    as a share of the budget with tracking on, the busiest second, with
//!    the simulator's early-retry counter.
//! 3. Latency from acknowledgement to case created, against its floor:
//!    `linger_ms` + 50 ms while the budget does not bind, 1.25 request
//!    intervals while it does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use duvo_bridge::config::{Config, LogConfig};
use duvo_bridge::sim::SimConfig;
use duvo_bridge::source::HttpSourceConfig;
use duvo_bridge::source::decode::{BodyFormat, decode_events};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn orders_body(chunk: usize, per: usize) -> Vec<u8> {
    let v: Vec<_> = (0..per)
        .map(|i| {
            json!({"order_id": format!("ORD-{chunk}-{i}"), "customer": {"name": "Ada"},
                   "lines": [{"sku": "SKU-1", "qty": 2}], "total": 12.5})
        })
        .collect();
    serde_json::to_vec(&v).unwrap()
}

fn bridge_cfg(sim: &duvo_bridge::sim::SimHandle, dir: &std::path::Path, rate: u32) -> Config {
    let mut source = HttpSourceConfig::new("bench", sim.queues()[0]);
    source.title = "Order {/order_id}".into();
    source.max_body_bytes = 8 * 1024 * 1024;
    let mut cfg = Config::local(&sim.base_url(), &sim.api_keys()[0], dir, source);
    cfg.duvo.rate_limit_per_minute = rate;
    cfg.shutdown.grace_period_secs = 2;
    cfg
}

/// Post `body` from `clients` concurrent clients for `dur`; events/s.
async fn blast(url: String, clients: usize, per: usize, dur: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + dur;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0usize;
            while Instant::now() < until {
                let body = orders_body(c * 1_000_000 + n, per);
                n += 1;
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("post");
                assert!(r.status().is_success(), "status {}", r.status());
                done.fetch_add(per as u64, Ordering::Relaxed);
            }
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

async fn bare_decode_server() -> SocketAddr {
    let app = axum::Router::new().route(
        "/v1/events",
        axum::routing::post(|body: Bytes| async move {
            let ev = decode_events(&body, BodyFormat::Json, 10_000).unwrap();
            (axum::http::StatusCode::ACCEPTED, format!("{}", ev.len()))
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    a
}

async fn ingest() {
    println!("## HTTP ingest (POST /v1/events, arrays of 200, outbox fsync before 202)");
    let sim = duvo_bridge::sim::start(SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    // Keep delivery out of the way: the simulator is down during ingest.
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let bridge = duvo_bridge::app::start(bridge_cfg(&sim, dir.path(), 300), stop.clone())
        .await
        .unwrap();
    let bare = bare_decode_server().await;
    let dur = Duration::from_secs(4);
    println!("| clients | bare decode ev/s | bridge ev/s | ratio |");
    println!("|---|---|---|---|");
    for clients in [1usize, 4, 16] {
        let base = blast(format!("http://{bare}/v1/events"), clients, 200, dur).await;
        let br = blast(
            format!("http://{}/v1/events", bridge.http_addr("bench").unwrap()),
            clients,
            200,
            dur,
        )
        .await;
        println!("| {clients} | {base:.0} | {br:.0} | {:.2} |", br / base);
    }
    stop.cancel();
    bridge.wait().await.unwrap();
    sim.shutdown().await;
}

/// The simulator at the production shape: `per_window` requests per fixed
/// window, cases finished 100 ms after creation (so tracking has work).
async fn production_sim(per_window: u32, window_secs: u64) -> duvo_bridge::sim::SimHandle {
    duvo_bridge::sim::start(SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate_limit: per_window,
        window_secs,
        process_ms: 100,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

async fn delivery() {
    // The production shape: 300 requests per 60 s fixed window. A shorter
    // window would make the run faster but would measure how fast the gate
    // learns the window length rather than its steady state.
    let window_secs = 60u64;
    let per_window = 300u32;
    let rpm = per_window as u64 * 60 / window_secs;
    println!();
    println!(
        "## Delivery efficiency under backlog (simulator limit {per_window} per {window_secs} s = {rpm}/min)"
    );
    let sim = production_sim(per_window, window_secs).await;
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let bridge = duvo_bridge::app::start(bridge_cfg(&sim, dir.path(), rpm as u32), stop.clone())
        .await
        .unwrap();
    // Backlog: 80,000 events (more than the run can deliver).
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/events", bridge.http_addr("bench").unwrap());
    for c in 0..400 {
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(orders_body(c, 200))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // Skip the first seconds (burst), then measure a whole number of windows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s0 = sim.stats();
    let t0 = Instant::now();
    let windows = 2u64;
    // Requests per second, sampled: no second may be busier than twice the
    // even share (rate / 60).
    let mut busiest = 0u64;
    let mut prev = s0.create_requests + s0.list_requests;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    for _ in 0..window_secs * windows {
        tick.tick().await;
        let st = sim.stats();
        let now = st.create_requests + st.list_requests;
        busiest = busiest.max(now - prev);
        prev = now;
    }
    let st = sim.stats();
    let secs = t0.elapsed().as_secs_f64();
    let rate = (st.cases_created - s0.cases_created) as f64 / secs;
    let ideal = rpm as f64 / 60.0 * 100.0;
    let lists = st.list_requests - s0.list_requests;
    let creates = st.create_requests - s0.create_requests;
    let budget = rpm as f64 / 60.0 * secs;
    println!(
        "| measured | cases/s | ideal cases/s (rate x 100) | creates / budget (target >= 0.98) | tracking requests | budget used (creates + tracking) | busiest second (even share {:.0}/s, limit 2x) | early retries | 429s | cases/request |",
        rpm as f64 / 60.0
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {secs:.1} s ({windows} windows) | {rate:.1} | {ideal:.1} | {:.3} | {lists} | {:.3} | {busiest} | {} | {} | {:.1} |",
        creates as f64 / budget,
        (creates + lists) as f64 / budget,
        st.early_retries,
        st.rate_limited,
        st.cases_created as f64 / st.create_requests.max(1) as f64
    );
    stop.cancel();
    bridge.wait().await.unwrap();
    sim.shutdown().await;
}

/// Post one event every `1 / per_sec` s for `dur`; the wall-clock instant
/// each was acknowledged, by title.
async fn post_paced(
    url: &str,
    tag: &str,
    per_sec: f64,
    dur: Duration,
) -> std::collections::HashMap<String, std::time::SystemTime> {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = Instant::now() + dur;
    let mut acked = std::collections::HashMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let order = format!("{tag}-{n}");
        n += 1;
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .body(json!({ "order_id": order }).to_string())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 202);
        acked.insert(format!("Order {order}"), std::time::SystemTime::now());
    }
    acked
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn latency() {
    let rpm = 300u32;
    let linger_ms = 50u64;
    let interval_ms = 60_000.0 / f64::from(rpm);
    println!();
    println!(
        "## Latency, acknowledgement to case created ({rpm}/min, linger_ms = {linger_ms}, tracking on)"
    );
    let sim = production_sim(rpm, 60).await;
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut cfg = bridge_cfg(&sim, dir.path(), rpm);
    cfg.delivery.linger_ms = linger_ms;
    let bridge = duvo_bridge::app::start(cfg, stop.clone()).await.unwrap();
    let url = format!("http://{}/v1/events", bridge.http_addr("bench").unwrap());
    println!("| load | events | p50 ms | p99 ms | max ms | target p99 | met |");
    println!("|---|---:|---:|---:|---:|---|---|");
    for (tag, per_sec, secs, target, what) in [
        (
            "idle",
            2.0,
            60u64,
            (linger_ms + 50) as f64,
            "linger + 50 ms",
        ),
        ("binding", 20.0, 60, interval_ms * 1.25, "1.25 x interval"),
    ] {
        let acked = post_paced(&url, tag, per_sec, Duration::from_secs(secs)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut lat: Vec<f64> = sim
            .cases()
            .iter()
            .filter_map(|c| {
                let at = acked.get(&c.title)?;
                let created: std::time::SystemTime = c.created_at.into();
                Some(
                    created
                        .duration_since(*at)
                        .map_or(0.0, |d| d.as_secs_f64() * 1e3),
                )
            })
            .collect();
        assert_eq!(lat.len(), acked.len(), "every event became a case");
        lat.sort_by(f64::total_cmp);
        let p99 = percentile(&lat, 0.99);
        println!(
            "| {per_sec} events/s ({tag}) | {} | {:.0} | {p99:.0} | {:.0} | {what} = {target:.0} ms | {} |",
            lat.len(),
            percentile(&lat, 0.5),
            lat[lat.len() - 1],
            if p99 <= target { "yes" } else { "no" }
        );
    }
    let st = sim.stats();
    println!(
        "\n{} create and {} listing requests, {} early retries, {} 429s",
        st.create_requests, st.list_requests, st.early_retries, st.rate_limited
    );
    stop.cancel();
    bridge.wait().await.unwrap();
    sim.shutdown().await;
}

fn main() {
    // The allocator settings the daemon runs with (baselines included).
    duvo_bridge::allocator::tune();
    duvo_bridge::telemetry::init_logging(&LogConfig {
        level: "error".into(),
        ..LogConfig::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    rt.block_on(async {
        if only.as_deref().is_none_or(|o| o == "ingest") {
            ingest().await;
        }
        if only.as_deref().is_none_or(|o| o == "delivery") {
            delivery().await;
        }
        if only.as_deref().is_none_or(|o| o == "latency") {
            latency().await;
        }
    });
}
