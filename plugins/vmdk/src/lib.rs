//! vmdk: filled in by its implementation.
