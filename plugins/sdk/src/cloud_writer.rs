//! The `target-writer` world of `haven:plugin@0.2.0`: a disk image format kept in cloud storage.
//!
//! It exports the same `writer` as 0.1.0 (disks by path, read, write, write-zeroes, flush,
//! allocation map) and may import settings and outgoing HTTP: an account's endpoint, name and
//! key come from the operator's [`setting`]s, and requests go with [`crate::http::request`] to
//! the hosts the instance was granted. Implement [`PluginGuest`], [`WriterGuest`] and
//! [`GuestDisk`] for your types and call [`export_cloud_writer!`].

/// Generated bindings of the 0.2.0 `target-writer` world.
#[allow(missing_docs, clippy::all, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/haven-plugin@0.2.0",
        world: "haven:plugin/target-writer@0.2.0",
        pub_export_macro: true,
        export_macro_name: "export_cloud_writer_world",
        default_bindings_module: "haven_plugin_sdk::cloud_writer::bindings",
        generate_all,
    });
}

pub use bindings::exports::haven::plugin0_1_0::plugin::{Guest as PluginGuest, PluginInfo};
pub use bindings::exports::haven::plugin0_1_0::writer::{
    Access, CreateOptions, Disk, DiskInfo, ExtentState, Guest as WriterGuest, GuestDisk, MapEntry,
};
pub use bindings::haven::plugin0_1_0::buffers::Buffer;
pub use bindings::haven::plugin0_1_0::log::Level;
pub use bindings::haven::plugin0_1_0::types::{Error as WitError, OptionPair};

crate::error_conversions!(bindings::haven::plugin0_1_0::types::Error);

/// Writes a log line attributed to this plugin.
pub fn log(level: Level, message: &str) {
    bindings::haven::plugin0_1_0::log::log(level, message);
}

/// Milliseconds since the Unix epoch, by the host's clock.
pub fn now_ms() -> u64 {
    bindings::haven::plugin0_1_0::clock::now_ms()
}

/// The value of setting `name`, or `None` when the operator did not set it.
pub fn setting(name: &str) -> Option<String> {
    bindings::haven::plugin0_2_0::settings::get(name)
}

/// The value of setting `name`, or an `invalid-argument` error naming it.
pub fn required_setting(name: &str) -> Result<String, WitError> {
    setting(name).ok_or_else(|| {
        WitError::InvalidArgument(format!(
            "setting `{name}` is required; add it to the writer's `settings`"
        ))
    })
}

/// Fails with `invalid-argument` naming the first setting that is not in `known`.
pub fn refuse_unknown_settings(known: &[&str]) -> Result<(), WitError> {
    for name in bindings::haven::plugin0_2_0::settings::names() {
        if !known.contains(&name.as_str()) {
            return Err(WitError::InvalidArgument(format!(
                "unknown setting `{name}`; this writer knows: {}",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

/// Exports `$ty` (implementing [`PluginGuest`] and [`WriterGuest`], its disk type
/// [`GuestDisk`]) as the plugin's `target-writer` world.
#[macro_export]
macro_rules! export_cloud_writer {
    ($ty:ident) => {
        $crate::cloud_writer::bindings::export_cloud_writer_world!($ty with_types_in $crate::cloud_writer::bindings);
    };
}
