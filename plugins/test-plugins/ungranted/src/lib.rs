//! Test plugin (hostile): imports wasi:filesystem and wasi:sockets (through std), which Haven
//! never grants.
//!
//! Used only by the host's containment tests.

test_hostile::hostile_writer!(|path, options| {
    // std::fs pulls wasi:filesystem into the component's imports, std::net wasi:sockets.
    if let Ok(secret) = std::fs::read_to_string("/etc/hostname") {
        return Err(Error::invalid(format!("test plugin: read {secret}")));
    }
    match std::net::TcpStream::connect("127.0.0.1:9") {
        Ok(_) => Err(Error::invalid("test plugin: connected")),
        Err(e) => Err(Error::io(format!("test plugin: {e}"))),
    }
});
