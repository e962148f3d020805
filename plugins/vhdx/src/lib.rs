//! vhdx: filled in by its implementation.
