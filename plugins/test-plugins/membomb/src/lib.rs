//! Test plugin (hostile): allocates in `create` until the host refuses to grow its memory.
//!
//! Used only by the host's containment tests.

test_hostile::hostile_writer!(|path, options| {
    // Allocate and touch memory until the host refuses to grow linear memory.
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 16 << 20];
        let at = options.size as usize % block.len();
        block[at] = 1;
        hoard.push(std::hint::black_box(block));
    }
});
