//! duvo-bridge: a durable, rate-limited bridge from Kafka, RabbitMQ and
//! webhooks into Duvo cases. See `ARCHITECTURE.md` for the bird's-eye view.
//!
//! `main.rs` is a thin shell over [`cli::main`]; everything else lives here so
//! tests and the demo can start any part in-process.

pub mod admin;
pub mod allocator;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deliver;
pub mod demo;
pub mod duvo;
pub mod encoding;
pub mod kafka;
pub mod listener;
pub mod mapping;
pub mod operator;
pub mod outbox;
pub mod preflight;
pub mod raw_json;
pub mod reload;
pub mod report;
pub mod retry;
pub mod routing;
pub mod secret;
pub mod shutdown;
pub mod sim;
pub mod source;
pub mod systemd;
pub mod telemetry;
pub mod top;
pub mod track;
