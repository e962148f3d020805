//! The example pipelines of `examples/pipelines`, as the tests that run them localise them:
//! read, their tables changed where this machine's parts are named, written back.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `examples/pipelines/NAME`.
pub fn path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/pipelines")
        .join(name)
}

/// The `[[key]]` tables of `p`.
pub fn tables(p: &toml::Table, key: &str) -> Result<Vec<toml::Table>> {
    p.get(key)
        .and_then(toml::Value::as_array)
        .with_context(|| format!("the example has no [[{key}]]"))?
        .iter()
        .map(|v| v.as_table().cloned().context("not a table"))
        .collect()
}

/// `tables` as the value of a `[[...]]` key.
pub fn array(tables: Vec<toml::Table>) -> toml::Value {
    toml::Value::Array(tables.into_iter().map(toml::Value::Table).collect())
}
