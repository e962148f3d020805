//! The `adapter` world: a platform adapter.

/// Generated bindings of the `adapter` world.
#[allow(missing_docs, clippy::all, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/haven-plugin@0.1.0",
        world: "adapter",
        pub_export_macro: true,
        export_macro_name: "export_adapter_world",
        default_bindings_module: "haven_plugin_sdk::adapter::bindings",
        generate_all,
    });
}

pub use bindings::haven::plugin::buffers::Buffer;
pub use bindings::haven::plugin::types::Error as WitError;

crate::error_conversions!(bindings::haven::plugin::types::Error);

/// Writes a log line attributed to this plugin.
pub fn log(level: bindings::haven::plugin::log::Level, message: &str) {
    bindings::haven::plugin::log::log(level, message);
}

/// Exports `$ty` as the adapter: `$ty` implements the generated
/// `exports::haven::plugin::plugin::Guest` and `exports::haven::plugin::platform::Guest`.
#[macro_export]
macro_rules! export_adapter {
    ($ty:ident) => {
        $crate::adapter::bindings::export_adapter_world!($ty with_types_in $crate::adapter::bindings);
    };
}
