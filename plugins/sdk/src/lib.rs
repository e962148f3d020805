//! The crate Haven plugin authors depend on.
//!
//! It bundles the WIT contract `haven:plugin@0.1.0` (from `wit/haven-plugin@0.1.0/` of the Haven
//! repository) and turns it into Rust types. Enable exactly one feature:
//!
//! - `writer`: a target writer (a disk image format). Implement [`writer::Disk`] and call
//!   [`export_writer!`], or, for a format written against [`haven_image::Format`], call
//!   [`export_format!`].
//! - `cloud-writer`: a target writer of `haven:plugin@0.2.0` that keeps disks in cloud
//!   storage: it reads its [`cloud_writer::setting`]s and reaches the granted hosts with
//!   [`http::request`]; implement the generated `writer` export ([`cloud_writer::WriterGuest`],
//!   [`cloud_writer::GuestDisk`]) and call [`export_cloud_writer!`].
//! - `adapter`: a platform adapter. Implement the generated
//!   `adapter::bindings::exports::haven::plugin::platform::Guest` and call [`export_adapter!`].
//!   Talk to the platform with [`http::request`] (blocking, to the hosts the instance was
//!   granted).
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `cdylib` is the component.
//! A plugin gets only the capabilities the operator grants it: a plugin importing a capability
//! it was not granted is refused at load, and a call outside a grant (a path leaving the storage
//! root, a write under a read-only grant, a host not on the HTTP list) fails with
//! `Error { kind: Denied, .. }` naming the grant. Every call has a deadline and a memory limit;
//! a trap throws the instance away with its open disks (see the contract's package comment).

pub use haven_image as image;
pub use haven_image::{Error, ErrorKind, Result};

#[cfg(any(
    all(feature = "writer", feature = "adapter"),
    all(feature = "writer", feature = "cloud-writer"),
    all(feature = "adapter", feature = "cloud-writer"),
))]
compile_error!(
    "haven-plugin-sdk: enable exactly one of the features `writer`, `cloud-writer` and `adapter`"
);

#[cfg(feature = "writer")]
pub mod writer;

#[cfg(feature = "adapter")]
pub mod adapter;

#[cfg(feature = "cloud-writer")]
pub mod cloud_writer;

#[cfg(any(feature = "adapter", feature = "cloud-writer"))]
pub mod http;

/// Converts between the WIT `error` variant of a world's bindings and [`haven_image::Error`].
/// Expanded once per world (each has its own generated `Error` type).
macro_rules! error_conversions {
    ($wit:path) => {
        /// Converts a Haven error into the contract's error variant.
        pub fn to_wit(e: $crate::Error) -> $wit {
            use $crate::ErrorKind as K;
            type W = $wit;
            match e.kind {
                K::InvalidArgument => W::InvalidArgument(e.message),
                K::NotFound => W::NotFound(e.message),
                K::AlreadyExists => W::AlreadyExists(e.message),
                K::Unsupported => W::Unsupported(e.message),
                K::Corrupt => W::Corrupt(e.message),
                K::Denied => W::Denied(e.message),
                K::Io => W::Io(e.message),
                K::Limit => W::Limit(e.message),
            }
        }

        /// Converts the contract's error variant into a Haven error.
        pub fn from_wit(e: $wit) -> $crate::Error {
            use $crate::ErrorKind as K;
            type W = $wit;
            let (kind, message) = match e {
                W::InvalidArgument(m) => (K::InvalidArgument, m),
                W::NotFound(m) => (K::NotFound, m),
                W::AlreadyExists(m) => (K::AlreadyExists, m),
                W::Unsupported(m) => (K::Unsupported, m),
                W::Corrupt(m) => (K::Corrupt, m),
                W::Denied(m) => (K::Denied, m),
                W::Io(m) => (K::Io, m),
                W::Platform(m) => (K::Io, format!("platform: {m}")),
                W::Limit(m) => (K::Limit, m),
            };
            $crate::Error::new(kind, message)
        }
    };
}
pub(crate) use error_conversions;
