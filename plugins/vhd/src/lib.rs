//! vhd: filled in by its implementation.
