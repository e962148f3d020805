//! Quiesce hooks with real processes: shell scripts, and `fsfreeze` on a real ext4 filesystem
//! on a loop device (needs root).

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use haven_agent::quiesce::{self, Failure, Hooks, QuiesceError, Step};

/// Installs an executable script at `dir/name`. The file is written by `install`, not by this
/// process, so no concurrently spawned child of a parallel test can inherit a writable fd to it
/// (which would make executing it fail with ETXTBSY).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let draft = dir.join(format!("{name}.draft"));
    fs::write(&draft, format!("#!/bin/sh\n{body}\n")).unwrap();
    let path = dir.join(name);
    let status = Command::new("install")
        .args(["-m", "755"])
        .arg(&draft)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

/// `pre` and `post` scripts appending `pre` and `post <result>` to `dir/order`.
fn order_hooks(dir: &Path) -> (Hooks, PathBuf) {
    let order = dir.join("order");
    let pre = script(
        dir,
        "pre",
        &format!(
            r#"echo "$HAVEN_HOOK${{HAVEN_POINT_RESULT:+ $HAVEN_POINT_RESULT}}" >> {}"#,
            order.display()
        ),
    );
    let post = script(
        dir,
        "post",
        &format!(
            r#"echo "$HAVEN_HOOK $HAVEN_POINT_RESULT" >> {}"#,
            order.display()
        ),
    );
    let hooks = Hooks {
        pre: Some(pre),
        post: Some(post),
        ..Hooks::default()
    };
    (hooks, order)
}

fn append(path: &Path, line: &str) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn scripts_run_in_order_around_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let (hooks, order) = order_hooks(dir.path());
    let value = quiesce::run(&hooks, || {
        append(&order, "take");
        Ok(42)
    })
    .unwrap();
    assert_eq!(value, 42);
    assert_eq!(lines(&order), ["pre", "take", "post ok"]);
}

#[test]
fn post_runs_when_the_point_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (hooks, order) = order_hooks(dir.path());
    let err = quiesce::run(&hooks, || -> anyhow::Result<()> {
        append(&order, "take");
        anyhow::bail!("snapshot refused by the hypervisor")
    })
    .unwrap_err();
    assert_eq!(lines(&order), ["pre", "take", "post failed"]);
    match &err {
        QuiesceError::Point { source, undo } => {
            assert_eq!(source.to_string(), "snapshot refused by the hypervisor");
            assert!(undo.is_empty(), "{err}");
        }
        other => panic!("expected a point error, got {other}"),
    }
}

#[test]
fn failing_pre_skips_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hooks, order) = order_hooks(dir.path());
    let pre = script(
        dir.path(),
        "pre-fails",
        &format!(
            "echo pre >> {}\necho 'database is not ready: replica lagging' >&2\nexit 3",
            order.display()
        ),
    );
    hooks.pre = Some(pre.clone());
    let took = AtomicBool::new(false);
    let err = quiesce::run(&hooks, || {
        took.store(true, Ordering::SeqCst);
        Ok(())
    })
    .unwrap_err();
    assert!(!took.load(Ordering::SeqCst), "take ran after a failed pre");
    // pre was started, so post runs to undo whatever it did.
    assert_eq!(lines(&order), ["pre", "post failed"]);
    let QuiesceError::Prepare { failed, undo } = &err else {
        panic!("expected a prepare error, got {err}");
    };
    assert!(undo.is_empty(), "{err}");
    assert_eq!(failed.step, Step::Pre);
    assert_eq!(failed.path, pre);
    assert!(matches!(failed.failure, Failure::Exit(3)));
    assert_eq!(failed.stderr, "database is not ready: replica lagging");
    let text = err.to_string();
    assert!(text.contains("exit status 3"), "{text}");
    assert!(
        text.contains("database is not ready: replica lagging"),
        "{text}"
    );
    assert!(text.contains(&pre.display().to_string()), "{text}");
}

/// Gone, or a zombie not yet reaped by init.
fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn pre_that_hangs_is_killed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let shell_pid = dir.path().join("shell.pid");
    let sleep_pid = dir.path().join("sleep.pid");
    // The sleep is the script's child: the whole process group must be killed.
    let pre = script(
        dir.path(),
        "pre",
        &format!(
            "echo $$ > {}\nsleep 60 &\necho $! > {}\necho 'waiting for the database' >&2\nwait",
            shell_pid.display(),
            sleep_pid.display()
        ),
    );
    let hooks = Hooks {
        pre: Some(pre),
        timeout: Duration::from_millis(300),
        ..Hooks::default()
    };
    let started = Instant::now();
    let err = quiesce::run(&hooks, || Ok(())).unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "run took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(300),
        "run took {elapsed:?}"
    );
    let QuiesceError::Prepare { failed, .. } = &err else {
        panic!("expected a prepare error, got {err}");
    };
    assert!(matches!(failed.failure, Failure::TimedOut(t) if t == Duration::from_millis(300)));
    assert_eq!(failed.stderr, "waiting for the database");
    let text = err.to_string();
    assert!(text.contains("timed out after 300 ms"), "{text}");
    for pid_file in [&shell_pid, &sleep_pid] {
        let pid: u32 = fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while !process_gone(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            process_gone(pid),
            "process {pid} ({}) still runs",
            pid_file.display()
        );
    }
}

#[test]
fn validate_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("not-executable");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let a_file = dir.path().join("a-file");
    fs::write(&a_file, "").unwrap();
    let missing = dir.path().join("missing");
    let hooks = Hooks {
        freeze: vec![
            PathBuf::from("relative/mnt"),
            a_file.clone(),
            missing.clone(),
            dir.path().to_owned(),
            dir.path().join("."),
        ],
        pre: Some(not_executable.clone()),
        post: Some(PathBuf::from("post.sh")),
        timeout: Duration::ZERO,
    };
    let err = hooks.validate().unwrap_err();
    let d = |p: &Path| p.display().to_string();
    let expected = [
        format!(
            "hooks.pre: {}: not executable: run `chmod +x {}`",
            d(&not_executable),
            d(&not_executable)
        ),
        "hooks.post: post.sh: not an absolute path: give the script's full path".to_owned(),
        "hooks.freeze[0]: relative/mnt: not an absolute path: give the mount point's full path"
            .to_owned(),
        format!(
            "hooks.freeze[1]: {}: not a directory: give the mount point of the filesystem to freeze",
            d(&a_file)
        ),
        format!(
            "hooks.freeze[2]: {}: cannot be read (No such file or directory (os error 2)): give \
             the path of a mounted filesystem",
            d(&missing)
        ),
        format!(
            "hooks.freeze[4]: {}/.: on the same filesystem as hooks.freeze[3] ({}): a filesystem \
             can be frozen only once; list it once",
            d(dir.path()),
            d(dir.path())
        ),
        "hooks.timeout_ms: 0: every step would time out; give the longest a step may take \
         (default 30000)"
            .to_owned(),
    ];
    assert_eq!(err.problems, expected);

    // run() refuses invalid hooks without running anything.
    let took = AtomicBool::new(false);
    let err = quiesce::run(&hooks, || {
        took.store(true, Ordering::SeqCst);
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(err, QuiesceError::Invalid(_)));
    assert!(!took.load(Ordering::SeqCst));
    assert!(
        err.to_string()
            .starts_with("invalid quiesce hooks: hooks.pre: ")
    );

    let missing_script = Hooks {
        pre: Some(missing.clone()),
        ..Hooks::default()
    };
    assert_eq!(
        missing_script.validate().unwrap_err().problems,
        [format!(
            "hooks.pre: {}: cannot be read (No such file or directory (os error 2)): give the \
             path of an existing script",
            d(&missing)
        )]
    );
    let dir_script = Hooks {
        post: Some(dir.path().to_owned()),
        ..Hooks::default()
    };
    assert_eq!(
        dir_script.validate().unwrap_err().problems,
        [format!(
            "hooks.post: {}: not a regular file: give the path of a script",
            d(dir.path())
        )]
    );
    assert_eq!(Hooks::default().validate(), Ok(()));
}

// ---- fsfreeze on a real filesystem ----

fn must(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {} (stderr: {}) — these tests need root (loop devices, mount, fsfreeze)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A 32 MiB ext4 filesystem on a loop device, mounted at `mount`. Dropping it thaws it (in case
/// a test failed with it frozen), kills writers the test started, unmounts and detaches.
struct LoopMount {
    _dir: tempfile::TempDir,
    mount: PathBuf,
    device: String,
    writers: Vec<Child>,
}

impl LoopMount {
    fn new() -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(32 * 1024 * 1024)
            .unwrap();
        must(Command::new("mkfs.ext4").arg("-q").arg(&image));
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup --find --show {}: {} (stderr: {}) — these tests need root and loop devices",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mount = dir.path().join("mnt");
        fs::create_dir(&mount).unwrap();
        let lm = LoopMount {
            _dir: dir,
            mount,
            device,
            writers: Vec::new(),
        };
        must(Command::new("mount").arg(&lm.device).arg(&lm.mount));
        lm
    }

    /// Starts `sh -c 'echo x > MOUNT/name'`: it blocks while the filesystem is frozen.
    fn start_writer(&mut self, name: &str) -> usize {
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("echo x > {}/{name}", self.mount.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.writers.push(child);
        self.writers.len() - 1
    }

    /// Whether writer `i` finished (successfully) within `limit`.
    fn writer_finishes_within(&mut self, i: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.writers[i].try_wait().unwrap() {
                assert!(status.success(), "writer {i}: {status}");
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // Thaw first: a writer blocked on a frozen filesystem cannot be killed.
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.mount)
            .stderr(Stdio::null())
            .status();
        for child in &mut self.writers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn freeze_blocks_writers_during_the_point_and_thaws_after() {
    let mut fs = LoopMount::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut hooks, order) = order_hooks(dir.path());
    hooks.freeze = vec![fs.mount.clone()];
    let mut writer = None;
    let value = quiesce::run(&hooks, || {
        append(&order, "take");
        let i = fs.start_writer("during-point");
        writer = Some(i);
        // Frozen: the write does not finish while the point is taken.
        anyhow::ensure!(
            !fs.writer_finishes_within(i, Duration::from_millis(300)),
            "a write to {} finished during the point: not frozen",
            fs.mount.display()
        );
        Ok("point-1")
    })
    .unwrap();
    assert_eq!(value, "point-1");
    assert_eq!(lines(&order), ["pre", "take", "post ok"]);
    // Thawed: the blocked write completes.
    assert!(
        fs.writer_finishes_within(writer.unwrap(), Duration::from_secs(5)),
        "the write blocked during the point did not finish after run() returned: still frozen"
    );
    assert_eq!(
        fs::read_to_string(fs.mount.join("during-point")).unwrap(),
        "x\n"
    );
}

#[test]
fn panicking_point_still_thaws_and_runs_post() {
    let mut fs = LoopMount::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut hooks, order) = order_hooks(dir.path());
    hooks.freeze = vec![fs.mount.clone()];
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        quiesce::run(&hooks, || -> anyhow::Result<()> {
            append(&order, "take");
            panic!("the snapshot code panicked")
        })
    }));
    let payload = panicked.expect_err("run() returned although take() panicked");
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"the snapshot code panicked")
    );
    assert_eq!(lines(&order), ["pre", "take", "post failed"]);
    let i = fs.start_writer("after-panic");
    assert!(
        fs.writer_finishes_within(i, Duration::from_secs(5)),
        "a write after the panic did not finish: {} was left frozen",
        fs.mount.display()
    );
}

#[test]
fn thawed_by_someone_else_is_reported() {
    let fs = LoopMount::new();
    let hooks = Hooks {
        freeze: vec![fs.mount.clone()],
        ..Hooks::default()
    };
    let err = quiesce::run(&hooks, || {
        must(Command::new("fsfreeze").arg("--unfreeze").arg(&fs.mount));
        Ok(())
    })
    .unwrap_err();
    let QuiesceError::Release { failures } = &err else {
        panic!("expected a release error, got {err}");
    };
    assert_eq!(failures.len(), 1, "{err}");
    assert_eq!(failures[0].step, Step::Thaw);
    assert_eq!(failures[0].path, fs.mount);
    assert!(matches!(failures[0].failure, Failure::NotFrozen), "{err}");
    assert!(
        err.to_string()
            .contains("may not be application-consistent"),
        "{err}"
    );
}

#[test]
fn failed_freeze_thaws_what_was_frozen() {
    // The second freeze fails (already frozen by someone else): the first mount is thawed, the
    // second (not frozen by us) is left alone, post runs, take does not.
    let mut first = LoopMount::new();
    let second = LoopMount::new();
    must(Command::new("fsfreeze").arg("--freeze").arg(&second.mount));
    let dir = tempfile::tempdir().unwrap();
    let (mut hooks, order) = order_hooks(dir.path());
    hooks.freeze = vec![first.mount.clone(), second.mount.clone()];
    let took = AtomicBool::new(false);
    let err = quiesce::run(&hooks, || {
        took.store(true, Ordering::SeqCst);
        Ok(())
    })
    .unwrap_err();
    assert!(!took.load(Ordering::SeqCst));
    assert_eq!(lines(&order), ["pre", "post failed"]);
    let QuiesceError::Prepare { failed, undo } = &err else {
        panic!("expected a prepare error, got {err}");
    };
    assert!(undo.is_empty(), "{err}");
    assert_eq!(failed.step, Step::Freeze);
    assert_eq!(failed.path, second.mount);
    assert!(matches!(failed.failure, Failure::Exit(1)), "{err}");
    assert!(failed.stderr.contains("Device or resource busy"), "{err}");
    let i = first.start_writer("after-failed-freeze");
    assert!(
        first.writer_finishes_within(i, Duration::from_secs(5)),
        "{} was left frozen",
        first.mount.display()
    );
    // Still frozen by its owner: run() did not thaw a freeze it did not make.
    must(
        Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&second.mount),
    );
}
