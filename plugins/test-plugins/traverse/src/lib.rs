//! Test plugin: tries to open whatever path it is given, inside or outside its root
//!
//! Used only by the host's containment tests. Every disk call other than `create` is refused.

use haven_plugin_sdk::image::{
    CreateOptions, Error, ImageInfo, MapEntry, OpenMode, Options, Result,
};
use haven_plugin_sdk::writer::{Buffer, Disk, PluginInfo};

struct Hostile;

fn refused<T>() -> Result<T> {
    Err(Error::unsupported(
        "test plugin: only create is implemented",
    ))
}

impl Disk for Hostile {
    fn create(path: &str, options: CreateOptions) -> Result<Self> {
        // `path` is what the test asks for: "../x", "/etc/passwd", a symlink leaving the root;
        // or "rm:NAME", which removes NAME.
        let _ = options;
        use haven_plugin_sdk::writer::bindings::haven::plugin::storage::{OpenFlags, open, remove};
        if let Some(name) = path.strip_prefix("rm:") {
            remove(name).map_err(haven_plugin_sdk::writer::from_wit)?;
            return Err(Error::invalid(format!("test plugin: the host let me remove {name}")));
        }
        let flags = OpenFlags::CREATE | OpenFlags::WRITE;
        open(path, flags).map_err(haven_plugin_sdk::writer::from_wit)?;
        Err(Error::invalid(format!(
            "test plugin: the host let me open {path}"
        )))
    }
    fn open(_: &str, _: OpenMode, _: Options) -> Result<Self> {
        refused()
    }
    fn probe(_: &str) -> Result<Option<String>> {
        Ok(None)
    }
    fn info(&self) -> Result<ImageInfo> {
        refused()
    }
    fn read(&mut self, _: u64, _: &Buffer, _: u32, _: u32) -> Result<()> {
        refused()
    }
    fn write(&mut self, _: u64, _: &Buffer, _: u32, _: u32) -> Result<()> {
        refused()
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> Result<()> {
        refused()
    }
    fn flush(&mut self) -> Result<()> {
        refused()
    }
    fn map(&mut self, _: u64, _: u64) -> Result<Vec<MapEntry>> {
        refused()
    }
    fn close(&mut self) -> Result<()> {
        refused()
    }
}

haven_plugin_sdk::export_writer!(
    Hostile,
    PluginInfo {
        name: env!("CARGO_PKG_NAME").into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: env!("CARGO_PKG_DESCRIPTION").into(),
        kinds: vec![],
    }
);
