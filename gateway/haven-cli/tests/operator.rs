//! The operator commands that talk to gateways (`haven status`, `point`, `failover`, `token`,
//! `agent`), and what every command owes a shell: quiet on a closed pipe, no colour codes in
//! redirected logs. The real binary against a stand-in gateway API (a thread answering
//! `GET /v1/status` with the real status type) and against ports nothing listens on.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use haven_engine::status::{
    CachedDisk, DrainStatus, DrainedAgent, GatewayStatus, ProcessServerStatus,
};

/// `haven ARGS` with `envs` set, in an environment without the variables that change its
/// defaults or its logging.
fn haven(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_haven"));
    for var in ["HAVEN_SERVER", "HAVEN_LOG", "HAVEN_TOKEN", "NO_COLOR"] {
        cmd.env_remove(var);
    }
    // No logins: the user's would change the default server.
    cmd.env("HAVEN_CONFIG_DIR", "/nonexistent/haven-config");
    cmd.envs(envs.iter().copied())
        .args(args)
        .output()
        .expect("run haven")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A process server's status with one protected disk, web01's disk 3.
fn process_server_status() -> GatewayStatus {
    // Built from JSON: fields added later with `#[serde(default)]` need no change here.
    let disk: CachedDisk = serde_json::from_value(serde_json::json!({
        "agent_id": "0123456789abcdef0123456789abcdef",
        "machine_name": "web01",
        "disk": 3,
        "agent_connected": true,
        "durable_seq": 10,
        "forwarded_seq": 9,
        "cache_bytes": 4096,
        "receive_bytes_per_second": 0.0,
        "received_bytes_total": 8192,
        "stored_bytes_total": 4096,
        "report": null,
        "error": null,
    }))
    .expect("a CachedDisk");
    GatewayStatus {
        site: "primary".into(),
        process_server: Some(ProcessServerStatus {
            listen: "127.0.0.1:9443".into(),
            upstream: "127.0.0.1:9444".into(),
            upstream_connected: true,
            cache_bytes: 4096,
            cache_max_bytes: 1 << 30,
            churn_bytes_per_second: 0.0,
            upload_bytes_per_second: 0.0,
            achievable_rpo_seconds: Some(0.0),
            disks: vec![disk],
            drain: Some(DrainStatus {
                account: "https://havencache.blob.core.windows.net/haven-cache".into(),
                agents: vec![DrainedAgent {
                    agent_id: "fedcba9876543210fedcba9876543210".into(),
                    machine_name: "shop-sql".into(),
                    report_time_ms: 1,
                }],
            }),
        }),
        master_target: None,
        config_server: None,
    }
}

/// A gateway API on loopback that answers every request with `status` until the test ends;
/// returns its URL.
fn fake_gateway(status: &GatewayStatus) -> String {
    fake_gateway_seeing(status).0
}

/// [`fake_gateway`], also handing over each request's head (request line and headers).
fn fake_gateway_seeing(status: &GatewayStatus) -> (String, mpsc::Receiver<String>) {
    let body = serde_json::to_string(status).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (heads_tx, heads_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            // The request's head (the CLI sends no body), then the answer, then close.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && matches!(conn.read(&mut byte), Ok(1)) {
                head.push(byte[0]);
            }
            let _ = heads_tx.send(text(&head));
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, heads_rx)
}

/// The URL of an API nothing listens on (a port just bound and released).
fn closed_api() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[test]
fn status_shows_the_gateways_that_answer_and_marks_the_others() {
    let up = fake_gateway(&process_server_status());
    let down = closed_api();
    let out = haven(&["status", "--api", &down, "--api", &up], &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("unreachable: {down}: cannot reach")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("gateway {up} (site primary)")),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "  drains cache account https://havencache.blob.core.windows.net/haven-cache: \
             shop-sql (fedcba9876543210fedcba9876543210)\n"
        ),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("web01"))
        .unwrap_or_else(|| panic!("no row for web01's disk: {stdout}"));
    assert_eq!(
        row.split_whitespace().take(3).collect::<Vec<_>>(),
        ["web01", "3", "unknown"],
        "{row}"
    );
    assert!(
        stderr.contains(&down) && !stderr.contains(&up),
        "stderr names what did not answer: {stderr}"
    );
}

#[test]
fn status_json_has_an_error_entry_for_each_gateway_that_does_not_answer() {
    let status = process_server_status();
    let up = fake_gateway(&status);
    let down = closed_api();
    let out = haven(&["status", "--json", "--api", &up, "--api", &down], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v:#}");
    assert_eq!(v[0]["api"], up.as_str());
    let answered: GatewayStatus = serde_json::from_value(v[0]["status"].clone()).unwrap();
    assert_eq!(answered, status);
    assert!(v[0].get("error").is_none(), "{v:#}");
    assert_eq!(v[1]["api"], down.as_str());
    assert!(v[1].get("status").is_none(), "{v:#}");
    let error = v[1]["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot reach the gateway API"), "{v:#}");
}

#[test]
fn status_fails_with_2_when_no_gateway_answers_and_takes_several_from_haven_api() {
    let (a, b) = (closed_api(), closed_api());
    let out = haven(&["status"], &[("HAVEN_SERVER", &format!("{a},{b}"))]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{}", text(&out.stderr));
    for api in [&a, &b] {
        assert!(
            stdout.contains(&format!("unreachable: {api}: ")),
            "{stdout}"
        );
    }
}

#[test]
fn every_api_flag_defaults_to_haven_api() {
    let env_api = closed_api();
    let commands: [&[&str]; 10] = [
        &["point", "list", "web01"],
        &["point", "create", "web01"],
        &["failover", "web01", "--point", "latest"],
        &["failover", "test", "web01"],
        &["failover", "cleanup", "web01"],
        &["failover", "commit", "web01"],
        &["failover", "show", "web01"],
        &["token", "create"],
        &["agent", "list"],
        &["agent", "revoke", "0123456789abcdef0123456789abcdef"],
    ];
    for args in commands {
        let out = haven(args, &[("HAVEN_SERVER", &env_api)]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot reach the gateway API at {env_api}")),
            "{args:?} asks $HAVEN_SERVER: {stderr}"
        );
    }
    // `--api` wins over the environment. (Two closed ports can be the same one: the kernel may
    // hand out a port again once its listener is gone.)
    let flag_api = std::iter::repeat_with(closed_api)
        .find(|api| *api != env_api)
        .unwrap_or_default();
    let out = haven(
        &["point", "list", "web01", "--api", &flag_api],
        &[("HAVEN_SERVER", &env_api)],
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&flag_api) && !stderr.contains(&env_api),
        "{stderr}"
    );
}

#[test]
fn closed_stdout_ends_quietly() {
    let up = fake_gateway(&process_server_status());
    let plugins = tempfile::tempdir().unwrap();
    let plugin_dir = plugins.path().to_str().unwrap();
    let commands: [&[&str]; 3] = [
        &["--plugin-dir", plugin_dir, "plugin", "list"],
        &["status", "--api", &up],
        &["status", "--json", "--api", &up],
    ];
    for args in commands {
        // stdout is a pipe whose reader is gone before the command writes.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_haven"))
            .env_remove("HAVEN_SERVER")
            .env("HAVEN_CONFIG_DIR", "/nonexistent/haven-config")
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run haven");
        let stderr = text(&out.stderr);
        // 141 = 128 + SIGPIPE, what a shell reports for a tool SIGPIPE ended.
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let up = fake_gateway(&process_server_status());
    let out = haven(&["status", "--api", &up], &[("HAVEN_LOG", "debug")]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("gateway API request"),
        "a debug log: {stderr}"
    );
    assert!(!stderr.contains("\x1b["), "{stderr:?}");
}

#[test]
fn the_token_from_haven_token_or_token_goes_with_every_request() {
    let (up, heads) = fake_gateway_seeing(&process_server_status());
    let authorization = |args: &[&str], envs: &[(&str, &str)]| {
        let out = haven(args, envs);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let head = heads.recv().unwrap();
        head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().to_string())
        })
    };
    let status = ["status", "--api", up.as_str()];
    assert_eq!(
        authorization(&status, &[("HAVEN_TOKEN", "from-env")]).as_deref(),
        Some("Bearer from-env")
    );
    // The flag is global (after the subcommand too) and wins over the environment.
    assert_eq!(
        authorization(
            &["status", "--api", &up, "--token", "from-flag"],
            &[("HAVEN_TOKEN", "from-env")]
        )
        .as_deref(),
        Some("Bearer from-flag")
    );
    assert_eq!(authorization(&status, &[("HAVEN_TOKEN", "")]), None);
    assert_eq!(authorization(&status, &[]), None);
    // The help names the variable but does not show its value.
    let help = haven(&["--help"], &[("HAVEN_TOKEN", "from-env")]);
    let help = text(&help.stdout);
    assert!(
        help.contains("HAVEN_TOKEN") && !help.contains("from-env"),
        "{help}"
    );
}
