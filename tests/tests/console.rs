//! The web console of a configuration server, driven in headless Chromium: an operator logs
//! in, watches the machine become protected, runs a test failover from its row (checked
//! against the source disk with `qemu-img compare`) and cleans it up.
//!
//! The browser is driven by Selenium (PyPI) through chromedriver (Debian `chromium-driver`),
//! in a small Python script. The script does what the operator would do and reports what the
//! page showed, one line at a time (`KEY VALUE`); this test asserts on those lines. Once the
//! test failover is up, the script waits for `clean-up` on its stdin while the test compares
//! the export with the source. The script waits on the page with timeouts of its own and, when
//! one runs out, exits with what it waited for and the page's visible text (and leaves
//! `target/console-failed.png`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::{Cluster, ClusterOptions, mixed_disk};

/// The operator's side: arguments `URL WRONG_TOKEN TOKEN SCREENSHOT`.
const OPERATOR: &str = r#"
import shutil, sys, time
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, wrong_token, token, screenshot = sys.argv[1:5]
chromium, chromedriver = shutil.which('chromium'), shutil.which('chromedriver')
if not chromium or not chromedriver:
    sys.exit('chromium and chromedriver are needed: apt-get install chromium chromium-driver '
             '(cargo xtask test installs them)')

def say(key, value):
    print(key, ' '.join(str(value).split()), flush=True)

options = Options()
for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
            '--window-size=1400,1100'):
    options.add_argument(arg)
options.binary_location = chromium
driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
driver.set_page_load_timeout(30)

def page_text():
    try:
        return driver.find_element(By.TAG_NAME, 'body').text
    except WebDriverException as e:
        return f'(the page cannot be read: {e.msg})'

def wait(what, seconds, probe):
    """probe()'s first true value within `seconds`; else exits naming `what` and the page."""
    deadline = time.monotonic() + seconds
    problem = ''
    while True:
        try:
            value = probe()
        except WebDriverException as e:
            value, problem = None, f' (last: {e.msg})'
        if value:
            return value
        if time.monotonic() > deadline:
            failed = screenshot.replace('.png', '-failed.png')
            driver.save_screenshot(failed)
            sys.exit(f'waited {seconds} s for {what}{problem}; screenshot {failed}\n'
                     f'---- the page shows ----\n{page_text()}')
        time.sleep(0.2)

ROW = 'tr[data-machine="web01"]'

def cell(field):
    return driver.find_element(By.CSS_SELECTOR, f'{ROW} [data-field="{field}"]')

def button(action):
    return driver.find_element(By.CSS_SELECTOR, f'{ROW} button[data-action="{action}"]')

def text_of(id):
    return driver.find_element(By.ID, id).text

def log_in(value):
    field = driver.find_element(By.ID, 'token')
    field.clear()
    field.send_keys(value)
    driver.find_element(By.ID, 'login-button').click()

try:
    driver.get(url + '/console')
    log_in(wrong_token)
    say('login-error', wait('an error after logging in with a wrong token', 30,
                            lambda: text_of('login-error')))
    log_in(token)
    say('session', wait('"Logged in as"', 30,
                        lambda: text_of('session').startswith('Logged in as')
                        and text_of('session')))
    wait('the row of web01 to show replication state protected and a recovery point', 120,
         lambda: cell('replication').get_attribute('data-state') == 'protected'
         and int(cell('points').get_attribute('data-points') or 0) > 0)
    wait('the Test failover button of web01 to be enabled', 30,
         lambda: button('test-failover').is_enabled())
    button('test-failover').click()
    uri = wait('the row of web01 to show a test failover nbd:// URI', 60,
               lambda: (cell('test-failover').get_attribute('data-uri') or '')
               .startswith('nbd://') and cell('test-failover').get_attribute('data-uri'))
    say('uri', uri)
    say('result', text_of('action-result'))
    if sys.stdin.readline().strip() != 'clean-up':
        sys.exit('stopped by the test')
    button('clean-up').click()
    wait('the row of web01 to show no test failover', 60,
         lambda: cell('test-failover').get_attribute('data-uri') == ''
         and cell('test-failover').text == '—')
    say('result', text_of('action-result'))
    if not driver.save_screenshot(screenshot):
        sys.exit(f'the screenshot could not be written to {screenshot}')
    say('screenshot', screenshot)
finally:
    driver.quit()
"#;

/// The script running: its stdin, its stdout by lines, its stderr collected by a thread.
struct Operator {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Operator {
    fn start(url: &str, wrong_token: &str, token: &str, screenshot: &Path) -> Result<Operator> {
        let mut child = Command::new("python3")
            .args(["-c", OPERATOR, url, wrong_token, token])
            .arg(screenshot)
            // Selenium is given both programs: it must not look for drivers on the network.
            .env("SE_OFFLINE", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run python3 (with selenium from PyPI)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Operator {
            stdin: child.stdin.take(),
            child,
            lines: BufReader::new(stdout).lines(),
            stderr: Some(stderr),
        })
    }

    /// The value of the script's next line, which must be `key`.
    fn next(&mut self, key: &str) -> Result<String> {
        match self.lines.next() {
            Some(line) => {
                let line = line?;
                match line.split_once(' ') {
                    Some((k, value)) if k == key => Ok(value.to_string()),
                    _ => bail!("the browser script said {line:?} where `{key} …` was expected"),
                }
            }
            None => bail!(
                "the browser script ended before `{key} …`: {}",
                self.finish_output().1
            ),
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the script to end (its stdin closed: it stops at the next question; killed
    /// after 30 s) and returns whether it succeeded and how it ended, with its error output.
    fn finish_output(&mut self) -> (bool, String) {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (ok, status) = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break (status.success(), status.to_string()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break (false, "killed after 30 s".to_string());
                }
            }
        };
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (ok, format!("{status}\n{stderr}"))
    }

    /// Fails unless the script exited successfully.
    fn finish(mut self) -> Result<()> {
        let (ok, out) = self.finish_output();
        if !ok {
            bail!("the browser script failed: {out}");
        }
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if self.stderr.is_some() {
            self.finish_output();
        }
    }
}

/// `target/console.png` of this workspace.
fn screenshot_path() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .unwrap_or(tests)
        .join("target")
        .join("console.png")
}

#[test]
fn the_console_logs_in_shows_protection_and_runs_a_test_failover() -> Result<()> {
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 16 << 20, 11)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            retention: Some("window = \"1h\"".into()),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("no configuration server")?;
    let screenshot = screenshot_path();
    fs::create_dir_all(screenshot.parent().context("a folder")?)?;
    let _ = fs::remove_file(&screenshot);

    let mut operator = Operator::start(
        &cs.api,
        "hvt_0000000000000000_wrong",
        &cs.admin_token,
        &screenshot,
    )?;
    assert_eq!(
        operator.next("login-error")?,
        "API token not valid here: unknown at this gateway, revoked or mistyped"
    );
    assert_eq!(
        operator.next("session")?,
        "Logged in as first-admin (admin)"
    );

    // The test failover the console started presents the source as it is: nothing writes.
    let uri = operator.next("uri")?;
    let result = operator.next("result")?;
    assert!(
        result.starts_with("Test failover of web01 started: ") && result.contains(&uri),
        "{result}"
    );
    if !haven_e2e::images_equal(&disk, Path::new(&uri))? {
        bail!("the test failover at {uri} differs from the source");
    }

    operator.send("clean-up")?;
    let result = operator.next("result")?;
    assert!(
        result.starts_with("Test failover of web01 cleaned up"),
        "{result}"
    );
    assert_eq!(
        operator.next("screenshot")?,
        screenshot.display().to_string()
    );
    operator.finish()?;
    let png = fs::read(&screenshot)
        .with_context(|| format!("reading the screenshot {}", screenshot.display()))?;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        screenshot.display()
    );
    eprintln!(
        "console test done in {:?}; screenshot {}",
        started.elapsed(),
        screenshot.display()
    );
    Ok(())
}
