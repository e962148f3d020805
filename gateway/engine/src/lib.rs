//! Haven's replication engine: the process server, master target and configuration server
//! roles, built on the wire protocol, the store and the plugin host.
