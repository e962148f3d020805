//! Bindings of `haven:plugin@0.2.0` (`wit/haven-plugin@0.2.0/`). Its shared interfaces are
//! 0.1.0's, so they map onto [`super::since_v0_1_0`]'s bindings and their host implementations.

/// The `adapter` world of 0.2.0.
pub mod adapter {
    wasmtime::component::bindgen!({
        path: "../../wit/haven-plugin@0.2.0",
        world: "haven:plugin/adapter@0.2.0",
        imports: { default: trappable },
        with: {
            "haven:plugin/types@0.1.0": super::super::since_v0_1_0::writer::haven::plugin::types,
            "haven:plugin/buffers@0.1.0": super::super::since_v0_1_0::writer::haven::plugin::buffers,
            "haven:plugin/log@0.1.0": super::super::since_v0_1_0::writer::haven::plugin::log,
            "haven:plugin/clock@0.1.0": super::super::since_v0_1_0::writer::haven::plugin::clock,
            "wasi:http": wasmtime_wasi_http::p2::bindings::sync::http,
            "wasi:io": wasmtime_wasi::p2::bindings::sync::io,
        },
    });
}
