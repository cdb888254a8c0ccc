//! Run the simulator standalone (until `duvo-bridge sim` is wired):
//! `cargo run --example sim -- --listen 127.0.0.1:8088 --rate-limit 1000`.

use clap::Parser;
use duvo_bridge::sim::{SimArgs, run_cli};

#[derive(Parser)]
#[command(about = "Local Duvo cases API simulator")]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_cli(Cli::parse().sim).await
}
