//! qcow2: filled in by its implementation.
