//! test-traverse
