//! Delivery: rate gate, retry policy, batcher.
pub mod gate;
