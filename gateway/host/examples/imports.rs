fn main() {
    let host = haven_host::Host::new(Default::default()).unwrap();
    for p in std::env::args().skip(1) {
        println!("{p}: {:?}", host.imports(p.as_ref()).unwrap());
    }
}
