use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Barrier};

use super::*;

/// The names in `dir` that are temporary files of this crate.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| is_temporary(n))
        .collect();
    out.sort();
    out
}

#[test]
fn a_write_round_trips_with_its_mode_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key.pem");
    write_atomic(&path, b"first", 0o600).expect("write");
    assert_eq!(fs::read(&path).expect("read"), b"first");
    assert_eq!(
        fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    write_atomic(&path, b"second, longer", 0o644).expect("replace");
    assert_eq!(fs::read(&path).expect("read"), b"second, longer");
    write_atomic(&path, b"", 0o644).expect("empty");
    assert_eq!(fs::read(&path).expect("read"), b"");
    let names: Vec<_> = fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![OsString::from("key.pem")]);

    // In parts, and a bare name (the current folder).
    let parts = dir.path().join("parts");
    write_atomic_with(&parts, 0o644, |f| {
        f.write_all(b"head")?;
        f.write_all(b"+body")
    })
    .expect("write in parts");
    assert_eq!(fs::read(&parts).expect("read"), b"head+body");
    assert_eq!(folder_of(Path::new("bare")), Path::new("."));
}

#[test]
fn a_failed_write_removes_its_temporary_file_and_names_file_and_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state");
    write_atomic(&path, b"old", 0o644).expect("write");
    let e = write_atomic_with(&path, 0o644, |f| {
        f.write_all(b"half")?;
        Err(io::Error::other("disk on fire"))
    })
    .expect_err("the writer failed");
    let text = e.to_string();
    assert!(text.starts_with("writing "), "{text}");
    assert!(
        text.contains(".state.") && text.ends_with(".tmp: disk on fire"),
        "{text}"
    );
    assert_eq!(fs::read(&path).expect("read"), b"old");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());

    // A missing folder: the step and the temporary file's path.
    let e = write_atomic(&dir.path().join("no/such/file"), b"x", 0o644).expect_err("no folder");
    assert_eq!(e.step, "creating");
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.path.starts_with(dir.path().join("no/such")), "{e}");
    // A path without a file name.
    assert_eq!(
        write_atomic(Path::new("/"), b"x", 0o644)
            .expect_err("root")
            .step,
        "writing"
    );
}

/// Run by [`a_crash_before_the_rename_leaves_the_old_content`] in a child process; does
/// nothing in a normal test run.
#[test]
fn crash_child() {
    if let Some(path) = std::env::var_os("HAVEN_FSUTIL_CRASH_PATH") {
        write_atomic(Path::new(&path), b"new content", 0o644).expect("write");
        panic!("the failpoint should have ended the process before the rename");
    }
}

#[test]
fn a_crash_before_the_rename_leaves_the_old_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.state");
    write_atomic(&path, b"old content", 0o644).expect("write");
    // This test binary again, running only `crash_child`, with the failpoint armed.
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "tests::crash_child", "--nocapture"])
        .env(failpoint::ENV, "fsutil.before-rename=exit")
        .env("HAVEN_FSUTIL_CRASH_PATH", &path)
        .output()
        .expect("run the child");
    assert_eq!(
        child.status.code(),
        Some(failpoint::EXIT_STATUS),
        "{}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );
    assert_eq!(fs::read(&path).expect("read"), b"old content");
    // The temporary file is complete and recognisable, for its folder's owner to remove.
    let left = temporaries(dir.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".disk.state."), "{left:?}");
    assert_eq!(
        fs::read(dir.path().join(&left[0])).expect("read"),
        b"new content"
    );
    // A later write is not disturbed by it.
    write_atomic(&path, b"newer", 0o644).expect("write again");
    assert_eq!(fs::read(&path).expect("read"), b"newer");
}

#[test]
fn concurrent_writers_of_one_path_all_succeed_and_one_wins_whole() {
    const WRITERS: usize = 16;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = Arc::new(dir.path().join("status.json"));
    let content = |i: usize, round: usize| vec![b'a' + i as u8; 4096 + 512 * i + round];
    let start = Arc::new(Barrier::new(WRITERS));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (path, start) = (Arc::clone(&path), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for round in 0..20 {
                    write_atomic(&path, &content(i, round), 0o644).expect("every write succeeds");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let got = fs::read(&*path).expect("read");
    let i = usize::from(got[0] - b'a');
    assert!(i < WRITERS, "first byte {}", got[0]);
    assert_eq!(got, content(i, 19), "the last write of writer {i}, whole");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn write_new_creates_once_and_leaves_an_existing_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("at-rest.key");
    write_new(&path, b"mine", 0o600).expect("create");
    assert_eq!(
        fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    let e = write_new(&path, b"theirs", 0o600).expect_err("exists");
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(e.path, path);
    assert_eq!(fs::read(&path).expect("read"), b"mine");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn temporary_names_are_recognised_and_nothing_else() {
    for yes in [
        ".disk.state.12.0.tmp",
        ".a.1.22.tmp",
        ".000001.hlog.4242.7.tmp",
    ] {
        assert!(is_temporary(yes), "{yes}");
    }
    for no in [
        "disk.state",
        "000001.hlog.tmp",
        ".disk.state.tmp",
        ".x.12.tmp",
        "..12.0.tmp",
        ".a.1.b.tmp",
        ".a.1.2.tmpx",
        "lock",
    ] {
        assert!(!is_temporary(no), "{no}");
    }
}

#[test]
fn create_dir_all_creates_the_chain_and_accepts_what_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deep = dir.path().join("a/b/c");
    create_dir_all(&deep).expect("create");
    assert!(deep.is_dir());
    create_dir_all(&deep).expect("again");
    let file = dir.path().join("a/file");
    fs::write(&file, b"x").expect("file");
    let e = create_dir_all(&file.join("d")).expect_err("under a file");
    assert_eq!(e.step, "creating folder");
}

#[test]
fn a_locked_folder_is_refused_until_its_owner_lets_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let held = lock_dir(dir.path()).expect("lock");
    let e = lock_dir(dir.path()).expect_err("held");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert_eq!(e.path, dir.path().join(LOCK_FILE));
    drop(held);
    lock_dir(dir.path()).expect("free again");
}

#[test]
fn read_at_most_stops_at_the_end_of_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    fs::write(&path, b"0123456789").expect("write");
    let f = File::open(&path).expect("open");
    let mut buf = [0u8; 8];
    assert_eq!(read_at_most(&f, &mut buf, 4).expect("read"), 6);
    assert_eq!(&buf[..6], b"456789");
    assert_eq!(read_at_most(&f, &mut buf, 0).expect("read"), 8);
    assert_eq!(read_at_most(&f, &mut buf, 20).expect("read"), 0);
}
