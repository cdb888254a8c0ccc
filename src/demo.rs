//! `duvo-bridge demo`: the newcomer's first command.
//!
//! Starts the simulator and a bridge in-process (temporary outbox, ports
//! chosen by the OS), posts sample orders to the bridge's HTTP source the
//! way an order-management system would (arrays of 200 with an
//! Idempotency-Key), shows progress, and ends with a summary of what the
//! API saw. Nothing here is special-cased: it is the production pipeline
//! pointed at the local simulator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogConfig};
use crate::deliver::gate::GateStats;
use crate::sim::{SimConfig, SimHandle, SimStats};
use crate::source::HttpSourceConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Sample orders to submit.
    #[arg(long, default_value_t = 3000)]
    pub orders: usize,
    /// Every Nth order is marked `"simulate":"fail"`, so its case fails.
    #[arg(long, default_value_t = 20)]
    pub fail_every: usize,
    /// Simulated API rate limit, requests per minute.
    #[arg(long, default_value_t = 300)]
    pub rate_limit: u32,
    /// Simulated time from pending to completed/failed, ms.
    #[arg(long, default_value_t = 2000)]
    pub process_ms: u64,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Log level for the bridge while the demo runs (progress bars stay readable at `warn`).
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

/// Secret the demo's callback receiver checks signatures with.
const DEMO_CALLBACK_SECRET: &str = "demo-callback-secret";

/// The demo's stand-in for the OMS's callback endpoint: counts failure
/// reports whose signature checks out, and those whose does not.
#[derive(Clone, Default)]
struct CallbackCounter {
    valid: Arc<AtomicU64>,
    invalid: Arc<AtomicU64>,
    cases: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

async fn start_callback_receiver() -> anyhow::Result<(String, CallbackCounter)> {
    let counter = CallbackCounter::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo callback receiver")?;
    let url = format!("http://{}/duvo-callback", listener.local_addr()?);
    let c = counter.clone();
    let app = axum::Router::new().route(
        "/duvo-callback",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let c = c.clone();
            async move {
                let expected =
                    crate::report::http::signature(DEMO_CALLBACK_SECRET.as_bytes(), &body);
                let given = headers
                    .get(crate::report::http::SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok());
                if given == Some(expected.as_str()) {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if let Some(case) = v["case_id"].as_str() {
                        c.cases
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(case.to_string());
                    }
                    c.valid.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::NO_CONTENT
                } else {
                    c.invalid.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::UNAUTHORIZED
                }
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, counter))
}

fn demo_config(sim: &SimHandle, outbox: &std::path::Path, rate: u32, callback_url: &str) -> Config {
    let mut source = HttpSourceConfig::new("oms", sim.queues()[0]);
    source.title = "Order {/order_id} for {/customer/name|unknown customer}".into();
    source.title_fallback = "Order without id".into();
    source.labels = BTreeMap::from([
        ("channel".to_string(), "{/channel}".to_string()),
        ("source".to_string(), "duvo-bridge-demo".to_string()),
    ]);
    source.priority_field = Some("/priority".into());
    source.event_id_field = Some("/order_id".into());
    source.callback_url = Some(callback_url.to_string());
    source.callback_secret = Some(crate::secret::Secret::new(DEMO_CALLBACK_SECRET));
    let mut cfg = Config::local(&sim.base_url(), &sim.api_keys()[0], outbox, source);
    cfg.duvo.rate_limit_per_minute = rate;
    cfg.shutdown.grace_period_secs = 5;
    cfg
}

fn sample_order(i: usize, fail_every: usize) -> serde_json::Value {
    let channels = ["web", "store", "phone", "marketplace"];
    let priorities = ["none", "medium", "high"];
    let mut o = json!({
        "order_id": format!("ORD-{:06}", i + 1),
        "customer": { "name": format!("Customer {}", i % 97), "tier": if i % 11 == 0 { "gold" } else { "standard" } },
        "channel": channels[i % channels.len()],
        "priority": priorities[i % priorities.len()],
        "lines": [{ "sku": format!("SKU-{}", i % 250), "qty": 1 + i % 4 }],
        "total_eur": ((i * 37) % 5000) as f64 / 10.0,
    });
    if fail_every > 0 && (i + 1) % fail_every == 0 {
        o["simulate"] = json!("fail");
    }
    o
}

/// The demo's producer: an OMS posting arrays of 200 with an
/// Idempotency-Key, retrying on 503 as a well-behaved client would.
/// Returns how many orders were accepted (202).
async fn post_orders(
    client: reqwest::Client,
    url: String,
    orders: Vec<serde_json::Value>,
    stored_bar: ProgressBar,
) -> anyhow::Result<usize> {
    let mut accepted = 0usize;
    for (chunk_no, chunk) in orders.chunks(200).enumerate() {
        let key = format!("demo-batch-{chunk_no}");
        loop {
            let r = client
                .post(&url)
                .header("Idempotency-Key", &key)
                .json(&chunk)
                .send()
                .await;
            match r {
                Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED => {
                    accepted += chunk.len();
                    stored_bar.set_position(accepted as u64);
                    break;
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_client_error() {
                        anyhow::bail!("bridge refused a request ({status}): {text}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
    Ok(accepted)
}

/// What the demo's summary shows.
struct Summary<'a> {
    accepted: usize,
    expected_fail: usize,
    distinct: usize,
    reported_cases: usize,
    callbacks: &'a CallbackCounter,
    sim: &'a SimStats,
    gate: &'a GateStats,
    elapsed: Duration,
}

fn print_summary(s: &Summary<'_>) {
    let per_req = if s.sim.create_requests > 0 {
        s.sim.cases_created as f64 / s.sim.create_requests as f64
    } else {
        0.0
    };
    println!();
    println!("Summary");
    println!("  {:<34} {:>10}", "orders submitted (202)", s.accepted);
    println!(
        "  {:<34} {:>10}",
        "cases created in Duvo", s.sim.cases_created
    );
    println!("  {:<34} {:>10}", "distinct orders among cases", s.distinct);
    println!(
        "  {:<34} {:>10}",
        "completed",
        s.sim.by_status.get("completed").copied().unwrap_or(0)
    );
    println!(
        "  {:<34} {:>10}  (marked to fail: {})",
        "failed",
        s.sim.by_status.get("failed").copied().unwrap_or(0),
        s.expected_fail
    );
    println!(
        "  {:<34} {:>10}  (signed callbacks: {}, bad signatures: {})",
        "failed cases reported back",
        s.reported_cases,
        s.callbacks.valid.load(Ordering::Relaxed),
        s.callbacks.invalid.load(Ordering::Relaxed)
    );
    println!("  {:<34} {:>10}", "API requests (all)", s.sim.requests);
    println!("  {:<34} {:>10}", "create requests", s.sim.create_requests);
    println!(
        "  {:<34} {:>10}",
        "tracking (list) requests", s.sim.list_requests
    );
    println!("  {:<34} {:>10.1}", "cases per create request", per_req);
    println!(
        "  {:<34} {:>10}",
        "rate-limit waits (window/retry-after)",
        s.gate.window_waits + s.gate.retry_after_waits
    );
    println!("  {:<34} {:>10}", "429 answers", s.sim.rate_limited);
    println!("  {:<34} {:>10}", "early retries", s.sim.early_retries);
    println!("  {:<34} {:>9.1}s", "elapsed", s.elapsed.as_secs_f64());
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    crate::telemetry::init_logging(&LogConfig {
        level: args.log_level.clone(),
        ..LogConfig::default()
    });
    let started = Instant::now();
    let sim = crate::sim::start(SimConfig {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        rate_limit: args.rate_limit,
        process_ms: args.process_ms,
        ..SimConfig::default()
    })
    .await
    .context("starting the simulator")?;
    let dir = tempfile::tempdir().context("creating a temporary outbox directory")?;
    let (callback_url, callbacks) = start_callback_receiver().await?;
    let cfg = demo_config(&sim, dir.path(), args.rate_limit, &callback_url);
    let shutdown = CancellationToken::new();
    let bridge = crate::app::start(cfg, shutdown.clone())
        .await
        .context("starting the bridge")?;
    let http = bridge.http_addr("oms").context("demo source is bound")?;
    println!("duvo-bridge demo");
    println!(
        "  simulator   {}  (queue {})",
        sim.base_url(),
        sim.queues()[0]
    );
    println!("  bridge      http://{http}/v1/events");
    println!("  metrics     http://{}/metrics", bridge.admin_addr);
    println!("  outbox      {}", dir.path().display());
    println!("  callback    {callback_url}  (failure reports, HMAC-signed)");
    println!(
        "  submitting  {} orders in arrays of 200, every {}th marked to fail; API limit {} req/min",
        args.orders, args.fail_every, args.rate_limit
    );

    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
    let style =
        ProgressStyle::with_template("{prefix:>10} [{bar:40.cyan/blue}] {pos:>6}/{len:6} {msg}")
            .expect("static template")
            .progress_chars("=> ");
    let n = args.orders as u64;
    let bar = |name: &str| {
        let b = mp.add(ProgressBar::new(n));
        b.set_style(style.clone());
        b.set_prefix(name.to_string());
        b
    };
    let stored_bar = bar("stored");
    let delivered_bar = bar("delivered");
    let finished_bar = bar("finished");
    let reported_bar = mp.add(ProgressBar::new(0));
    reported_bar.set_style(style.clone());
    reported_bar.set_prefix("reported");

    // Producer: an OMS posting arrays of 200 with an Idempotency-Key,
    // retrying on 503 as a well-behaved client would.
    let client = reqwest::Client::new();
    let url = format!("http://{http}/v1/events");
    let orders: Vec<serde_json::Value> = (0..args.orders)
        .map(|i| sample_order(i, args.fail_every))
        .collect();
    let expected_fail = orders
        .iter()
        .filter(|o| o.get("simulate").is_some())
        .count();
    let producer = tokio::spawn(post_orders(client, url, orders, stored_bar.clone()));

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut timed_out = false;
    loop {
        let st = sim.stats();
        let finished = st.by_status.get("completed").copied().unwrap_or(0)
            + st.by_status.get("failed").copied().unwrap_or(0);
        delivered_bar.set_position(st.cases_created);
        finished_bar.set_position(finished);
        finished_bar.set_message(format!(
            "completed {} failed {}",
            st.by_status.get("completed").copied().unwrap_or(0),
            st.by_status.get("failed").copied().unwrap_or(0)
        ));
        let failed = st.by_status.get("failed").copied().unwrap_or(0);
        let reported = callbacks.valid.load(Ordering::Relaxed);
        reported_bar.set_length(failed);
        reported_bar.set_position(reported);
        reported_bar.set_message("failure reports received by the callback");
        if producer.is_finished() && finished >= n && reported >= failed {
            break;
        }
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = match producer.await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err(e),
        Err(e) => anyhow::bail!("producer task failed: {e}"),
    };
    stored_bar.finish();
    delivered_bar.finish();
    finished_bar.finish();
    reported_bar.finish();
    let elapsed = started.elapsed();
    let gate = bridge.gate.stats();
    shutdown.cancel();
    bridge.wait().await?;
    let st = sim.stats();
    let cases = sim.cases();
    let mut distinct = std::collections::HashSet::new();
    for c in &cases {
        if let Some(d) = &c.data {
            distinct.insert(d.clone());
        }
    }
    let reported_cases = callbacks
        .cases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    print_summary(&Summary {
        accepted,
        expected_fail,
        distinct: distinct.len(),
        reported_cases,
        callbacks: &callbacks,
        sim: &st,
        gate: &gate,
        elapsed,
    });
    sim.shutdown().await;
    if timed_out {
        anyhow::bail!(
            "timed out after {} s before every case finished",
            args.timeout_secs
        );
    }
    let failed = st.by_status.get("failed").copied().unwrap_or(0) as usize;
    if reported_cases != failed {
        anyhow::bail!("expected {failed} failed cases reported back, got {reported_cases}");
    }
    if st.cases_created as usize != accepted || distinct.len() != accepted {
        anyhow::bail!(
            "expected {accepted} cases exactly once each, found {} cases for {} distinct orders",
            st.cases_created,
            distinct.len()
        );
    }
    Ok(())
}
