//! Bindings of `haven:plugin@0.1.0` (`wit/haven-plugin@0.1.0/`).

/// The `target-writer` world; its import interfaces are shared with [`adapter`].
pub mod writer {
    wasmtime::component::bindgen!({
        path: "../../wit/haven-plugin@0.1.0",
        world: "target-writer",
        imports: { default: trappable },
        with: {
            "haven:plugin/buffers.buffer": crate::buffers::Buffer,
            "haven:plugin/storage.file": crate::storage::OpenFile,
        },
    });
}

/// The `adapter` world. Its Haven imports are [`writer`]'s; wasi:http is wasmtime-wasi-http's.
pub mod adapter {
    wasmtime::component::bindgen!({
        path: "../../wit/haven-plugin@0.1.0",
        world: "adapter",
        imports: { default: trappable },
        with: {
            "haven:plugin/types": super::writer::haven::plugin::types,
            "haven:plugin/buffers": super::writer::haven::plugin::buffers,
            "haven:plugin/log": super::writer::haven::plugin::log,
            "haven:plugin/clock": super::writer::haven::plugin::clock,
            "wasi:http": wasmtime_wasi_http::p2::bindings::sync::http,
            "wasi:io": wasmtime_wasi::p2::bindings::sync::io,
        },
    });
}
