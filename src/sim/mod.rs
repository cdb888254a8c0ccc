//! The local Duvo simulator (`duvo-bridge sim`).
//!
//! Every test, benchmark and demo trusts it to behave like the production
//! cases API, so it enforces `docs/duvo-cases-api.md` strictly: bearer auth
//! (401/403/404), validation (400/413), a fixed-window per-key rate limit with
//! `x-ratelimit-*` on every answer to a valid key and `retry-after` on 429,
//! idempotency keys (replay / 409), list and search with filters, a simulated
//! agent that moves cases to a terminal status, and run-time faults.
//!
//! Documented choices where the contract is silent:
//! - a 429 does not consume budget in the window;
//! - the idempotency fingerprint is SHA-256 of path + raw body;
//! - blank (whitespace-only) titles are rejected like empty ones;
//! - queues named by `--restricted-key` are created if not listed by `--queue`;
//! - paths outside the version prefix answer 404 without auth; under it the
//!   auth check comes first;
//! - bulk-retry answers 200 `{"retried":[ids],"skipped":[ids]}` (skipped:
//!   unknown, or not failed or canceled).
//!
//! The pipeline never imports this module.

mod agent;
pub mod faults;
mod ratelimit;
mod server;
pub mod state;
mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use faults::{Faults, FaultsError, FaultsPatch};
pub use ratelimit::{RateLimiter, RateVerdict};
pub use state::{RetrySkip, would_fail};

use crate::duvo::types::Case;
use state::{Counters, IdemStore, Store, lock};

/// CLI flags of `duvo-bridge sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub listen: SocketAddr,
    /// API key accepted for every queue (repeatable); without it a dev key
    /// `dv_...` (35 chars) is generated and printed.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// Repeatable `KEY=QUEUE[,QUEUE]`: a key that may only use these queues
    /// (others -> 403). Queues named here are created.
    #[arg(long = "restricted-key")]
    pub restricted_keys: Vec<String>,
    /// Queue id to create (repeatable); without it one queue is created and printed.
    #[arg(long = "queue")]
    pub queues: Vec<Uuid>,
    /// Requests per window per key (every endpoint counted).
    #[arg(long, default_value_t = 300)]
    pub rate_limit: u32,
    /// Length of the fixed rate-limit window, aligned to the Unix epoch.
    #[arg(long, default_value_t = 60)]
    pub window_secs: u64,
    /// Time for the simulated agent to take a case from pending to terminal.
    #[arg(long, default_value_t = 2000)]
    pub process_ms: u64,
    /// Share of cases (by a stable hash of title+data) the agent fails.
    #[arg(long, default_value_t = 0.0)]
    pub fail_ratio: f64,
    /// Also emit Deprecation/Sunset headers (to exercise clients).
    #[arg(long)]
    pub deprecated: bool,
    /// Version prefix of the API routes.
    #[arg(long, default_value = "/v2")]
    pub version_prefix: String,
    /// `honour` replays a repeated `Idempotency-Key`; `ignore` treats every
    /// request as new (the contract does not promise replays: a client
    /// must not duplicate cases either way).
    #[arg(long, value_enum, default_value_t = IdempotencyMode::Honour)]
    pub idempotency: IdempotencyMode,
}

/// Whether the simulator honours `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IdempotencyMode {
    /// A repeated key with the same body replays the first answer; with
    /// another body, or while the first is in progress, 409.
    #[default]
    Honour,
    /// The header is accepted and then disregarded.
    Ignore,
}

/// Simulator configuration (the CLI flags, usable in-process).
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub api_keys: Vec<String>,
    /// `KEY=QUEUE[,QUEUE]` entries, parsed by [`start`].
    pub restricted_keys: Vec<String>,
    pub queues: Vec<Uuid>,
    pub rate_limit: u32,
    pub window_secs: u64,
    pub process_ms: u64,
    pub fail_ratio: f64,
    pub deprecated: bool,
    pub version_prefix: String,
    pub idempotency: IdempotencyMode,
}

impl Default for SimConfig {
    /// The CLI defaults, except `listen` on port 0 so in-process users never
    /// collide with each other or with a running `duvo-bridge sim`.
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_keys: Vec::new(),
            restricted_keys: Vec::new(),
            queues: Vec::new(),
            rate_limit: 300,
            window_secs: 60,
            process_ms: 2000,
            fail_ratio: 0.0,
            deprecated: false,
            version_prefix: "/v2".into(),
            idempotency: IdempotencyMode::Honour,
        }
    }
}

impl From<SimArgs> for SimConfig {
    fn from(a: SimArgs) -> Self {
        SimConfig {
            listen: a.listen,
            api_keys: a.api_keys,
            restricted_keys: a.restricted_keys,
            queues: a.queues,
            rate_limit: a.rate_limit,
            window_secs: a.window_secs,
            process_ms: a.process_ms,
            fail_ratio: a.fail_ratio,
            deprecated: a.deprecated,
            version_prefix: a.version_prefix,
            idempotency: a.idempotency,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("--restricted-key {0:?} must look like KEY=QUEUE[,QUEUE] with queue UUIDs")]
    BadRestrictedKey(String),
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("fail_ratio must be between 0 and 1, got {0}")]
    BadFailRatio(f64),
    #[error("API keys must be non-empty without whitespace")]
    BadKey,
}

impl From<SimError> for std::io::Error {
    fn from(e: SimError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// Which queues a key may use.
#[derive(Debug, Clone)]
pub(crate) enum KeyAccess {
    All,
    Only(HashSet<Uuid>),
}

/// Counters and case totals, as served by `GET /_sim/stats`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SimStats {
    /// API requests (everything but `/_sim/*`).
    pub requests: u64,
    /// Create requests that reached the handler (past auth, rate limit, faults, queue checks).
    pub create_requests: u64,
    /// List and search requests that reached the handler.
    pub list_requests: u64,
    pub cases_created: u64,
    pub rate_limited: u64,
    /// Requests from a key still inside the deadline of a 429 it received.
    pub early_retries: u64,
    pub idempotent_replays: u64,
    pub faults_injected: u64,
    pub dropped_after_commit: u64,
    pub unauthorized: u64,
    /// Cases per stored status.
    pub by_status: BTreeMap<String, u64>,
    /// Cases held per queue id.
    #[serde(default)]
    pub by_queue: BTreeMap<String, u64>,
    /// Answers per HTTP status code ("0" = connection dropped, no answer).
    pub responses: BTreeMap<String, u64>,
    pub cases_total: u64,
    pub idempotency_keys: u64,
}

/// Shared state of one running simulator.
pub(crate) struct SimState {
    cfg: SimConfig,
    /// Normalised prefix: "" or "/v2" (no trailing slash).
    prefix: String,
    keys: HashMap<String, KeyAccess>,
    queues: HashMap<Uuid, (String, DateTime<Utc>)>,
    limiter: RateLimiter,
    faults: Mutex<Faults>,
    store: Mutex<Store>,
    idem: Mutex<IdemStore>,
    counters: Counters,
    agent_wake: Notify,
    started_unix: u64,
    sunset: String,
}

impl SimState {
    fn stats(&self) -> SimStats {
        let c = &self.counters;
        let (by_status, by_queue, cases_total) = {
            let s = lock(&self.store);
            (s.status_counts(), s.queue_counts(), s.len() as u64)
        };
        SimStats {
            requests: Counters::get(&c.requests),
            create_requests: Counters::get(&c.create_requests),
            list_requests: Counters::get(&c.list_requests),
            cases_created: Counters::get(&c.cases_created),
            rate_limited: Counters::get(&c.rate_limited),
            early_retries: Counters::get(&c.early_retries),
            idempotent_replays: Counters::get(&c.idempotent_replays),
            faults_injected: Counters::get(&c.faults_injected),
            dropped_after_commit: Counters::get(&c.dropped_after_commit),
            unauthorized: Counters::get(&c.unauthorized),
            by_status,
            by_queue,
            responses: lock(&c.responses)
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            cases_total,
            idempotency_keys: lock(&self.idem).len() as u64,
        }
    }
}

/// A generated dev key: `dv_` + 32 alphanumerics (35 chars, like real keys).
pub fn generate_api_key() -> String {
    let tail: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("dv_{tail}")
}

fn parse_restricted(s: &str) -> Result<(String, HashSet<Uuid>), SimError> {
    let bad = || SimError::BadRestrictedKey(s.to_owned());
    let (k, qs) = s.split_once('=').ok_or_else(bad)?;
    if k.is_empty() || k.contains(char::is_whitespace) {
        return Err(bad());
    }
    let queues = qs
        .split(',')
        .map(|q| Uuid::parse_str(q.trim()).map_err(|_| bad()))
        .collect::<Result<HashSet<_>, _>>()?;
    Ok((k.to_owned(), queues))
}

fn build_state(mut cfg: SimConfig) -> Result<SimState, SimError> {
    if cfg.rate_limit == 0 {
        return Err(SimError::Zero("rate_limit"));
    }
    if cfg.window_secs == 0 {
        return Err(SimError::Zero("window_secs"));
    }
    if !(0.0..=1.0).contains(&cfg.fail_ratio) {
        return Err(SimError::BadFailRatio(cfg.fail_ratio));
    }
    if cfg.api_keys.is_empty() {
        cfg.api_keys.push(generate_api_key());
    }
    let mut keys = HashMap::new();
    for k in &cfg.api_keys {
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(SimError::BadKey);
        }
        keys.insert(k.clone(), KeyAccess::All);
    }
    let mut extra_queues = Vec::new();
    for r in &cfg.restricted_keys {
        let (k, qs) = parse_restricted(r)?;
        extra_queues.extend(qs.iter().copied());
        keys.insert(k, KeyAccess::Only(qs));
    }
    if cfg.queues.is_empty() {
        cfg.queues.push(Uuid::new_v4());
    }
    for q in extra_queues {
        if !cfg.queues.contains(&q) {
            cfg.queues.push(q);
        }
    }
    let now = Utc::now();
    let queues = cfg
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| (*q, (format!("sim queue {}", i + 1), now)))
        .collect();
    let prefix = format!("/{}", cfg.version_prefix.trim_matches('/'));
    let prefix = if prefix == "/" { String::new() } else { prefix };
    let started = SystemTime::now();
    Ok(SimState {
        prefix,
        keys,
        queues,
        limiter: RateLimiter::new(cfg.rate_limit, cfg.window_secs),
        faults: Mutex::new(Faults::default()),
        store: Mutex::new(Store::new()),
        idem: Mutex::new(IdemStore::default()),
        counters: Counters::default(),
        agent_wake: Notify::new(),
        started_unix: started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        sunset: httpdate::fmt_http_date(started + Duration::from_secs(90 * 24 * 3600)),
        cfg,
    })
}

/// A running simulator. Dropping it stops the server and the agent too.
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Bind (port 0 allowed), spawn server + agent, return at once.
pub async fn start(cfg: SimConfig) -> std::io::Result<SimHandle> {
    let state = Arc::new(build_state(cfg)?);
    let listener = TcpListener::bind(state.cfg.listen).await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let app = server::router(state.clone());
    let tasks = vec![
        tokio::spawn(server::serve(listener, app, cancel.clone())),
        tokio::spawn(agent::run(state.clone(), cancel.clone())),
    ];
    Ok(SimHandle {
        addr,
        state,
        cancel,
        tasks,
    })
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, without the version prefix.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The version prefix in use (e.g. `/v2`).
    pub fn version_prefix(&self) -> &str {
        &self.state.prefix
    }

    /// Keys with access to every queue (given or generated).
    pub fn api_keys(&self) -> Vec<String> {
        self.state.cfg.api_keys.clone()
    }

    /// Every queue, `--queue` ones first, in configuration order.
    pub fn queues(&self) -> Vec<Uuid> {
        self.state.cfg.queues.clone()
    }

    pub fn stats(&self) -> SimStats {
        self.state.stats()
    }

    /// Snapshot of all cases in creation order.
    pub fn cases(&self) -> Vec<Case> {
        lock(&self.state.store).snapshot()
    }

    pub fn faults(&self) -> Faults {
        lock(&self.state.faults).clone()
    }

    /// Apply a faults patch. Out-of-range values are clamped (ratios to
    /// 0..=1) or ignored (a non-error status), with a warning, because
    /// programmatic callers have no HTTP answer to read an error from.
    pub fn set_faults(&self, patch: FaultsPatch) {
        let clamp = |r: Option<f64>| r.map(|v| if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) });
        let mut p = FaultsPatch {
            error_ratio: clamp(patch.error_ratio),
            drop_after_commit_ratio: clamp(patch.drop_after_commit_ratio),
            ..patch
        };
        if p.error_status.is_some_and(|s| !(400..=599).contains(&s)) {
            tracing::warn!(status = ?p.error_status, "ignoring non-error fault status");
            p.error_status = None;
        }
        let mut f = lock(&self.state.faults);
        if let Err(e) = f.apply(&p) {
            tracing::warn!(error = %e, "faults patch refused");
        }
    }

    /// Stop accepting, close connections, stop the agent.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "simulator task ended abnormally");
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `duvo-bridge sim`: start, print how to reach it, serve until SIGINT/SIGTERM.
pub async fn run_cli(args: SimArgs) -> anyhow::Result<()> {
    let sim = start(SimConfig::from(args)).await?;
    println!("duvo-bridge simulator listening on {}", sim.base_url());
    println!("DUVO_BASE_URL={}", sim.base_url());
    println!("DUVO_VERSION_PREFIX={}", sim.version_prefix());
    for k in sim.api_keys() {
        println!("DUVO_API_KEY={k}");
    }
    for q in sim.queues() {
        println!("DUVO_QUEUE_ID={q}");
    }
    println!(
        "introspection: {0}/_sim/stats {0}/_sim/cases {0}/_sim/faults",
        sim.base_url()
    );
    wait_for_signal().await?;
    println!("shutting down simulator");
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated() {
        let bad = |f: fn(&mut SimConfig)| {
            let mut c = SimConfig::default();
            f(&mut c);
            build_state(c).err().map(|e| e.to_string())
        };
        assert!(bad(|c| c.rate_limit = 0).is_some());
        assert!(bad(|c| c.window_secs = 0).is_some());
        assert!(bad(|c| c.fail_ratio = 1.5).is_some());
        assert!(bad(|c| c.restricted_keys = vec!["nokey".into()]).is_some());
        assert!(bad(|c| c.restricted_keys = vec!["k=not-a-uuid".into()]).is_some());
        assert!(bad(|c| c.api_keys = vec!["has space".into()]).is_some());
    }

    #[test]
    fn defaults_generate_a_key_and_a_queue() {
        let q = Uuid::new_v4();
        let mut c = SimConfig {
            restricted_keys: vec![format!("dv_r={q}")],
            ..SimConfig::default()
        };
        c.version_prefix = "v1/".into();
        let st = build_state(c).unwrap();
        assert_eq!(st.prefix, "/v1");
        assert_eq!(st.cfg.api_keys.len(), 1);
        let k = &st.cfg.api_keys[0];
        assert!(k.starts_with("dv_") && k.len() == 35);
        assert_eq!(st.cfg.queues.len(), 2, "one generated + the restricted one");
        assert!(matches!(st.keys.get("dv_r"), Some(KeyAccess::Only(qs)) if qs.contains(&q)));
    }
}
