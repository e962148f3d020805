//! Test plugin: allocates until memory runs out in create
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
        let _ = path;
        // Allocate and touch memory until the host refuses to grow linear memory.
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut block = vec![0u8; 16 << 20];
            let at = options.size as usize % block.len();
            block[at] = 1;
            hoard.push(std::hint::black_box(block));
        }
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
