//! Shared helpers for the integration tests: an in-process simulator, a
//! bridge configuration pointing at it, and bounded waits.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use duvo_bridge::config::Config;
use duvo_bridge::sim::{SimConfig, SimHandle};
use duvo_bridge::source::HttpSourceConfig;

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

/// A bridge config with one HTTP source `oms` on an ephemeral port, with
/// short retry delays so fault tests run quickly.
pub fn bridge_config(sim: &SimHandle, outbox: &Path) -> Config {
    let mut source = HttpSourceConfig::new("oms", sim.queues()[0]);
    source.title = "Order {/order_id}".into();
    source.labels = BTreeMap::from([("channel".to_string(), "{/channel}".to_string())]);
    source.max_body_bytes = 2 * 1024 * 1024;
    let mut cfg = Config::local(&sim.base_url(), &sim.api_keys()[0], outbox, source);
    cfg.duvo.rate_limit_per_minute = 6000;
    cfg.duvo.timeout_secs = 5;
    cfg.delivery.retry_initial_ms = 20;
    cfg.delivery.retry_max_ms = 500;
    cfg.delivery.linger_ms = 50;
    cfg.shutdown.grace_period_secs = 5;
    cfg
}

/// A simulator plus a bridge started in-process on a temporary outbox.
pub struct Harness {
    pub sim: SimHandle,
    pub dir: tempfile::TempDir,
    pub stop: tokio_util::sync::CancellationToken,
    pub bridge: duvo_bridge::app::RunningBridge,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
}

impl Harness {
    /// Start with the default simulator and `bridge_config`, adjusted by `tweak`.
    pub async fn start(sim_cfg: SimConfig, tweak: impl FnOnce(&mut Config)) -> Harness {
        let sim = start_sim(sim_cfg).await;
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut cfg = bridge_config(&sim, dir.path());
        tweak(&mut cfg);
        let bridge = duvo_bridge::app::start(cfg, stop.clone()).await.unwrap();
        let addr = bridge.http_addr("oms").unwrap();
        Harness {
            sim,
            dir,
            stop,
            bridge,
            addr,
            client: reqwest::Client::new(),
        }
    }

    pub async fn post(&self, body: &serde_json::Value, idem: Option<&str>) -> reqwest::Response {
        post_events(&self.client, self.addr, body, idem).await
    }

    /// Drain and wait for the bridge to stop.
    pub async fn stop(self) -> SimHandle {
        self.stop.cancel();
        self.bridge.wait().await.unwrap();
        self.sim
    }
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

/// Wait until the simulator created at least `n` cases; panics with the
/// simulator's counters when it does not happen within `secs`.
pub async fn expect_cases(sim: &SimHandle, n: u64, secs: u64) {
    let ok = wait_until(Duration::from_secs(secs), || async {
        sim.stats().cases_created >= n
    })
    .await;
    assert!(ok, "expected {n} cases within {secs} s: {:?}", sim.stats());
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

/// POST `body` to the HTTP intake on 127.0.0.1:`port` with
/// `Idempotency-Key: key` until it answers 202, as a producer retrying
/// through the bridge's kills, restarts and power cuts would.
pub async fn post_until_accepted(
    client: &reqwest::Client,
    port: u16,
    key: &str,
    body: &serde_json::Value,
) {
    loop {
        let r = client
            .post(format!("http://127.0.0.1:{port}/v1/events"))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status() == 202) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start the real binary with `run --config`, the API key in the
/// environment and its output appended to `log`.
pub fn spawn_bridge(config: &Path, key: &str, log: &Path) -> BridgeProcess {
    spawn_bridge_with(config, key, log, &[])
}

/// [`spawn_bridge`] with extra environment variables.
pub fn spawn_bridge_with(
    config: &Path,
    key: &str,
    log: &Path,
    env: &[(&str, &str)],
) -> BridgeProcess {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
        .args(["run", "--config"])
        .arg(config)
        .env("DUVO_API_KEY", key)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(BridgeProcess)
        .expect("spawn duvo-bridge")
}

/// A spawned bridge process, SIGKILLed when dropped while still running (a
/// failing test must not leave it behind holding ports and the outbox).
pub struct BridgeProcess(pub std::process::Child);

impl std::ops::Deref for BridgeProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for BridgeProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Wait until the admin listener on `admin` answers `/readyz` with 200.
pub async fn wait_ready(admin: u16) -> bool {
    wait_until(Duration::from_secs(20), || async move {
        reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await
}

/// One callback the sink received.
#[derive(Debug, Clone)]
pub struct Callback {
    pub signature: Option<String>,
    pub report_id: Option<String>,
    pub body: bytes::Bytes,
    pub json: serde_json::Value,
}

/// An HTTP server standing in for a customer's callback endpoint: records
/// every POST, and answers 503 to the next `fail_next` requests.
#[derive(Clone)]
pub struct CallbackSink {
    pub url: String,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<Callback>>>,
    pub fail_next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CallbackSink {
    pub async fn start() -> CallbackSink {
        CallbackSink::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> CallbackSink {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}/duvo-callback", listener.local_addr().unwrap());
        let sink = CallbackSink {
            url,
            received: Default::default(),
            fail_next: Default::default(),
            refused: Default::default(),
        };
        let s = sink.clone();
        let app = axum::Router::new().route(
            "/duvo-callback",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
                let s = s.clone();
                async move {
                    let failing = s
                        .fail_next
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        s.refused.fetch_add(1, Ordering::SeqCst);
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let json = serde_json::from_slice(&body).unwrap_or_default();
                    s.received.lock().unwrap().push(Callback {
                        signature: h("x-duvo-bridge-signature"),
                        report_id: h("x-duvo-bridge-report-id"),
                        body,
                        json,
                    });
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        sink
    }

    pub fn received(&self) -> Vec<Callback> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// Case ids of the simulator's cases in `status`.
pub fn case_ids_in(sim: &SimHandle, status: &str) -> std::collections::BTreeSet<String> {
    sim.cases()
        .into_iter()
        .filter(|c| c.status.as_str() == status)
        .map(|c| c.id.to_string())
        .collect()
}

/// The TOML of a bridge run by the binary against `sim`: API key from
/// `DUVO_API_KEY`, outbox in `dir`, admin on `admin`, short retry delays;
/// `rest` adds sections and `[[sources]]`.
pub fn bridge_toml(sim: &SimHandle, dir: &Path, admin: u16, rate: u32, rest: &str) -> String {
    format!(
        r#"
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {rate}
timeout_secs = 5
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
{rest}"#,
        base = sim.base_url(),
        outbox = dir.join("outbox").display(),
    )
}

/// What a test needs to run the binary as an HTTP intake: a fresh temp dir
/// holding `bridge.toml` ([`bridge_toml`] with [`http_source_toml`] feeding
/// the simulator's first queue, at `rate` requests/min), free ports for the
/// source and the admin listener, the log path and the simulator's key.
pub struct HttpBridge {
    pub dir: tempfile::TempDir,
    pub http: u16,
    pub admin: u16,
    pub config: std::path::PathBuf,
    pub log: std::path::PathBuf,
    pub key: String,
}

impl HttpBridge {
    pub fn new(sim: &SimHandle, rate: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (http, admin) = (free_port(), free_port());
        let config = dir.path().join("bridge.toml");
        std::fs::write(
            &config,
            bridge_toml(
                sim,
                dir.path(),
                admin,
                rate,
                &http_source_toml(http, sim.queues()[0]),
            ),
        )
        .unwrap();
        let log = dir.path().join("bridge.log");
        HttpBridge {
            dir,
            http,
            admin,
            config,
            log,
            key: sim.api_keys()[0].clone(),
        }
    }

    /// Start (or restart) the bridge on this config, logging to `log`.
    pub fn spawn(&self) -> BridgeProcess {
        spawn_bridge(&self.config, &self.key, &self.log)
    }
}

/// The `[[sources]]` block of the HTTP source `oms` on `http`, feeding
/// `queue`, titled by order id (what [`bridge_toml`]'s `rest` usually is).
pub fn http_source_toml(http: u16, queue: uuid::Uuid) -> String {
    format!(
        r#"
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
"#
    )
}

/// Send `signal` (e.g. "TERM", "HUP") to a child process with kill(1).
pub fn send_signal(child: &std::process::Child, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{signal} {}", child.id());
}

/// The value of an unlabelled sample `name` on the admin listener's
/// `/metrics`, if the scrape works and the sample is there.
pub async fn scrape_metric(admin: u16, name: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A bridge configuration file for the real binary: one HTTP source `oms`
/// on `http`, the admin listener on `admin`, the outbox under `dir`, the
/// API key from `DUVO_API_KEY`; `extra_duvo` lines are added to `[duvo]`
/// and `extra` at the end of the file (before the source).
pub fn write_binary_config(
    dir: &Path,
    base_url: &str,
    queue: uuid::Uuid,
    http: u16,
    admin: u16,
    extra_duvo: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("bridge.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[duvo]
base_url = "{base_url}"
timeout_secs = 5
{extra_duvo}
[outbox]
path = "{outbox}"
[delivery]
linger_ms = 50
retry_initial_ms = 20
retry_max_ms = 500
[admin]
listen = "127.0.0.1:{admin}"
[shutdown]
grace_period_secs = 3
{extra}
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
"#,
            outbox = dir.join("outbox").display(),
        ),
    )
    .unwrap();
    path
}

/// A random generator seeded from `CRASH_SEED`, or randomly (printed, so a
/// failing run can be replayed).
pub fn seeded_rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::Rng::random(&mut rand::rng()));
    eprintln!("CRASH_SEED={seed}");
    rand::SeedableRng::seed_from_u64(seed)
}
