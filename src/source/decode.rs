//! Request body decoding (filled in by the mapping work).
