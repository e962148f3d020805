//! Application-consistent quiesce hooks: what the agent runs around an application-consistent
//! recovery point.
//!
//! [`run`] does, in this order:
//!
//! 1. the `pre` script (e.g. a database's "begin backup"), with `HAVEN_HOOK=pre`;
//! 2. `fsfreeze --freeze` of each mount in `freeze`, in order;
//! 3. `take()`, the caller's closure that takes the point;
//! 4. `fsfreeze --unfreeze` of each frozen mount, in reverse order;
//! 5. the `post` script, with `HAVEN_HOOK=post` and `HAVEN_POINT_RESULT=ok|failed`.
//!
//! Whatever happens — a step fails, a step times out, `take` returns an error or panics — exactly
//! what was done is undone: every mount that was (or may have been) frozen is thawed and `post`
//! runs if `pre` was started. The undo lives in a guard whose `Drop` runs it, so a panic in `take`
//! cannot leave a filesystem frozen: `fsfreeze --freeze` blocks every writer of the filesystem in
//! uninterruptible sleep until it is thawed.
//!
//! Every step is a child process bounded by [`Hooks::timeout`]; one that runs longer is killed
//! with SIGKILL, together with its process group (a script's own children), and waited for.
//! `take` itself is not bounded.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The program that freezes and thaws filesystems (util-linux), looked up in `PATH`.
pub const FSFREEZE: &str = "fsfreeze";
/// Most bytes of a step's stderr kept in an error (the end of it: errors are usually last).
pub const MAX_STDERR: usize = 4096;
/// How many times a failing thaw is tried in all: a frozen filesystem blocks the workload.
pub const THAW_ATTEMPTS: u32 = 3;
/// Pause between two thaw attempts.
const THAW_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long stderr is still read after the step's process exited (a child it left running may
/// hold the pipe open; its stderr is then given up on).
const STDERR_GRACE: Duration = Duration::from_millis(500);
/// Longest pause between two checks of a running step.
const MAX_POLL: Duration = Duration::from_millis(20);

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// What the agent runs around an application-consistent point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Mount points frozen with `fsfreeze --freeze` (in this order) and thawed with
    /// `fsfreeze --unfreeze` (reverse order). Absolute paths of directories, each on a different
    /// filesystem. Never list a filesystem the agent writes to (its state, its change log, its
    /// own log): the agent would block on it.
    #[serde(default)]
    pub freeze: Vec<PathBuf>,
    /// A program run before freezing (e.g. a database's "begin backup"), with `HAVEN_HOOK=pre`;
    /// its non-zero exit fails the point.
    #[serde(default)]
    pub pre: Option<PathBuf>,
    /// A program run after thawing, with `HAVEN_HOOK=post` and `HAVEN_POINT_RESULT=ok|failed`.
    /// Always run if `pre` was started, also when `pre`, a freeze, the point or a thaw failed
    /// (then `HAVEN_POINT_RESULT=failed`).
    #[serde(default)]
    pub post: Option<PathBuf>,
    /// Longest any one step (a script, one fsfreeze) may take; the process is killed (SIGKILL,
    /// and waited for) when it runs longer. Default 30 s. In configuration: `timeout_ms`.
    #[serde(
        default = "default_timeout",
        rename = "timeout_ms",
        with = "duration_ms"
    )]
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            freeze: Vec::new(),
            pre: None,
            post: None,
            timeout: default_timeout(),
        }
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl Hooks {
    /// Checks the hooks without running anything and reports every problem at once: paths are
    /// absolute, scripts exist and are executable, freeze mounts are directories on distinct
    /// filesystems, `fsfreeze` is installed, the timeout is not zero.
    pub fn validate(&self) -> Result<(), InvalidHooks> {
        let mut problems = Vec::new();
        for (field, script) in [("pre", &self.pre), ("post", &self.post)] {
            if let Some(path) = script
                && let Err(what) = check_script(path)
            {
                problems.push(format!("hooks.{field}: {}: {what}", path.display()));
            }
        }
        let mut devices: Vec<(u64, usize)> = Vec::new();
        for (i, path) in self.freeze.iter().enumerate() {
            match check_mount(path) {
                Err(what) => {
                    problems.push(format!("hooks.freeze[{i}]: {}: {what}", path.display()));
                }
                Ok(dev) => {
                    if let Some(&(_, first)) = devices.iter().find(|(d, _)| *d == dev) {
                        problems.push(format!(
                            "hooks.freeze[{i}]: {}: on the same filesystem as hooks.freeze[{first}] \
                             ({}): a filesystem can be frozen only once; list it once",
                            path.display(),
                            self.freeze[first].display()
                        ));
                    } else {
                        devices.push((dev, i));
                    }
                }
            }
        }
        if !self.freeze.is_empty() && find_in_path(FSFREEZE).is_none() {
            problems.push(format!(
                "hooks.freeze: `{FSFREEZE}` is not in PATH: install util-linux, or leave \
                 hooks.freeze empty"
            ));
        }
        if self.timeout.is_zero() {
            problems.push(
                "hooks.timeout_ms: 0: every step would time out; give the longest a step may \
                 take (default 30000)"
                    .to_owned(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidHooks { problems })
        }
    }
}

fn check_script(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err("not an absolute path: give the script's full path".to_owned());
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot be read ({e}): give the path of an existing script"))?;
    if !meta.is_file() {
        return Err("not a regular file: give the path of a script".to_owned());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("not executable: run `chmod +x {}`", path.display()));
    }
    Ok(())
}

/// The device of the filesystem holding `path`, a directory.
fn check_mount(path: &Path) -> Result<u64, String> {
    if !path.is_absolute() {
        return Err("not an absolute path: give the mount point's full path".to_owned());
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot be read ({e}): give the path of a mounted filesystem"))?;
    if !meta.is_dir() {
        return Err("not a directory: give the mount point of the filesystem to freeze".to_owned());
    }
    Ok(meta.dev())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Problems found by [`Hooks::validate`], each naming the field, the path and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidHooks {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl fmt::Display for InvalidHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid quiesce hooks: {}", self.problems.join("; "))
    }
}

impl std::error::Error for InvalidHooks {}

/// A step of the quiesce sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The `pre` script.
    Pre,
    /// `fsfreeze --freeze` of one mount.
    Freeze,
    /// `fsfreeze --unfreeze` of one mount.
    Thaw,
    /// The `post` script.
    Post,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Pre => "pre script",
            Step::Freeze => "fsfreeze --freeze",
            Step::Thaw => "fsfreeze --unfreeze",
            Step::Post => "post script",
        })
    }
}

/// How a step failed.
#[derive(Debug)]
pub enum Failure {
    /// The program could not be started.
    Spawn(std::io::Error),
    /// The program could not be waited for.
    Wait(std::io::Error),
    /// The program exited with this non-zero status.
    Exit(i32),
    /// The program was killed by this signal (not by the agent).
    Signal(i32),
    /// The program ran longer than the timeout and was killed.
    TimedOut(Duration),
    /// Thaw only: the filesystem was not frozen any more — someone else thawed it while the point
    /// was taken, so the point may not be application-consistent.
    NotFrozen,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Spawn(e) => write!(f, "could not be started: {e}"),
            Failure::Wait(e) => write!(f, "could not be waited for: {e}"),
            Failure::Exit(code) => write!(f, "exit status {code}"),
            Failure::Signal(sig) => write!(f, "killed by signal {sig}"),
            Failure::TimedOut(t) => {
                write!(f, "timed out after {} ms and was killed", t.as_millis())
            }
            Failure::NotFrozen => f.write_str(
                "the filesystem was no longer frozen: something else thawed it while the point \
                 was taken, so the point may not be application-consistent",
            ),
        }
    }
}

/// One failed step: which, on what path, how, and what it wrote to stderr.
#[derive(Debug)]
pub struct StepError {
    /// The step.
    pub step: Step,
    /// The script, or the mount point for fsfreeze.
    pub path: PathBuf,
    /// How it failed.
    pub failure: Failure,
    /// The end of its stderr, trimmed, at most [`MAX_STDERR`] bytes (`…` first when cut).
    pub stderr: String,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.step, self.path.display(), self.failure)?;
        if !self.stderr.is_empty() {
            write!(f, " (stderr: {})", self.stderr)?;
        }
        match (self.step, &self.failure) {
            (Step::Thaw, Failure::NotFrozen) => {}
            (Step::Thaw, _) => write!(
                f,
                "; the filesystem may still be frozen, blocking its writers: run `fsfreeze \
                 --unfreeze {}`",
                self.path.display()
            )?,
            (Step::Freeze, Failure::Spawn(_)) => f.write_str("; is util-linux installed?")?,
            _ => {}
        }
        Ok(())
    }
}

impl std::error::Error for StepError {}

/// Why [`run`] failed.
#[derive(Debug)]
pub enum QuiesceError {
    /// The hooks are invalid; nothing was run.
    Invalid(InvalidHooks),
    /// `pre` or a freeze failed: the point was not taken. `undo` lists what failed while undoing
    /// (thaws, `post`).
    Prepare {
        /// The step that failed.
        failed: StepError,
        /// Failures while undoing.
        undo: Vec<StepError>,
    },
    /// `take` returned this error. `undo` lists thaws and `post` that failed afterwards.
    Point {
        /// The error `take` returned.
        source: anyhow::Error,
        /// Failures while undoing.
        undo: Vec<StepError>,
    },
    /// The point was taken, but a thaw or `post` failed afterwards (the point's value is
    /// dropped). A failed thaw may leave the workload blocked; a `NotFrozen` thaw means the
    /// point may not be application-consistent.
    Release {
        /// What failed, in order.
        failures: Vec<StepError>,
    },
}

impl QuiesceError {
    /// Every step that failed, the first cause first.
    pub fn steps(&self) -> Vec<&StepError> {
        match self {
            QuiesceError::Invalid(_) => Vec::new(),
            QuiesceError::Prepare { failed, undo } => {
                std::iter::once(failed).chain(undo.iter()).collect()
            }
            QuiesceError::Point { undo, .. } => undo.iter().collect(),
            QuiesceError::Release { failures } => failures.iter().collect(),
        }
    }
}

fn write_undo(f: &mut fmt::Formatter<'_>, undo: &[StepError]) -> fmt::Result {
    for e in undo {
        write!(f, "; then, undoing: {e}")?;
    }
    Ok(())
}

impl fmt::Display for QuiesceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuiesceError::Invalid(e) => e.fmt(f),
            QuiesceError::Prepare { failed, undo } => {
                write!(f, "quiesce failed, no point taken: {failed}")?;
                write_undo(f, undo)
            }
            QuiesceError::Point { source, undo } => {
                write!(f, "the point failed while quiesced: {source:#}")?;
                write_undo(f, undo)
            }
            QuiesceError::Release { failures } => {
                f.write_str("the point was taken but un-quiescing failed")?;
                for (i, e) in failures.iter().enumerate() {
                    write!(f, "{} {e}", if i == 0 { ":" } else { ";" })?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for QuiesceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QuiesceError::Invalid(e) => Some(e),
            QuiesceError::Prepare { failed, .. } => Some(failed),
            QuiesceError::Point { source, .. } => Some(source.as_ref()),
            QuiesceError::Release { failures } => failures
                .first()
                .map(|e| e as &(dyn std::error::Error + 'static)),
        }
    }
}

impl From<InvalidHooks> for QuiesceError {
    fn from(e: InvalidHooks) -> Self {
        QuiesceError::Invalid(e)
    }
}

/// Quiesces the workload as `hooks` say, calls `take` and un-quiesces, always (see the module
/// documentation for the order and the undo rules).
///
/// `take` runs while the filesystems in `hooks.freeze` are frozen: it must not write to them,
/// directly or through anything it calls (logging included) — a write blocks until the thaw,
/// which comes only after `take` returns, so it would hang forever. It should be quick: the
/// workload's writers are blocked meanwhile; it is not bounded by `hooks.timeout`.
///
/// If `take` panics, the mounts are thawed and `post` runs (`HAVEN_POINT_RESULT=failed`) before
/// the panic goes on; failures then are logged.
pub fn run<T>(hooks: &Hooks, take: impl FnOnce() -> anyhow::Result<T>) -> Result<T, QuiesceError> {
    hooks.validate()?;
    let mut quiesced = Quiesced {
        hooks,
        frozen: Vec::new(),
        pre_started: false,
        released: false,
    };
    if let Some(pre) = &hooks.pre {
        let mut cmd = Command::new(pre);
        cmd.env("HAVEN_HOOK", "pre")
            .env_remove("HAVEN_POINT_RESULT");
        let outcome = run_step(cmd, hooks.timeout);
        quiesced.pre_started = outcome.started;
        if let Some(failure) = outcome.failure {
            let failed = step_error(Step::Pre, pre, failure, outcome.stderr);
            tracing::warn!("{failed}");
            let undo = quiesced.release(false);
            return Err(QuiesceError::Prepare { failed, undo });
        }
    }
    for mount in &hooks.freeze {
        let outcome = run_step(fsfreeze("--freeze", mount), hooks.timeout);
        match outcome.failure {
            None => quiesced.frozen.push((mount.clone(), true)),
            Some(failure) => {
                // Killed mid-freeze, the filesystem may be frozen: thaw it anyway.
                if matches!(failure, Failure::TimedOut(_)) {
                    quiesced.frozen.push((mount.clone(), false));
                }
                let failed = step_error(Step::Freeze, mount, failure, outcome.stderr);
                tracing::warn!("{failed}");
                let undo = quiesced.release(false);
                return Err(QuiesceError::Prepare { failed, undo });
            }
        }
        tracing::debug!(mount = %mount.display(), "frozen");
    }
    let result = take();
    let failures = quiesced.release(result.is_ok());
    match result {
        Ok(value) if failures.is_empty() => Ok(value),
        Ok(_) => Err(QuiesceError::Release { failures }),
        Err(source) => Err(QuiesceError::Point {
            source,
            undo: failures,
        }),
    }
}

/// What has been done and must be undone; `Drop` undoes it if [`Quiesced::release`] was not
/// called (a panic in `take`).
struct Quiesced<'a> {
    hooks: &'a Hooks,
    /// Mounts to thaw, in freeze order; `false`: the freeze timed out, so it may not be frozen.
    frozen: Vec<(PathBuf, bool)>,
    pre_started: bool,
    released: bool,
}

impl Quiesced<'_> {
    /// Thaws every frozen mount (reverse order), then runs `post` if `pre` was started. Returns
    /// what failed.
    fn release(&mut self, point_ok: bool) -> Vec<StepError> {
        self.released = true;
        let mut failures = Vec::new();
        while let Some((mount, confirmed)) = self.frozen.pop() {
            if let Err(e) = thaw(&mount, confirmed, self.hooks.timeout) {
                tracing::error!("{e}");
                failures.push(e);
            } else {
                tracing::debug!(mount = %mount.display(), "thawed");
            }
        }
        if self.pre_started {
            self.pre_started = false;
            if let Some(post) = &self.hooks.post {
                let ok = point_ok && failures.is_empty();
                let mut cmd = Command::new(post);
                cmd.env("HAVEN_HOOK", "post")
                    .env("HAVEN_POINT_RESULT", if ok { "ok" } else { "failed" });
                let outcome = run_step(cmd, self.hooks.timeout);
                if let Some(failure) = outcome.failure {
                    let e = step_error(Step::Post, post, failure, outcome.stderr);
                    tracing::warn!("{e}");
                    failures.push(e);
                }
            }
        }
        failures
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("the point panicked: un-quiescing");
            // `release` logs every failure.
            self.release(false);
        }
    }
}

/// Thaws `mount`, retrying: a frozen filesystem blocks the workload. `confirmed`: the freeze
/// succeeded (otherwise it timed out and "not frozen" is not an error).
fn thaw(mount: &Path, confirmed: bool, timeout: Duration) -> Result<(), StepError> {
    let mut attempt = 1;
    loop {
        let outcome = run_step(fsfreeze("--unfreeze", mount), timeout);
        let Some(failure) = outcome.failure else {
            return Ok(());
        };
        // FITHAW fails with EINVAL when the filesystem is not frozen (LC_ALL=C is set).
        if matches!(failure, Failure::Exit(_)) && outcome.stderr.contains("Invalid argument") {
            if confirmed {
                return Err(step_error(
                    Step::Thaw,
                    mount,
                    Failure::NotFrozen,
                    outcome.stderr,
                ));
            }
            return Ok(());
        }
        if attempt >= THAW_ATTEMPTS {
            return Err(step_error(Step::Thaw, mount, failure, outcome.stderr));
        }
        tracing::warn!(
            "fsfreeze --unfreeze {}: {failure} (attempt {attempt} of {THAW_ATTEMPTS}): retrying",
            mount.display()
        );
        attempt += 1;
        thread::sleep(THAW_RETRY_PAUSE);
    }
}

fn fsfreeze(action: &str, mount: &Path) -> Command {
    let mut cmd = Command::new(FSFREEZE);
    cmd.arg(action).arg(mount).env("LC_ALL", "C");
    cmd
}

fn step_error(step: Step, path: &Path, failure: Failure, stderr: String) -> StepError {
    StepError {
        step,
        path: path.to_owned(),
        failure,
        stderr,
    }
}

/// How a step's process went.
struct Outcome {
    /// The process was started (its effects may have happened).
    started: bool,
    /// `None`: it exited with status 0.
    failure: Option<Failure>,
    /// The end of its stderr, trimmed and bounded.
    stderr: String,
}

/// Runs `cmd` (stdin and stdout null, stderr captured) in its own process group; after `timeout`
/// kills the group with SIGKILL and waits for the process.
fn run_step(mut cmd: Command, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Outcome {
                started: false,
                failure: Some(Failure::Spawn(e)),
                stderr: String::new(),
            };
        }
    };
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = child.stderr.take() {
        thread::spawn(move || {
            let _ = tx.send(read_tail(&mut pipe));
        });
    }
    let failure = match wait_until(&mut child, Instant::now() + timeout) {
        Ok(Some(status)) => status_failure(status),
        Ok(None) => {
            kill(&mut child);
            Some(Failure::TimedOut(timeout))
        }
        Err(e) => {
            kill(&mut child);
            Some(Failure::Wait(e))
        }
    };
    let stderr = rx.recv_timeout(STDERR_GRACE).unwrap_or_default();
    Outcome {
        started: true,
        failure,
        stderr,
    }
}

/// The status, or `None` at the deadline.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// SIGKILL to the child's process group (it leads it), then waits for the child.
fn kill(child: &mut Child) {
    let pid = rustix::process::Pid::from_child(child);
    if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        tracing::warn!("killing process group {}: {e}", child.id());
        let _ = child.kill();
    }
    if let Err(e) = child.wait() {
        tracing::warn!("waiting for process {}: {e}", child.id());
    }
}

fn status_failure(status: ExitStatus) -> Option<Failure> {
    if status.success() {
        None
    } else if let Some(code) = status.code() {
        Some(Failure::Exit(code))
    } else {
        Some(Failure::Signal(status.signal().unwrap_or(0)))
    }
}

/// Reads `pipe` to its end and keeps the last [`MAX_STDERR`] bytes, trimmed (`…` first when cut).
fn read_tail(pipe: &mut impl Read) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut cut = false;
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > MAX_STDERR {
                    tail.drain(..tail.len() - MAX_STDERR);
                    cut = true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&tail);
    let text = text.trim();
    if cut {
        format!("…{text}")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let hooks: Hooks = serde_json::from_str("{}").unwrap();
        assert_eq!(hooks, Hooks::default());
        assert_eq!(hooks.timeout, Duration::from_secs(30));
        let hooks: Hooks =
            serde_json::from_str(r#"{"freeze":["/data"],"pre":"/x","timeout_ms":300}"#).unwrap();
        assert_eq!(hooks.freeze, vec![PathBuf::from("/data")]);
        assert_eq!(hooks.timeout, Duration::from_millis(300));
        assert_eq!(
            serde_json::from_str::<Hooks>(&serde_json::to_string(&hooks).unwrap()).unwrap(),
            hooks
        );
        let err = serde_json::from_str::<Hooks>(r#"{"timeout":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn stderr_tail_is_bounded_and_trimmed() {
        assert_eq!(read_tail(&mut &b"  oops\n"[..]), "oops");
        let long = format!("{}END\n", "x".repeat(10_000));
        let tail = read_tail(&mut long.as_bytes());
        assert!(tail.starts_with('…') && tail.ends_with("xEND"), "{tail}");
        assert_eq!(tail.len(), '…'.len_utf8() + MAX_STDERR - 1);
    }

    #[test]
    fn run_without_hooks_only_takes() {
        assert_eq!(run(&Hooks::default(), || Ok(7)).unwrap(), 7);
        let err = run(&Hooks::default(), || -> anyhow::Result<()> {
            anyhow::bail!("snapshot refused")
        })
        .unwrap_err();
        assert!(matches!(err, QuiesceError::Point { ref undo, .. } if undo.is_empty()));
        assert_eq!(
            err.to_string(),
            "the point failed while quiesced: snapshot refused"
        );
    }
}
