//! test-http-probe
