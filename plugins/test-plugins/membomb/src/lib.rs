//! test-membomb
