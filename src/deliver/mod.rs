//! Delivery: the batcher and the rate gate.
pub mod batcher;
pub mod config;
pub mod gate;
