//! test-sockets
