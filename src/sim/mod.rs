//! The local Duvo simulator (filled in by the simulator work).
