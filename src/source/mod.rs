//! Sources: turn outside input into outbox appends.
pub mod decode;
