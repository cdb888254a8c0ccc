//! Delivery: rate gate, retry policy, batcher.
pub mod batcher;
pub mod gate;
pub mod retry;
