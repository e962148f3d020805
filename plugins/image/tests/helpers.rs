//! The format-neutral helpers every format relies on.

use haven_image::{
    Error, ErrorKind, Extent, ExtentState, FileIo, MapEntry, OpenMode, Options, StdBackend,
    check_range, is_zero, push_map, sibling,
};

#[test]
fn options_parse_and_refuse_unknown_keys() {
    let o = Options::parse("subformat=fixed, block_size = 2M").unwrap();
    assert_eq!(o.get("subformat"), Some("fixed"));
    assert_eq!(o.get("block_size"), Some("2M"));
    assert_eq!(o.get("nope"), None);
    assert_eq!(Options::parse("").unwrap(), Options::default());
    let e = Options::parse("fixed").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert_eq!(e.message, "option `fixed` is not of the form key=value");
    let e = o.check_known("vhd", &["subformat"]).unwrap_err();
    assert_eq!(
        e.message,
        "vhd: unknown option `block_size` (known options: subformat)"
    );
    assert!(o.check_known("vhd", &["subformat", "block_size"]).is_ok());
}

#[test]
fn ranges_are_checked_against_size_and_sector() {
    assert!(check_range("x", 0, 512, 1024, 512).is_ok());
    assert!(check_range("x", 512, 512, 1024, 512).is_ok());
    let e = check_range("x", 1024, 512, 1024, 512).unwrap_err();
    assert_eq!(
        e.message,
        "x: range 0x400+0x200 lies outside the disk (1024 bytes)"
    );
    let e = check_range("x", u64::MAX, 512, 1024, 512).unwrap_err();
    assert!(e.message.contains("outside the disk"));
    let e = check_range("x", 100, 512, 4096, 512).unwrap_err();
    assert_eq!(
        e.message,
        "x: range 0x64+0x200 is not aligned to the 512-byte sector"
    );
}

#[test]
fn maps_merge_touching_entries_of_one_state() {
    let mut map = Vec::new();
    let e = |offset, length, state| MapEntry {
        offset,
        length,
        state,
    };
    push_map(&mut map, e(0, 10, ExtentState::Data));
    push_map(&mut map, e(10, 5, ExtentState::Data));
    push_map(&mut map, e(15, 0, ExtentState::Zero));
    push_map(&mut map, e(15, 5, ExtentState::Zero));
    push_map(&mut map, e(30, 5, ExtentState::Zero));
    assert_eq!(
        map,
        [
            e(0, 15, ExtentState::Data),
            e(15, 5, ExtentState::Zero),
            e(30, 5, ExtentState::Zero)
        ]
    );
}

#[test]
fn zero_detection_and_siblings() {
    assert!(is_zero(&[]));
    assert!(is_zero(&[0; 4099]));
    let mut v = vec![0u8; 4099];
    v[4098] = 1;
    assert!(!is_zero(&v));
    v[4098] = 0;
    v[3] = 1;
    assert!(!is_zero(&v));
    assert_eq!(
        sibling("vms/web01.vmdk", "web01-s001.vmdk"),
        "vms/web01-s001.vmdk"
    );
    assert_eq!(sibling("web01.vmdk", "web01-flat.vmdk"), "web01-flat.vmdk");
    assert_eq!(sibling("a/b.vhd", "/abs/parent.vhd"), "/abs/parent.vhd");
}

#[test]
fn std_backend_reports_holes_and_truncation() {
    use haven_image::Backend;
    let dir = tempfile::tempdir().unwrap();
    let backend = StdBackend::new(dir.path());
    let f = backend.create("disk.img").unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_at(1 << 20, &[7u8; 4096]).unwrap();
    f.flush().unwrap();
    assert_eq!(
        f.data_extents(0, 4 << 20).unwrap(),
        [Extent {
            offset: 1 << 20,
            length: 4096
        }]
    );
    f.punch_hole(1 << 20, 4096).unwrap();
    assert!(f.data_extents(0, 4 << 20).unwrap().is_empty());
    let mut buf = [1u8; 16];
    let e: Error = f
        .read_exact_at((4 << 20) - 8, &mut buf, "grain table")
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(
        e.message.starts_with(
            "grain table at offset 0x3ffff8 (16 bytes) lies past the end of file disk.img"
        ),
        "{e}"
    );
    assert_eq!(
        backend.create("disk.img").unwrap_err().kind,
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        backend
            .open("missing", OpenMode::ReadOnly)
            .unwrap_err()
            .kind,
        ErrorKind::NotFound
    );
}
