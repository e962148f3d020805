//! Test plugin (hostile): loops forever in `create`: only epoch interruption can stop it.
//!
//! Used only by the host's containment tests.

test_hostile::hostile_writer!(|path, options| {
    // Spin forever without calling the host: only epoch interruption can stop this.
    let mut x: u64 = options.size;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
});
