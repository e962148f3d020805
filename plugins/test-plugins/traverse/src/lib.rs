//! Test plugin (hostile): opens (or, given `rm:NAME`, removes) whatever path `create` is given,
//! inside or outside its root.
//!
//! Used only by the host's containment tests.

test_hostile::hostile_writer!(|path, options| {
    // `path` is what the test asks for: "../x", "/etc/passwd", a symlink leaving the root;
    // or "rm:NAME", which removes NAME.
    use test_hostile::haven_plugin_sdk::writer::bindings::haven::plugin::storage::{
        OpenFlags, open, remove,
    };
    use test_hostile::haven_plugin_sdk::writer::from_wit;
    if let Some(name) = path.strip_prefix("rm:") {
        remove(name).map_err(from_wit)?;
        return Err(Error::invalid(format!(
            "test plugin: the host let me remove {name}"
        )));
    }
    let flags = OpenFlags::CREATE | OpenFlags::WRITE;
    open(path, flags).map_err(from_wit)?;
    Err(Error::invalid(format!(
        "test plugin: the host let me open {path}"
    )))
});
