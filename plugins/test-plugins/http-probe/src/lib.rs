//! Test plugin: an adapter whose `quiesce(machine)` GETs `machine` (a URL) and fails unless the
//! answer is 200.
//!
//! Used only by the host's grant tests: a request to a granted host goes through, any other is
//! refused by the host. It is built against `haven:plugin@0.1.0` directly (not the SDK, whose
//! adapters are 0.2.0), so the host's tests also prove that 0.1.0 adapters keep loading.

#[allow(missing_docs, clippy::all, unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../../wit/haven-plugin@0.1.0",
        world: "adapter",
        generate_all,
    });
}

use bindings::exports::haven::plugin::platform::{
    Guest, Machine, PowerOffMode, ReplicaMachine, ReplicaSpec, Snapshot,
};
use bindings::exports::haven::plugin::plugin::{Guest as PluginGuest, PluginInfo};
use bindings::haven::plugin::buffers::Buffer;
use bindings::haven::plugin::types::{Error, Extent};
use bindings::wasi::http::{outgoing_handler, types as http};

struct Probe;

fn unsupported<T>() -> Result<T, Error> {
    Err(Error::Unsupported(
        "test plugin: only quiesce is implemented".into(),
    ))
}

/// GETs `url` and returns the status code.
fn get(url: &str) -> Result<u16, Error> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| Error::InvalidArgument(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = http::OutgoingRequest::new(http::Fields::new());
    let scheme = if scheme == "https" {
        http::Scheme::Https
    } else {
        http::Scheme::Http
    };
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| Error::InvalidArgument("scheme".into()))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| Error::InvalidArgument("authority".into()))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| Error::InvalidArgument("path".into()))?;
    let pending = outgoing_handler::handle(request, None)
        .map_err(|e| Error::Platform(format!("request failed: {e:?}")))?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or_else(|| Error::Platform("no response".into()))?
        .map_err(|()| Error::Platform("response taken twice".into()))?
        .map_err(|e| Error::Platform(format!("request failed: {e:?}")))?;
    Ok(response.status())
}

impl PluginGuest for Probe {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "http-probe".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            kinds: vec!["test".into()],
        }
    }
}

impl Guest for Probe {
    fn inventory() -> Result<Vec<Machine>, Error> {
        unsupported()
    }
    fn quiesce(machine: String, _timeout_ms: u32) -> Result<(), Error> {
        let status = get(&machine)?;
        if status == 200 {
            Ok(())
        } else {
            Err(Error::Platform(format!("status {status}")))
        }
    }
    fn thaw(_: String) -> Result<(), Error> {
        Ok(())
    }
    fn power_off(_: String, _: PowerOffMode) -> Result<(), Error> {
        unsupported()
    }
    fn create_snapshot(_: String, _: String) -> Result<Snapshot, Error> {
        unsupported()
    }
    fn delete_snapshot(_: String, _: String) -> Result<(), Error> {
        unsupported()
    }
    fn changed_extents(
        _: String,
        _: String,
        _: String,
        _: Option<String>,
        _: u64,
        _: u64,
    ) -> Result<Vec<Extent>, Error> {
        unsupported()
    }
    fn read_snapshot(
        _: String,
        _: String,
        _: String,
        _: u64,
        _: &Buffer,
        _: u32,
        _: u32,
    ) -> Result<(), Error> {
        unsupported()
    }
    fn define_replica(_: ReplicaSpec) -> Result<ReplicaMachine, Error> {
        unsupported()
    }
}

// The export glue wit-bindgen generates (the canonical ABI shims) is its only unsafe code.
#[allow(unsafe_code)]
mod export {
    use super::{Probe, bindings};
    bindings::export!(Probe with_types_in bindings);
}
