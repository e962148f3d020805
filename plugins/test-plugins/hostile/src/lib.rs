//! What the hostile test plugins share: [`hostile_writer!`] exports a target writer whose
//! `create` runs the given body and whose every other call is refused. Each test plugin is one
//! invocation stating only how it misbehaves.

pub use haven_plugin_sdk;

/// Exports a target writer whose `create(path, options)` is `$body`.
#[macro_export]
macro_rules! hostile_writer {
    (|$path:ident, $options:ident| $body:block) => {
        use $crate::haven_plugin_sdk::image::{
            CreateOptions, Error, ImageInfo, MapEntry, OpenMode, Options, Result,
        };
        use $crate::haven_plugin_sdk::writer::{Buffer, Disk, PluginInfo};

        struct Hostile;

        fn refused<T>() -> Result<T> {
            Err(Error::unsupported("test plugin: only create is implemented"))
        }

        impl Disk for Hostile {
            #[allow(unused_variables, unreachable_code)]
            fn create($path: &str, $options: CreateOptions) -> Result<Self> $body
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

        $crate::haven_plugin_sdk::export_writer!(
            Hostile,
            PluginInfo {
                name: env!("CARGO_PKG_NAME").into(),
                version: env!("CARGO_PKG_VERSION").into(),
                description: env!("CARGO_PKG_DESCRIPTION").into(),
                kinds: vec![],
            }
        );
    };
}
