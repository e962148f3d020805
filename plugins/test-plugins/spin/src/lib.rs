//! test-spin
