//! The at-rest key file.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use haven_store::{Key, StoreError};

#[test]
fn created_private_and_reloaded_equal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("store.key");
    let k = Key::load_or_create(&path).expect("create");
    let meta = fs::metadata(&path).expect("meta");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 52);
    assert_eq!(&fs::read(&path).expect("read")[0..8], b"HVNATKEY");
    assert_eq!(Key::load_or_create(&path).expect("load"), k);
    // No temporary file is left behind.
    assert_eq!(fs::read_dir(tmp.path()).expect("list").count(), 1);
    // Debug does not show the key.
    let shown = format!("{k:?}");
    assert_eq!(shown, "Key(<redacted>)");
    // Two keys created apart differ.
    let other = Key::load_or_create(&tmp.path().join("other.key")).expect("create");
    assert_ne!(other, k);
}

#[test]
fn damaged_key_file_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("store.key");
    Key::load_or_create(&path).expect("create");
    let mut b = fs::read(&path).expect("read");
    b[20] ^= 1;
    fs::write(&path, &b).expect("write");
    match Key::load_or_create(&path) {
        Err(e @ StoreError::KeyFile { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("offset 48") && msg.contains("checksum"),
                "{msg}"
            );
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        other => panic!("expected KeyFile, got {other:?}"),
    }
    // The damaged file was not replaced.
    assert_eq!(fs::read(&path).expect("read"), b);
    fs::write(&path, &b[..40]).expect("write");
    assert!(matches!(
        Key::load_or_create(&path),
        Err(StoreError::KeyFile { .. })
    ));
}

#[test]
fn key_file_open_to_others_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("store.key");
    Key::load_or_create(&path).expect("create");
    for mode in [0o640, 0o604, 0o660] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        match Key::load_or_create(&path) {
            Err(e @ StoreError::KeyFile { .. }) => {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
            other => panic!("mode {mode:o}: expected KeyFile, got {other:?}"),
        }
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    Key::load_or_create(&path).expect("private again");
}

#[test]
fn symlinked_key_file_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let real = tmp.path().join("real.key");
    Key::load_or_create(&real).expect("create");
    let link = tmp.path().join("link.key");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    assert!(matches!(
        Key::load_or_create(&link),
        Err(StoreError::KeyFile { .. })
    ));
}
