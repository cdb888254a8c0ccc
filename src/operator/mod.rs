//! `duvo-bridge outbox ...`: the operator's window into an outbox, on a
//! stopped bridge's directory (`--path`, the command opens the outbox
//! itself) or on a running bridge (`--admin URL`, through the admin
//! listener's token-protected `/v1/outbox/` endpoints). Both run the same
//! [`Outbox`] methods, so a figure means the same thing either way.
//!
//! The token is read from an environment variable (never an argument: a
//! command line is visible to every user of the host in `ps`).
//!
//! [`endpoints`] is the server side of `--admin`.

pub mod endpoints;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::outbox::{
    Census, DeadLetter, DeadLetterSelector, EVENT_STATES, EventFilter, EventId, Outbox,
    OutboxConfig, OutboxError, Replayed, compact::Compacted, durable::MARKER_FILE,
};

/// Where the command looks: a stopped bridge's directory or a running one.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The outbox directory of a stopped bridge (`[outbox] path`).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// A running bridge's admin listener, e.g. `http://127.0.0.1:9090`
    /// (its `[admin] token_env` must be set).
    #[arg(long)]
    pub admin: Option<String>,
}

/// The admin token for `--admin`.
#[derive(Args, Debug, Clone)]
pub struct TokenArg {
    /// Environment variable holding the admin token (`[admin] token_env`
    /// of the bridge).
    #[arg(long, default_value = "DUVO_BRIDGE_ADMIN_TOKEN")]
    pub token_env: String,
}

/// Which dead letters a command acts on.
#[derive(Args, Debug, Clone, Default)]
pub struct DeadLetterArgs {
    /// A dead letter by id (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<EventId>,
    /// Every dead letter matching the filters below.
    #[arg(long)]
    pub all: bool,
    /// Only letters for this Duvo queue.
    #[arg(long)]
    pub queue: Option<Uuid>,
    /// Only letters from this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only letters the API refused with this error type.
    #[arg(long)]
    pub error: Option<String>,
    /// Only letters the API refused with this HTTP status.
    #[arg(long)]
    pub status: Option<u16>,
}

impl DeadLetterArgs {
    fn selector(&self, listing: bool) -> DeadLetterSelector {
        DeadLetterSelector {
            ids: self.ids.clone(),
            // A listing with no ids lists everything that matches.
            all: self.all || (listing && self.ids.is_empty()),
            queue: self.queue,
            source: self.source.clone(),
            error: self.error.clone(),
            status: self.status,
        }
    }
}

/// `duvo-bridge outbox ...`
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Check every record of a stopped bridge's outbox and the references
    /// between them; changes nothing. Exit 0 when sound, 1 naming each
    /// damaged record, 2 when the database cannot be opened (also while a
    /// bridge holds it).
    Verify {
        /// The outbox directory (`[outbox] path`).
        #[arg(long)]
        path: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Events by state, queue and source, the oldest waiting, batches in
    /// flight, tracked cases by phase, pending reports, dead letters and
    /// bytes on disk (one scan of every record).
    Stats {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
        /// Print the census as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy the outbox's records into a fresh file and delete the old
    /// one, giving back the disk settled and purged events left (a running
    /// bridge does it by itself past `[outbox] compact_min_mb`; this is
    /// for now). Prints sizes before and after.
    Compact {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
    /// One event's whole record as JSON.
    Inspect {
        /// The event id (as `POST /v1/events` answered it).
        id: EventId,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Event records as JSON lines, in id order.
    List {
        /// stored, batched, delivered or rejected.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(EVENT_STATES))]
        state: Option<String>,
        #[arg(long)]
        queue: Option<Uuid>,
        #[arg(long)]
        source: Option<String>,
        /// Only events after this id (paging: the last id of a page).
        #[arg(long)]
        after: Option<EventId>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Events the API refused for good.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

/// `duvo-bridge outbox dead-letters ...`
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// A table of the dead letters (all, or those selected).
    List {
        #[command(flatten)]
        select: DeadLetterArgs,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
    /// NDJSON, one letter per line: the event's case, the API's error and
    /// when (all, or those selected).
    Export {
        #[command(flatten)]
        select: DeadLetterArgs,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Send the selected letters again (`--id` or `--all` with filters):
    /// each becomes a new event, delivered oldest first; a letter replayed
    /// twice creates one case.
    Replay {
        #[command(flatten)]
        select: DeadLetterArgs,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Remove the selected letters for good (asks first unless `--yes`).
    Purge {
        #[command(flatten)]
        select: DeadLetterArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        token: TokenArg,
    },
}

/// `duvo-bridge cases ...`
#[derive(Debug, Subcommand)]
pub enum CasesCommand {
    /// Re-drive a queue's failed cases in Duvo through a running bridge
    /// (`POST .../cases/bulk-retry`, 100 ids a call, under its rate gate);
    /// the bridge follows the ones it created again and reports their next
    /// ending to their source.
    Retry {
        /// The Duvo queue.
        #[arg(long)]
        queue: Uuid,
        /// Statuses to retry (repeatable): failed (default) or canceled.
        #[arg(long = "status", value_parser = ["failed", "canceled"])]
        statuses: Vec<String>,
        /// Only cases that failed at or after this time (RFC 3339, e.g.
        /// 2026-12-01T08:00:00Z).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only cases with this label, `key=value` (repeatable: all must
        /// match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<crate::duvo::Label>,
        /// Count what would be retried; retry nothing.
        #[arg(long)]
        dry_run: bool,
        /// The running bridge's admin listener, e.g. `http://127.0.0.1:9090`.
        #[arg(long)]
        admin: String,
        #[command(flatten)]
        token: TokenArg,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_label(s: &str) -> Result<crate::duvo::Label, String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok(crate::duvo::Label {
            key: k.to_string(),
            value: v.to_string(),
        }),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Run `cases retry`; the exit status (1 when nothing matched).
pub async fn run_cases(cmd: CasesCommand) -> anyhow::Result<i32> {
    let CasesCommand::Retry {
        queue,
        statuses,
        since,
        labels,
        dry_run,
        admin,
        token,
        json,
    } = cmd;
    let target = Target {
        path: None,
        admin: Some(admin),
    };
    let conn = Conn::open(&target, &token).await?;
    let statuses = statuses
        .iter()
        .map(|s| serde_json::from_value(serde_json::Value::String(s.clone())))
        .collect::<Result<Vec<crate::duvo::CaseStatus>, _>>()?;
    let req = crate::track::redrive::RetryCases {
        queue,
        statuses,
        since,
        labels,
        dry_run,
    };
    let b = conn
        .call(
            reqwest::Method::POST,
            "/v1/cases/retry",
            &[],
            Some(serde_json::to_value(&req)?),
        )
        .await?;
    let out: crate::track::redrive::RetryOutcome = serde_json::from_slice(&b)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if dry_run {
        println!(
            "{} cases match (dry run, nothing retried; {} requests)",
            out.matched, out.requests
        );
    } else {
        println!(
            "{} matched, {} retried ({} followed again by this bridge, {} not), {} skipped by the API; {} requests",
            out.matched,
            out.retried.len(),
            out.followed,
            out.not_followed,
            out.skipped.len(),
            out.requests
        );
    }
    if out.truncated {
        eprintln!(
            "stopped at {} cases: run again for the rest",
            crate::track::redrive::MAX_CASES
        );
    }
    Ok(i32::from(out.matched == 0))
}

/// A connection to an outbox: opened here, or a running bridge's admin.
enum Conn {
    Local(Outbox),
    Admin {
        client: reqwest::Client,
        base: String,
        token: String,
    },
}

impl Conn {
    async fn open(target: &Target, token: &TokenArg) -> anyhow::Result<Conn> {
        if let Some(path) = &target.path {
            return Ok(Conn::Local(open_stopped(path).await?));
        }
        let base = target
            .admin
            .as_deref()
            .ok_or_else(|| anyhow!("give --path or --admin"))?
            .trim_end_matches('/')
            .to_string();
        let token = std::env::var(&token.token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "--admin needs the admin token in the environment variable {} (--token-env)",
                    token.token_env
                )
            })?;
        let client = reqwest::Client::builder()
            // A re-drive of a large queue waits for its rate-gate permits.
            .timeout(Duration::from_secs(3600))
            .build()
            .context("building the HTTP client")?;
        Ok(Conn::Admin {
            client,
            base,
            token,
        })
    }

    /// An operator endpoint's answer body, or its error as the bridge put it.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<bytes::Bytes> {
        let Conn::Admin {
            client,
            base,
            token,
        } = self
        else {
            bail!("not an admin connection");
        };
        let mut req = client
            .request(method, format!("{base}{path}"))
            .bearer_auth(token)
            .query(query);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling {base}{path}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the answer")?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{base}{path}: {status}: {msg}");
        }
        Ok(bytes)
    }

    async fn census(&self) -> anyhow::Result<Census> {
        match self {
            Conn::Local(o) => Ok(blocking(o, |o| o.census()).await?),
            _ => Ok(serde_json::from_slice(
                &self
                    .call(reqwest::Method::GET, "/v1/outbox/stats", &[], None)
                    .await?,
            )?),
        }
    }

    async fn inspect(&self, id: EventId) -> anyhow::Result<Option<serde_json::Value>> {
        match self {
            Conn::Local(o) => Ok(blocking(o, move |o| o.inspect_event(id)).await?),
            Conn::Admin { .. } => {
                let path = format!("/v1/outbox/events/{id}");
                match self.call(reqwest::Method::GET, &path, &[], None).await {
                    Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
                    Err(e) if e.to_string().contains(": 404 Not Found:") => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn list(
        &self,
        filter: EventFilter,
        limit: usize,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        match self {
            Conn::Local(o) => Ok(blocking(o, move |o| o.list_events(&filter, limit)).await?),
            Conn::Admin { .. } => {
                let mut q = vec![("limit", limit.to_string())];
                if let Some(s) = filter.state {
                    q.push(("state", s));
                }
                if let Some(v) = filter.queue {
                    q.push(("queue", v.to_string()));
                }
                if let Some(v) = filter.source {
                    q.push(("source", v));
                }
                if let Some(v) = filter.after {
                    q.push(("after", v.to_string()));
                }
                let b = self
                    .call(reqwest::Method::GET, "/v1/outbox/events", &q, None)
                    .await?;
                Ok(serde_json::from_slice(&b)?)
            }
        }
    }

    async fn dead_letters(&self, sel: DeadLetterSelector) -> anyhow::Result<Vec<DeadLetter>> {
        match self {
            Conn::Local(o) => Ok(blocking(o, move |o| o.dead_letters_selected(&sel)).await?),
            Conn::Admin { .. } => {
                let mut q = Vec::new();
                if !sel.ids.is_empty() {
                    let ids: Vec<String> = sel.ids.iter().map(ToString::to_string).collect();
                    q.push(("ids", ids.join(",")));
                }
                if let Some(v) = sel.queue {
                    q.push(("queue", v.to_string()));
                }
                if let Some(v) = &sel.source {
                    q.push(("source", v.clone()));
                }
                if let Some(v) = &sel.error {
                    q.push(("error", v.clone()));
                }
                if let Some(v) = sel.status {
                    q.push(("status", v.to_string()));
                }
                let b = self
                    .call(reqwest::Method::GET, "/v1/outbox/dead-letters", &q, None)
                    .await?;
                let mut out = Vec::new();
                for line in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                    out.push(serde_json::from_slice(line)?);
                }
                Ok(out)
            }
        }
    }

    async fn replay(&self, sel: DeadLetterSelector) -> anyhow::Result<Vec<Replayed>> {
        match self {
            Conn::Local(o) => Ok(o.replay_dead_letters(&sel).await?),
            Conn::Admin { .. } => {
                let b = self
                    .call(
                        reqwest::Method::POST,
                        "/v1/outbox/dead-letters/replay",
                        &[],
                        Some(serde_json::to_value(&sel)?),
                    )
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&b)?;
                Ok(serde_json::from_value(v["replayed"].clone())?)
            }
        }
    }

    async fn compact(&self) -> anyhow::Result<Compacted> {
        match self {
            Conn::Local(o) => Ok(blocking(o, |o| o.compact()).await?),
            Conn::Admin { .. } => {
                let b = self
                    .call(reqwest::Method::POST, "/v1/outbox/compact", &[], None)
                    .await?;
                Ok(serde_json::from_slice(&b)?)
            }
        }
    }

    async fn purge(&self, sel: DeadLetterSelector) -> anyhow::Result<Vec<EventId>> {
        match self {
            Conn::Local(o) => Ok(o.purge_dead_letters(&sel).await?),
            Conn::Admin { .. } => {
                let mut body = serde_json::to_value(&sel)?;
                body["confirm"] = serde_json::Value::Bool(true);
                let b = self
                    .call(
                        reqwest::Method::POST,
                        "/v1/outbox/dead-letters/purge",
                        &[],
                        Some(body),
                    )
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&b)?;
                Ok(serde_json::from_value(v["purged"].clone())?)
            }
        }
    }
}

/// Run an outbox scan on the blocking pool.
async fn blocking<T: Send + 'static>(
    o: &Outbox,
    f: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    let o = o.clone();
    tokio::task::spawn_blocking(move || f(&o))
        .await
        .map_err(|e| OutboxError::Task(e.to_string()))?
}

/// Open a stopped bridge's outbox. A directory that holds no outbox is an
/// error (opening would create an empty one and hide the typo).
async fn open_stopped(path: &Path) -> anyhow::Result<Outbox> {
    if !path.join(MARKER_FILE).exists() && !path.join("db").exists() {
        bail!("{}: no outbox here (no {MARKER_FILE})", path.display());
    }
    wait_unlocked(path).await?;
    Outbox::open(OutboxConfig::new(path))
        .await
        .map_err(|e| match e {
            OutboxError::InUse { .. } => anyhow!(
                "{}: a running bridge holds this outbox; use --admin URL",
                path.display()
            ),
            e => anyhow!("{}: cannot open the outbox: {e}", path.display()),
        })
}

/// Fail fast when a running bridge holds the outbox (sled takes an
/// exclusive `flock` on its `db` file): `Outbox::open` would wait 10 s
/// for a bridge that is stopping. A bridge that just stopped gets 2 s.
async fn wait_unlocked(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let sled_dir = crate::outbox::compact::current_dir(path);
    let Ok(file) = std::fs::File::open(sled_dir.join("db")) else {
        return Ok(()); // let open say what is wrong
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        // SAFETY: flock on a descriptor this function owns; the lock goes
        // with the descriptor when `file` is dropped.
        let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        if !held {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{}: a running bridge holds this outbox; use --admin URL",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run one `outbox` subcommand other than `verify`; the exit status.
pub async fn run(cmd: OutboxCommand) -> anyhow::Result<i32> {
    match cmd {
        OutboxCommand::Verify { .. } => bail!("verify runs without the async runtime"),
        OutboxCommand::Stats {
            target,
            token,
            json,
        } => {
            let c = Conn::open(&target, &token).await?.census().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", render_census(&c));
            }
            Ok(0)
        }
        OutboxCommand::Compact { target, token } => {
            let c = Conn::open(&target, &token).await?.compact().await?;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "compacted: {:.1} MiB -> {:.1} MiB ({} records, generation {}, writers held {} ms, {} ms in all)",
                mib(c.bytes_before),
                mib(c.bytes_after),
                c.records,
                c.generation,
                c.pause_ms,
                c.took_ms
            );
            Ok(0)
        }
        OutboxCommand::Inspect { id, target, token } => {
            match Conn::open(&target, &token).await?.inspect(id).await? {
                Some(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(0)
                }
                None => {
                    eprintln!("no event {id} (unknown, or purged after its retention)");
                    Ok(1)
                }
            }
        }
        OutboxCommand::List {
            state,
            queue,
            source,
            after,
            limit,
            target,
            token,
        } => {
            let filter = EventFilter {
                state,
                queue,
                source,
                after,
            };
            let conn = Conn::open(&target, &token).await?;
            for v in conn.list(filter, limit).await? {
                println!("{}", serde_json::to_string(&v)?);
            }
            Ok(0)
        }
        OutboxCommand::DeadLetters(cmd) => dead_letters(cmd).await,
    }
}

async fn dead_letters(cmd: DeadLetterCommand) -> anyhow::Result<i32> {
    match cmd {
        DeadLetterCommand::List {
            select,
            target,
            token,
        } => {
            let letters = Conn::open(&target, &token)
                .await?
                .dead_letters(select.selector(true))
                .await?;
            print!("{}", render_dead_letters(&letters));
            Ok(0)
        }
        DeadLetterCommand::Export {
            select,
            output,
            target,
            token,
        } => {
            let letters = Conn::open(&target, &token)
                .await?
                .dead_letters(select.selector(true))
                .await?;
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            for d in &letters {
                serde_json::to_writer(&mut out, d)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            if output.is_some() {
                eprintln!("{} dead letters exported", letters.len());
            }
            Ok(0)
        }
        DeadLetterCommand::Replay {
            select,
            target,
            token,
        } => {
            let sel = checked_selection(&select)?;
            let replayed = Conn::open(&target, &token).await?.replay(sel).await?;
            for r in &replayed {
                if r.already {
                    println!(
                        "dead letter {} was replayed before, as event {}",
                        r.dead_letter, r.event
                    );
                } else {
                    println!("dead letter {} -> event {}", r.dead_letter, r.event);
                }
            }
            println!("{} replayed", replayed.len());
            Ok(i32::from(replayed.is_empty()))
        }
        DeadLetterCommand::Purge {
            select,
            yes,
            target,
            token,
        } => {
            let sel = checked_selection(&select)?;
            let conn = Conn::open(&target, &token).await?;
            let letters = conn.dead_letters(sel.clone()).await?;
            if letters.is_empty() {
                println!("no dead letter selected");
                return Ok(1);
            }
            if !yes && !confirm(letters.len())? {
                println!("nothing purged");
                return Ok(1);
            }
            // Exactly the letters shown, even if more arrived meanwhile.
            let ids = DeadLetterSelector {
                ids: letters.iter().map(|d| d.id).collect(),
                ..sel
            };
            let ids = DeadLetterSelector { all: false, ..ids };
            let purged = conn.purge(ids).await?;
            println!("{} purged", purged.len());
            Ok(0)
        }
    }
}

fn checked_selection(a: &DeadLetterArgs) -> anyhow::Result<DeadLetterSelector> {
    if a.ids.is_empty() && !a.all {
        bail!("select dead letters with --id ID (repeatable) or --all (with optional filters)");
    }
    Ok(a.selector(false))
}

/// Ask on the terminal; refuse when there is none (use `--yes` in scripts).
fn confirm(n: usize) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{n} dead letters selected: confirm with --yes (no terminal to ask on)");
    }
    eprint!("purge {n} dead letters for good? type 'yes': ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The census as an operator reads it.
pub fn render_census(c: &Census) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!("events:           {}", counts(&c.events)));
    line(format!(
        "oldest waiting:   {}",
        c.oldest_waiting_age_secs
            .map_or("-".into(), |a| format!("{a:.1} s ago"))
    ));
    line(format!(
        "batches:          {} in flight ({} events, most attempts {})",
        c.batches, c.batched_events, c.max_batch_attempts
    ));
    line(format!("tracked cases:    {}", counts(&c.tracked)));
    line(format!("pending reports:  {}", counts(&c.pending_reports)));
    line(format!("dead reports:     {}", c.dead_reports));
    line(format!("dead letters:     {}", c.dead_letters_total));
    line(format!("corrupt records:  {}", c.corrupt));
    line(format!(
        "bytes on disk:    {}",
        human_bytes(c.bytes_on_disk)
    ));
    for (q, m) in &c.queues {
        let dead = c.dead_letters.get(q).copied().unwrap_or(0);
        line(format!("queue {q}: {}; {dead} dead letters", counts(m)));
    }
    for (src, m) in &c.sources {
        line(format!("source {src}: {}", counts(m)));
    }
    s
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / (1u64 << 10) as f64),
        b => format!("{b} B"),
    }
}

fn render_dead_letters(letters: &[DeadLetter]) -> String {
    let mut s = format!(
        "{:<12} {:<36} {:<12} {:<6} {:<22} {:<20} title / message\n",
        "id", "queue", "source", "status", "error", "rejected at"
    );
    for d in letters {
        let at = chrono::DateTime::from_timestamp_millis(d.rejected_at_ms as i64)
            .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
        s.push_str(&format!(
            "{:<12} {:<36} {:<12} {:<6} {:<22} {:<20} {} / {}\n",
            d.id.to_string(),
            d.queue_id.to_string(),
            d.source,
            d.status,
            d.error,
            at,
            d.case.title,
            d.message
        ));
    }
    s.push_str(&format!("{} dead letters\n", letters.len()));
    s
}
