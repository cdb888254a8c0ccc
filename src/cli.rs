//! Command line: `run`, `validate`, `sim`, `demo`, `outbox`, `cases` (the
//! operator's commands live in [`crate::operator`]).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, EXIT_BAD_CONFIG};
use crate::operator::{CasesCommand, OutboxCommand};
use crate::outbox::OutboxError;

/// Exit status when the outbox was found to have lost data (sysexits'
/// `EX_DATAERR`): restarting cannot fix it, so the systemd unit lists it in
/// `RestartPreventExitStatus` next to 64.
pub const EXIT_OUTBOX_LOST: i32 = 65;

#[derive(Parser, Debug)]
#[command(
    name = "duvo-bridge",
    version,
    about = "Durable, rate-limited bridge from Kafka, RabbitMQ and webhooks into Duvo cases"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the bridge with a configuration file.
    Run {
        /// Path of the TOML configuration.
        #[arg(long, short, env = "DUVO_BRIDGE_CONFIG")]
        config: PathBuf,
        /// Print the effective configuration (secrets redacted) and exit.
        #[arg(long)]
        print_config: bool,
        /// Start even though the outbox holds less than its marker says was
        /// durable (opened empty after a power cut, a wiped or swapped
        /// volume). Without it such an outbox is refused. Logged and counted
        /// (`duvo_bridge_outbox_data_loss_accepted_total`).
        #[arg(long)]
        accept_outbox_loss: bool,
        /// Start even though a queue is missing (404) or refused to its
        /// account's key (401/403) at the start-up check (logged; the
        /// events for it wait in the outbox). Same as `[duvo] check_queues
        /// = "warn"`.
        #[arg(long)]
        start_anyway: bool,
    },
    /// Check a configuration file; print every problem; exit 64 if any.
    Validate {
        #[arg(long, short, env = "DUVO_BRIDGE_CONFIG")]
        config: PathBuf,
        /// Also ask the API: every queue a source or route names must
        /// exist and be usable with its account's key (`GET /queues/{id}`).
        /// Exit 64 naming each one that is not; 69 when the API could not
        /// be asked.
        #[arg(long)]
        online: bool,
    },
    /// Run the local Duvo cases API simulator.
    Sim(crate::sim::SimArgs),
    /// The newcomer's tour: simulator + bridge in-process, a few thousand
    /// sample orders, progress bars and a summary.
    Demo(crate::demo::DemoArgs),
    /// Look into an outbox and repair it: census, records, dead letters
    /// (on a stopped bridge's `--path` or a running bridge's `--admin`).
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Act on cases in Duvo through a running bridge.
    #[command(subcommand)]
    Cases(CasesCommand),
    /// A live view of a running bridge from its `/metrics`: intake and
    /// cases per second by source and queue, backlog and oldest age, budget
    /// use and 429s, tracked cases, failures and reports; `q` quits.
    Top {
        /// The bridge's admin listener, e.g. `http://127.0.0.1:9090`.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Seconds between two scrapes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one view (two scrapes `--interval` apart) as text and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `duvo-bridge completions bash >
    /// /etc/bash_completion.d/duvo-bridge`.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (`duvo-bridge.1` and one per subcommand, e.g.
    /// `duvo-bridge-outbox-dead-letters-replay.1`) into a directory.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// Parse arguments and run; returns the process exit code.
pub fn main() -> i32 {
    crate::allocator::tune();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("duvo-bridge")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duvo-bridge: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match cli.command {
        Command::Validate { config, online } => {
            match Config::load_with_env(&config, crate::config::process_env()) {
                Ok((cfg, overrides)) => {
                    if overrides.is_empty() {
                        println!("{}: OK", config.display());
                    } else {
                        println!(
                            "{}: OK (with environment overrides {})",
                            config.display(),
                            overrides.join(", ")
                        );
                    }
                    if online {
                        rt.block_on(validate_online(&cfg))
                    } else {
                        0
                    }
                }
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    EXIT_BAD_CONFIG
                }
            }
        }
        Command::Run {
            config,
            print_config,
            accept_outbox_loss,
            start_anyway,
        } => {
            let (mut cfg, overrides) =
                match Config::load_with_env(&config, crate::config::process_env()) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{}: {e}", config.display());
                        return EXIT_BAD_CONFIG;
                    }
                };
            if print_config {
                print!("{}", cfg.to_redacted_toml());
                return 0;
            }
            cfg.outbox.accept_data_loss = accept_outbox_loss;
            if start_anyway && cfg.duvo.check_queues == crate::duvo::config::QueueCheckMode::Refuse
            {
                cfg.duvo.check_queues = crate::duvo::config::QueueCheckMode::Warn;
            }
            crate::telemetry::init_logging(&cfg.log);
            if !overrides.is_empty() {
                // Names only: a value may be a secret.
                tracing::info!(variables = %overrides.join(","), "configuration overridden from the environment");
            }
            match rt.block_on(crate::app::run(cfg, Some(config))) {
                Ok(()) => 0,
                Err(e) => {
                    // Logging writes to stderr already: one line, not two.
                    tracing::error!(error = format!("{e:#}"), "duvo-bridge stopped");
                    if e.chain().any(|c| {
                        c.downcast_ref::<crate::preflight::QueuesRefused>()
                            .is_some()
                    }) {
                        return EXIT_BAD_CONFIG;
                    }
                    let lost = e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<OutboxError>(),
                            Some(OutboxError::DataLost { .. } | OutboxError::Unopenable { .. })
                        )
                    });
                    if lost { EXIT_OUTBOX_LOST } else { 1 }
                }
            }
        }
        Command::Sim(args) => {
            crate::telemetry::init_logging(&Default::default());
            match rt.block_on(crate::sim::run_cli(args)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("duvo-bridge sim: {e:#}");
                    1
                }
            }
        }
        Command::Outbox(OutboxCommand::Verify { path, json }) => {
            match crate::outbox::verify(&path) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).expect("a report serialises")
                        );
                    } else {
                        let counts: Vec<String> = report
                            .records
                            .iter()
                            .map(|(k, n)| format!("{n} {k}"))
                            .collect();
                        println!("{}: {}", path.display(), counts.join(", "));
                        for p in &report.problems {
                            println!("DAMAGED {}: {}", p.key, p.problem);
                        }
                        if report.problems.is_empty() {
                            println!("OK");
                        }
                    }
                    i32::from(!report.problems.is_empty())
                }
                Err(e) => {
                    eprintln!("{}: cannot open the outbox: {e}", path.display());
                    2
                }
            }
        }
        Command::Outbox(cmd) => match rt.block_on(crate::operator::run(cmd)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("duvo-bridge outbox: {e:#}");
                2
            }
        },
        Command::Cases(cmd) => match rt.block_on(crate::operator::run_cases(cmd)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("duvo-bridge cases: {e:#}");
                2
            }
        },
        Command::Top {
            admin,
            interval,
            once,
        } => {
            let every = std::time::Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
            match rt.block_on(crate::top::run(&admin, every, once)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("duvo-bridge top: {e:#}");
                    2
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "duvo-bridge", &mut std::io::stdout());
            0
        }
        Command::Man { dir } => match write_man_pages(&dir) {
            Ok(n) => {
                println!("{n} man pages written to {}", dir.display());
                0
            }
            Err(e) => {
                eprintln!("duvo-bridge man: {e}");
                1
            }
        },
        Command::Demo(args) => match rt.block_on(crate::demo::run(args)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("duvo-bridge demo: {e:#}");
                1
            }
        },
    }
}

/// Write the man pages generated from the CLI definition into `dir`;
/// how many.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd.clone(), dir)?;
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count())
}

/// `validate --online`: each queue with its account; the exit status (64
/// when one is refused, 69 `EX_UNAVAILABLE` when the API could not say).
async fn validate_online(cfg: &Config) -> i32 {
    use crate::preflight::QueueCheck;
    let clients = match crate::preflight::clients(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("online check: {e}");
            return EXIT_BAD_CONFIG;
        }
    };
    let findings =
        crate::preflight::check_queues(cfg, &clients, std::time::Duration::from_secs(10)).await;
    let (mut refused, mut unchecked) = (0, 0);
    for f in &findings {
        match f.check {
            QueueCheck::Ok => println!("{}", f.describe()),
            QueueCheck::Refused { .. } => {
                refused += 1;
                eprintln!("{}", f.describe());
            }
            QueueCheck::Unchecked(_) => {
                unchecked += 1;
                eprintln!("{}", f.describe());
            }
        }
    }
    if refused > 0 {
        EXIT_BAD_CONFIG
    } else if unchecked > 0 {
        69
    } else {
        println!("online: every queue is usable with its account");
        0
    }
}
