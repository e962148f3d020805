//! Haven's HTTP API (`/v1`), console and metrics, over the engine.
