//! The `adapter` world of `haven:plugin@0.2.0`: a platform adapter.
//!
//! Implement [`PluginGuest`] and [`Platform`] for one type and call [`export_adapter!`]. Read the
//! operator's configuration with [`setting`] / [`required_setting`]; talk to the platform with
//! outgoing HTTP ([`bindings::wasi::http`]) to the hosts the instance was granted.

/// Generated bindings of the `adapter` world.
#[allow(missing_docs, clippy::all, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/haven-plugin@0.2.0",
        world: "haven:plugin/adapter@0.2.0",
        pub_export_macro: true,
        export_macro_name: "export_adapter_world",
        default_bindings_module: "haven_plugin_sdk::adapter::bindings",
        generate_all,
    });
}

pub use bindings::exports::haven::plugin0_1_0::plugin::{Guest as PluginGuest, PluginInfo};
pub use bindings::exports::haven::plugin0_2_0::platform::{
    self, DiskRef, Guest as Platform, Machine, Nic, PowerOffMode, PowerState, ReplicaDisk,
    ReplicaMachine, ReplicaNic, ReplicaSpec, Snapshot,
};
pub use bindings::haven::plugin0_1_0::buffers::Buffer;
pub use bindings::haven::plugin0_1_0::log::Level;
pub use bindings::haven::plugin0_1_0::types::{Error as WitError, Extent, OptionPair};

crate::error_conversions!(bindings::haven::plugin0_1_0::types::Error);

/// Writes a log line attributed to this plugin.
pub fn log(level: Level, message: &str) {
    bindings::haven::plugin0_1_0::log::log(level, message);
}

/// The value of setting `name`, or `None` when the operator did not set it.
pub fn setting(name: &str) -> Option<String> {
    bindings::haven::plugin0_2_0::settings::get(name)
}

/// The value of setting `name`, or an `invalid-argument` error naming it.
pub fn required_setting(name: &str) -> Result<String, WitError> {
    setting(name).ok_or_else(|| {
        WitError::InvalidArgument(format!(
            "setting `{name}` is required; add it to the adapter's `settings`"
        ))
    })
}

/// Fails with `invalid-argument` naming the first setting that is not in `known`.
pub fn refuse_unknown_settings(known: &[&str]) -> Result<(), WitError> {
    for name in bindings::haven::plugin0_2_0::settings::names() {
        if !known.contains(&name.as_str()) {
            return Err(WitError::InvalidArgument(format!(
                "unknown setting `{name}`; this adapter knows: {}",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

/// Exports `$ty` as the adapter: `$ty` implements [`PluginGuest`] and [`Platform`].
#[macro_export]
macro_rules! export_adapter {
    ($ty:ident) => {
        $crate::adapter::bindings::export_adapter_world!($ty with_types_in $crate::adapter::bindings);
    };
}
