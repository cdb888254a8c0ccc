//! Wiring: opens the outbox, binds listeners, starts sources, the batcher
//! and the admin server, and runs the drain on shutdown.
//!
//! Drain order on SIGTERM/SIGINT (bounded by `shutdown.grace_period_secs`):
//! 1. `/readyz` turns 503 and sources stop taking input; requests already
//!    inside finish their append (and so their acknowledgement).
//! 2. The batcher keeps delivering until the outbox is empty or the grace
//!    period is nearly over, then stops claiming; in-flight requests get the
//!    rest of the period.
//! 3. A final outbox flush; whatever is undelivered stays on disk and is
//!    sent (with the same idempotency keys) at the next start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Health};
use crate::config::{Config, SourceConfig};
use crate::deliver::batcher::Batcher;
use crate::deliver::gate::{RateGate, RateGateConfig};
use crate::duvo::{ClientConfig, DuvoClient};
use crate::outbox::{Outbox, OutboxConfig};
use crate::report::Reporter;
use crate::report::amqp::AmqpReporter;
use crate::report::dispatch::{DispatchConfig, ReportDispatcher};
use crate::report::http::HttpReporter;
use crate::report::kafka::KafkaReporter;
use crate::retry::RetryPolicy;
use crate::source::amqp::AmqpSource;
use crate::source::http::HttpSource;
use crate::source::kafka::KafkaSource;
use crate::source::{Source, SourceContext};
use crate::track::{CaseTracker, TrackerConfig};

/// Handle on a bridge started in-process.
pub struct RunningBridge {
    pub admin_addr: SocketAddr,
    /// Bound address of each HTTP source, by source name.
    pub http_addrs: Vec<(String, SocketAddr)>,
    pub outbox: Outbox,
    pub health: Health,
    /// The rate gate of the default account's key (stats for the demo
    /// and tests).
    pub gate: RateGate,
    /// Every account's rate gate, the default first.
    pub gates: Vec<(String, RateGate)>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningBridge {
    /// Wait for the bridge to finish (after the shutdown token is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("bridge task panicked")?
    }

    pub fn http_addr(&self, source: &str) -> Option<SocketAddr> {
        self.http_addrs
            .iter()
            .find(|(n, _)| n == source)
            .map(|(_, a)| *a)
    }
}

pub fn outbox_config(cfg: &Config) -> OutboxConfig {
    let report_sources = cfg
        .sources
        .iter()
        .filter(|s| s.reports())
        .map(|s| s.name().to_string())
        .collect();
    OutboxConfig {
        path: cfg.outbox.path.clone(),
        high_water_events: cfg.outbox.high_water_events,
        low_water_events: cfg.outbox.low_water_events,
        high_water_bytes: cfg.outbox.high_water_bytes,
        min_free_disk_bytes: cfg.outbox.min_free_disk_mb.saturating_mul(1024 * 1024),
        retention: Duration::from_secs(cfg.outbox.retention_hours * 3600),
        cache_capacity_bytes: cfg.outbox.cache_mb.saturating_mul(1024 * 1024),
        compact_min_bytes: cfg.outbox.compact_min_mb.saturating_mul(1024 * 1024),
        tracking: cfg.tracking.policy(report_sources),
        accept_data_loss: cfg.outbox.accept_data_loss,
        background_load: true,
    }
}

/// One reporter per source that has a report target configured.
fn build_reporters(cfg: &Config) -> anyhow::Result<BTreeMap<String, Arc<dyn Reporter>>> {
    let mut out: BTreeMap<String, Arc<dyn Reporter>> = BTreeMap::new();
    for s in &cfg.sources {
        let reporter: Option<Arc<dyn Reporter>> = match s {
            SourceConfig::Http(h) => match h.report_target().map_err(anyhow::Error::msg)? {
                Some(t) => Some(Arc::new(HttpReporter::new(t)?)),
                None => None,
            },
            SourceConfig::Amqp(a) => match a.report_target() {
                Some(t) => Some(Arc::new(AmqpReporter::new(t)?)),
                None => None,
            },
            SourceConfig::Kafka(k) => match k.report_target() {
                Some(t) => Some(Arc::new(KafkaReporter::new(t)?)),
                None => None,
            },
        };
        if let Some(r) = reporter {
            out.insert(s.name().to_string(), r);
        }
    }
    Ok(out)
}

/// Start everything; returns once listeners are bound and the outbox is
/// open. Cancel `shutdown` to begin the drain.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<RunningBridge> {
    let prometheus = crate::telemetry::prometheus();
    metrics::gauge!("duvo_bridge_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let health = Health::default();
    health.set_unready("startup", "starting");

    let outbox = Outbox::open(outbox_config(&cfg))
        .await
        .with_context(|| format!("opening the outbox at {}", cfg.outbox.path.display()))?;
    let accounts = build_accounts(&cfg)?;
    let gate = accounts[0].gate.clone();
    preflight(&cfg, &accounts).await?;
    let reporters = build_reporters(&cfg)?;

    let (admin_listener, admin_addr) = admin::bind(&cfg.admin.listen)
        .await
        .with_context(|| format!("admin listener on {}", cfg.admin.listen))?;

    let (sources, http_addrs) = bind_sources(&cfg).await?;

    let intake_stop = CancellationToken::new();
    let batch_stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let ctx = SourceContext {
        outbox: outbox.clone(),
        health: health.clone(),
        stop: intake_stop.clone(),
        max_case_bytes: cfg
            .delivery
            .max_batch_bytes
            .saturating_sub(16 + cfg.delivery.batch_label_overhead()),
    };

    let operator = crate::operator::endpoints::router(crate::operator::endpoints::Operator {
        outbox: outbox.clone(),
        token: cfg.admin.token().map_err(|e| anyhow::anyhow!(e))?,
        redrive: accounts
            .iter()
            .map(|a| {
                (
                    a.scope.clone(),
                    crate::track::redrive::Redriver {
                        client: a.client.clone(),
                        gate: a.gate.clone(),
                        outbox: outbox.clone(),
                        retry: crate::retry::RetryPolicy {
                            initial: Duration::from_millis(500),
                            max: Duration::from_secs(30),
                            ..crate::retry::RetryPolicy::default()
                        },
                    },
                )
            })
            .collect(),
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        prometheus,
        health.clone(),
        Some(operator),
        admin_stop.clone(),
    ));
    let source_tasks = TaskTracker::new();
    for s in sources {
        let name = s.name().to_string();
        let ctx = ctx.clone();
        source_tasks.spawn(async move {
            if let Err(e) = s.run(ctx).await {
                tracing::error!(source = %name, error = %e, "source stopped with an error");
            }
        });
    }
    source_tasks.close();
    let batch_tasks = TaskTracker::new();
    let tracker_tasks = TaskTracker::new();
    for a in &accounts {
        let batcher = Batcher::new(
            outbox.clone(),
            a.client.clone(),
            a.gate.clone(),
            cfg.delivery.clone(),
        )
        .with_scope(a.scope.clone());
        tokio::spawn(crate::deliver::deadline_file::keep(
            &a.gate,
            crate::deliver::deadline_file::path(&cfg.outbox.path, &a.name),
            abort.clone(),
        ));
        batch_tasks.spawn(batcher.run(batch_stop.clone(), abort.clone()));
        if cfg.tracking.enabled {
            let tracker = CaseTracker::new(
                outbox.clone(),
                a.client.clone(),
                a.gate.clone(),
                TrackerConfig::from_config(&cfg.tracking),
            )
            .with_scope(a.scope.clone());
            tracker_tasks.spawn(tracker.run(intake_stop.clone()));
        }
    }
    batch_tasks.close();
    tracker_tasks.close();
    let report_stop = CancellationToken::new();
    let report_task = (!reporters.is_empty()).then(|| {
        let dispatcher = ReportDispatcher::new(
            outbox.clone(),
            reporters,
            DispatchConfig {
                concurrency: cfg.tracking.report_concurrency,
                retry: RetryPolicy {
                    initial: Duration::from_millis(cfg.tracking.report_retry_initial_ms),
                    max: Duration::from_millis(cfg.tracking.report_retry_max_ms),
                    ..RetryPolicy::default()
                },
            },
        );
        tokio::spawn(dispatcher.run(report_stop.clone(), abort.clone()))
    });
    metrics::gauge!("duvo_bridge_outbox_high_water_events")
        .set(cfg.outbox.high_water_events as f64);
    metrics::gauge!("duvo_bridge_outbox_high_water_bytes").set(cfg.outbox.high_water_bytes as f64);
    let housekeeping = tokio::spawn(housekeeping(
        outbox.clone(),
        cfg.outbox.path.clone(),
        health.clone(),
        admin_stop.clone(),
    ));
    health.set_ready("startup");
    tracing::info!(%admin_addr, sources = cfg.sources.len(), "duvo-bridge running");

    let drain = Drain {
        grace: cfg.shutdown.grace(),
        outbox: outbox.clone(),
        health: health.clone(),
        intake_stop,
        source_tasks,
        batch_stop,
        abort,
        batch_tasks,
        tracker_tasks,
        report_stop,
        report_task,
        admin_stop,
        admin_task,
        housekeeping,
    };
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        drain.run().await
    });

    Ok(RunningBridge {
        admin_addr,
        http_addrs,
        outbox,
        health,
        gate,
        gates: accounts
            .iter()
            .map(|a| (a.name.clone(), a.gate.clone()))
            .collect(),
        task,
    })
}

/// Check every configured queue with its account's key before any
/// listener opens (`[duvo] check_queues`).
async fn preflight(cfg: &Config, accounts: &[Account]) -> anyhow::Result<()> {
    use crate::duvo::config::QueueCheckMode;
    use crate::preflight::{AccountClient, QueueCheck};
    if cfg.duvo.check_queues == QueueCheckMode::Off {
        return Ok(());
    }
    let clients: Vec<AccountClient> = accounts
        .iter()
        .map(|a| AccountClient {
            name: a.name.clone(),
            client: a.client.clone(),
            gate: Some(a.gate.clone()),
        })
        .collect();
    let findings = crate::preflight::check_queues(cfg, &clients, Duration::from_secs(3)).await;
    let mut refused = Vec::new();
    for f in &findings {
        match &f.check {
            QueueCheck::Ok => {}
            QueueCheck::Refused { .. } => {
                tracing::error!("{}", f.describe());
                refused.push(f.describe());
            }
            QueueCheck::Unchecked(_) => tracing::warn!("{}", f.describe()),
        }
    }
    if !refused.is_empty() && cfg.duvo.check_queues == QueueCheckMode::Refuse {
        return Err(crate::preflight::QueuesRefused(refused).into());
    }
    Ok(())
}

/// One Duvo account's delivery side: its key's client and rate gate, and
/// the queues it serves.
struct Account {
    name: String,
    client: Arc<DuvoClient>,
    gate: RateGate,
    scope: crate::deliver::QueueScope,
}

/// Every account (the default first), each with its own client and gate;
/// a retry-after an earlier run was given still holds.
fn build_accounts(cfg: &Config) -> anyhow::Result<Vec<Account>> {
    let owners = cfg
        .queue_accounts()
        .map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let others: std::collections::BTreeSet<uuid::Uuid> = owners
        .iter()
        .filter(|(_, a)| *a != crate::duvo::config::DEFAULT_ACCOUNT)
        .map(|(q, _)| *q)
        .collect();
    let several = !cfg.duvo.accounts.is_empty();
    let mut out = Vec::new();
    for (name, d) in cfg.duvo.account_configs() {
        let api_key = d.resolve_api_key().map_err(|e| anyhow::anyhow!(e))?;
        let client = Arc::new(
            DuvoClient::new(ClientConfig {
                base_url: d.base_url.clone(),
                version_prefix: d.version_prefix.clone(),
                api_key,
                timeout: Duration::from_secs(d.timeout_secs),
            })
            .context("building the HTTP client")?,
        );
        let gate = RateGate::for_account(
            RateGateConfig {
                rate_per_minute: d.rate_limit_per_minute,
                burst: d.burst,
                share: d.rate_share,
                track_share: cfg.tracking.share,
                poll_share: cfg.tracking.poll_share,
                ..RateGateConfig::default()
            },
            &name,
        );
        crate::deliver::deadline_file::restore(
            &gate,
            &crate::deliver::deadline_file::path(&cfg.outbox.path, &name),
        );
        let scope = if !several {
            crate::deliver::QueueScope::All
        } else if name == crate::duvo::config::DEFAULT_ACCOUNT {
            crate::deliver::QueueScope::AllBut(Arc::new(others.clone()))
        } else {
            crate::deliver::QueueScope::Only(Arc::new(
                owners
                    .iter()
                    .filter(|(_, a)| **a == name)
                    .map(|(q, _)| *q)
                    .collect(),
            ))
        };
        if several {
            tracing::info!(account = %name, rate_per_minute = d.rate_limit_per_minute,
                queues = %owners.iter().filter(|(_, a)| **a == name).map(|(q, _)| q.to_string()).collect::<Vec<_>>().join(","),
                "Duvo account");
        }
        out.push(Account {
            name,
            client,
            gate,
            scope,
        });
    }
    Ok(out)
}

/// Bind every HTTP source's listener and build the broker sources, so a
/// bad address or setting fails the start before anything runs.
async fn bind_sources(
    cfg: &Config,
) -> anyhow::Result<(Vec<Box<dyn Source>>, Vec<(String, SocketAddr)>)> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    let mut http_addrs = Vec::new();
    for s in &cfg.sources {
        match s {
            SourceConfig::Http(h) => {
                let src = HttpSource::bind(h.clone()).await?;
                http_addrs.push((h.name.clone(), src.local_addr()));
                sources.push(Box::new(src));
            }
            SourceConfig::Amqp(a) => {
                sources.push(Box::new(AmqpSource::new(a.clone())?));
            }
            SourceConfig::Kafka(k) => {
                sources.push(Box::new(KafkaSource::new(k.clone())?));
            }
        }
    }

    Ok((sources, http_addrs))
}

/// Everything the drain stops, in order.
struct Drain {
    grace: Duration,
    outbox: Outbox,
    health: Health,
    intake_stop: CancellationToken,
    source_tasks: TaskTracker,
    batch_stop: CancellationToken,
    abort: CancellationToken,
    /// One batcher per account.
    batch_tasks: TaskTracker,
    /// One tracker per account (none with tracking off).
    tracker_tasks: TaskTracker,
    report_stop: CancellationToken,
    report_task: Option<JoinHandle<()>>,
    admin_stop: CancellationToken,
    admin_task: JoinHandle<std::io::Result<()>>,
    housekeeping: JoinHandle<()>,
}

impl Drain {
    /// The drain (see the module documentation), bounded by the grace
    /// period.
    async fn run(self) -> anyhow::Result<()> {
        let Drain {
            grace,
            outbox: ob,
            health: h,
            intake_stop,
            source_tasks,
            batch_stop,
            abort,
            batch_tasks,
            tracker_tasks,
            report_stop,
            report_task,
            admin_stop,
            admin_task,
            housekeeping,
        } = self;
        let deadline = Instant::now() + grace;
        h.set_unready("draining", "shutting down");
        intake_stop.cancel();
        let _ = tokio::time::timeout_at(deadline, source_tasks.wait()).await;
        // Keep delivering the backlog while the grace period allows,
        // leaving a quarter of it (at least 1 s) for in-flight requests.
        let claim_until = deadline - (grace / 4).max(Duration::from_secs(1)).min(grace);
        while Instant::now() < claim_until && ob.depth() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        batch_stop.cancel();
        let abort_at = abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            abort_at.cancel();
        });
        batch_tasks.wait().await;
        tracker_tasks.wait().await;
        // Reports already being sent get until the deadline; the rest stay
        // in the outbox for the next start.
        report_stop.cancel();
        if let Some(t) = report_task {
            let _ = t.await;
        }
        if let Err(e) = ob.flush().await {
            tracing::error!(error = %e, "final outbox flush failed");
        }
        tracing::info!(
            undelivered = ob.depth(),
            "drain finished; undelivered events stay in the outbox for the next start"
        );
        admin_stop.cancel();
        let _ = admin_task.await;
        housekeeping.abort();
        let _ = housekeeping.await;
        Ok(())
    }
}

/// Gauges, high-water readiness and retention purge.
async fn housekeeping(
    outbox: Outbox,
    path: std::path::PathBuf,
    health: Health,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_purge = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let s = outbox.stats();
        metrics::gauge!("duvo_bridge_outbox_depth").set(s.depth as f64);
        metrics::gauge!("duvo_bridge_outbox_bytes").set(outbox.size_on_disk() as f64);
        if let Ok((available, size)) = volume_space(&path) {
            metrics::gauge!("duvo_bridge_outbox_volume_available_bytes").set(available as f64);
            metrics::gauge!("duvo_bridge_outbox_volume_size_bytes").set(size as f64);
        }
        let oldest = outbox
            .ready_summary()
            .iter()
            .map(|r| r.oldest_received_at_ms)
            .min();
        let age = oldest
            .map(|t| crate::clock::now_ms().saturating_sub(t) as f64 / 1000.0)
            .unwrap_or(0.0);
        metrics::gauge!("duvo_bridge_outbox_oldest_event_age_seconds").set(age);
        if outbox.over_high_water() {
            metrics::gauge!("duvo_bridge_outbox_over_high_water").set(1.0);
            health.set_unready(
                "outbox",
                if outbox.disk_nearly_full() {
                    "its filesystem is below min_free_disk_mb"
                } else {
                    "over high-water mark"
                },
            );
        } else {
            metrics::gauge!("duvo_bridge_outbox_over_high_water").set(0.0);
            health.set_ready("outbox");
        }
        if last_purge.elapsed() >= Duration::from_secs(60) {
            last_purge = Instant::now();
            let ob = outbox.clone();
            let now = crate::clock::now_ms();
            match tokio::task::spawn_blocking(move || ob.purge_expired(now)).await {
                Ok(Ok(n)) if n > 0 => tracing::debug!(removed = n, "purged expired outbox entries"),
                Ok(Err(e)) => tracing::warn!(error = %e, "outbox purge failed"),
                _ => {}
            }
        }
    }
}

/// Bytes available to this (unprivileged) process and total size of the
/// filesystem holding `path`.
fn volume_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by
    // statvfs before it is read (only on success).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    let (frsize, avail, blocks) = (st.f_frsize as u64, st.f_bavail as u64, st.f_blocks as u64);
    Ok((avail * frsize, blocks * frsize))
}

/// `duvo-bridge run`: start, tell systemd, reload on SIGHUP (when the
/// configuration came from `config_path`), wait for a signal, drain.
pub async fn run(cfg: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // Before anything else: SIGHUP's default action would end the process.
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    let bridge = start(cfg.clone(), shutdown.clone()).await?;
    let (outbox, gate) = (bridge.outbox.clone(), bridge.gate.clone());
    crate::systemd::ready(&crate::systemd::status_line(&outbox, &gate, false));

    let background = CancellationToken::new();
    let supervisor = tokio::spawn(crate::systemd::supervise(
        outbox.clone(),
        gate.clone(),
        shutdown.clone(),
        background.clone(),
    ));
    #[cfg(unix)]
    if let Some(path) = config_path {
        let reloader = crate::reload::Reloader::new(path, cfg, bridge.gates.clone());
        tokio::spawn(crate::reload::on_sighup(hup, reloader, background.clone()));
    }
    let stopping = tokio::spawn({
        let shutdown = shutdown.clone();
        let background = background.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    crate::systemd::stopping(&crate::systemd::status_line(&outbox, &gate, true));
                }
                _ = background.cancelled() => {}
            }
        }
    });
    let result = bridge.wait().await;
    background.cancel();
    let _ = supervisor.await;
    let _ = stopping.await;
    result
}
