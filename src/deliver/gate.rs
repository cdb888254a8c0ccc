//! The rate gate (filled in by the rate-gate work).
