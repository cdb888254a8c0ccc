//! Event -> case mapping (filled in by the mapping work).
