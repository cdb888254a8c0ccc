//! Delivery: rate gate, retry policy, batcher.
pub mod gate;
pub mod retry;
