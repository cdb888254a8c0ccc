//! Delivery: the batcher, the rate gate and reconciliation.
pub mod batcher;
pub mod config;
pub mod deadline_file;
pub mod gate;
pub mod reconcile;
