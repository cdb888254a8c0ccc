//! The durable outbox (filled in by the outbox work).
