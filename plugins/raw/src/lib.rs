//! haven-raw
