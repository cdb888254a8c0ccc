//! Operating the real binary: systemd notifications over a NOTIFY_SOCKET,
//! the API key from a systemd credential, SIGHUP reload of the rate and the
//! log level, and environment overrides of the configuration.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_duvo-bridge");

/// Receive notifications until `pred` holds on one of them or `secs` pass;
/// returns every datagram seen.
fn recv_until(sock: &UnixDatagram, secs: u64, pred: impl Fn(&str) -> bool) -> (bool, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = pred(&msg);
            seen.push(msg);
            if hit {
                return (true, seen);
            }
        }
    }
    (false, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_watchdog_status_stopping_with_key_from_a_credential() {
    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (free_port(), free_port());
    let config = write_binary_config(
        dir.path(),
        &sim.base_url(),
        sim.queues()[0],
        http,
        admin,
        "api_key_credential = \"duvo-api-key\"\napi_key_env = \"NO_SUCH_VARIABLE_FOR_THE_KEY\"",
        "",
    );
    // The intake's bearer token from a credential as well.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "title = \"Order {/order_id}\"",
        "title = \"Order {/order_id}\"\nauth_token_credential = \"oms-token\"",
    );
    std::fs::write(&config, text).unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let key = sim.api_keys()[0].clone();
    std::fs::write(creds.join("duvo-api-key"), format!("{key}\n")).unwrap();
    std::fs::write(creds.join("oms-token"), "t0k3n-from-credential\n").unwrap();
    let notify_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.path().join("bridge.log");
    let logf = std::fs::File::create(&log).unwrap();

    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000") // pings every 200 ms
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env_remove("DUVO_API_KEY")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();

    let sock = tokio::task::spawn_blocking(move || {
        let (ready, seen) = recv_until(&sock, 30, |m| m.lines().any(|l| l == "READY=1"));
        assert!(ready, "no READY=1: {seen:?}");
        assert!(
            !seen.iter().any(|m| m.contains("WATCHDOG=1")),
            "watchdog before ready: {seen:?}"
        );
        let ready_msg = seen.last().unwrap().clone();
        assert!(
            ready_msg.contains("STATUS=running: backlog 0 events"),
            "{ready_msg}"
        );
        sock
    })
    .await
    .unwrap();
    // READY means serving: the admin listener already says ready.
    let r = reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Delivery works with the key read from $CREDENTIALS_DIRECTORY, and
    // the intake wants the token read from there too.
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/v1/events");
    let r = client
        .post(&url)
        .json(&json!(orders(0..3)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(&url)
        .bearer_auth("t0k3n-from-credential")
        .json(&json!(orders(0..3)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    expect_cases(&sim, 3, 30).await;

    let sock = tokio::task::spawn_blocking(move || {
        let pings = std::cell::Cell::new(0);
        let (ok, seen) = recv_until(&sock, 30, |m| {
            if m.lines().any(|l| l == "WATCHDOG=1") {
                pings.set(pings.get() + 1);
            }
            pings.get() >= 5
        });
        assert!(ok, "fewer than 5 watchdog pings: {seen:?}");
        sock
    })
    .await
    .unwrap();

    send_signal(&child, "TERM");
    let (stopping, seen) = tokio::task::spawn_blocking(move || {
        recv_until(&sock, 30, |m| m.lines().any(|l| l == "STOPPING=1"))
    })
    .await
    .unwrap();
    assert!(stopping, "no STOPPING=1: {seen:?}");
    let stop_msg = seen.last().unwrap();
    assert!(stop_msg.contains("STATUS=draining: backlog"), "{stop_msg}");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status:?}:\n{logs}");
    assert!(logs.contains("systemd watchdog enabled"), "{logs}");
    assert!(
        !logs.contains(&key),
        "the API key must never appear in logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_socket_nothing_is_sent_and_the_bridge_runs() {
    // The same binary outside systemd: no NOTIFY_SOCKET, a WATCHDOG_USEC
    // left over in the environment must not matter.
    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (free_port(), free_port());
    let config = write_binary_config(
        dir.path(),
        &sim.base_url(),
        sim.queues()[0],
        http,
        admin,
        "",
        "",
    );
    let log = dir.path().join("bridge.log");
    let mut child = spawn_bridge(&config, &sim.api_keys()[0], &log);
    assert!(wait_ready(admin).await, "bridge ready");
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    let r = post_events(&reqwest::Client::new(), addr, &json!([order(1)]), None).await;
    assert_eq!(r.status(), 202);
    expect_cases(&sim, 1, 30).await;
    send_signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains("watchdog"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rate_and_log_level_and_refuses_a_bad_file() {
    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (free_port(), free_port());
    let write = |rate: u32, level: &str, burst: u32| {
        write_binary_config(
            dir.path(),
            &sim.base_url(),
            sim.queues()[0],
            http,
            admin,
            &format!("rate_limit_per_minute = {rate}\nburst = {burst}"),
            &format!("[log]\nlevel = \"{level}\""),
        )
    };
    let config = write(600, "warn", 3);
    let log = dir.path().join("bridge.log");
    let logf = std::fs::File::create(&log).unwrap();
    // No RUST_LOG: the file's level is in force.
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("DUVO_API_KEY", &sim.api_keys()[0])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    let child = scopeguard(child);
    assert!(wait_ready(admin).await, "bridge ready");
    const RPM: &str = "duvo_bridge_rate_gate_effective_rpm{account=\"default\"}";
    assert_eq!(scrape_metric(admin, RPM).await, Some(600.0));

    // A valid change: the rate applies to the gate, the level to the log.
    write(120, "info", 3);
    send_signal(child.child(), "HUP");
    let applied = wait_until(Duration::from_secs(20), || async {
        scrape_metric(admin, RPM).await == Some(120.0)
    })
    .await;
    assert!(applied, "rate not reloaded");
    let logs = std::fs::read_to_string(&log).unwrap();
    // Logged at info after the new level applied; the line before the
    // reload (also info) was still filtered out by "warn".
    assert!(
        logs.contains(
            "reloaded: duvo.rate_limit_per_minute: 600 -> 120, log.level: \"warn\" -> \"info\""
        ),
        "{logs}"
    );
    assert!(!logs.contains("SIGHUP: reloading"), "{logs}");
    assert!(!logs.contains("duvo-bridge running"), "{logs}");

    // An invalid file is refused whole; the bridge keeps its settings and runs.
    write(60, "info", 0);
    send_signal(child.child(), "HUP");
    let refused = wait_until(Duration::from_secs(20), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("configuration not reloaded")
    })
    .await;
    assert!(refused, "{}", std::fs::read_to_string(&log).unwrap());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("duvo.burst must be at least 1"), "{logs}");
    assert_eq!(scrape_metric(admin, RPM).await, Some(120.0));
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    let r = post_events(&reqwest::Client::new(), addr, &json!([order(7)]), None).await;
    assert_eq!(r.status(), 202);
    expect_cases(&sim, 1, 30).await;

    // A change that needs a restart is named, and the rest still applies.
    let cfg = write(300, "info", 3);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("linger_ms = 50", "linger_ms = 60");
    std::fs::write(&cfg, text).unwrap();
    send_signal(child.child(), "HUP");
    let named = wait_until(Duration::from_secs(20), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("applied at the next restart: delivery")
    })
    .await;
    assert!(named, "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(scrape_metric(admin, RPM).await, Some(300.0));
    send_signal(child.child(), "TERM");
    let mut c = child.take();
    let status = tokio::task::spawn_blocking(move || c.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
}

#[test]
fn environment_overrides_every_key_and_reports_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_binary_config(
        dir.path(),
        "http://127.0.0.1:1",
        uuid::Uuid::new_v4(),
        8081,
        9091,
        "",
        "",
    );
    let run = |vars: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--config")
            .arg(&config)
            .env("DUVO_API_KEY", "dv_env_override_test_key_00000000000");
        for (k, v) in vars {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = run(
        &[
            ("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE", "120"),
            ("DUVO_BRIDGE__DUVO__RATE_SHARE", "0.33"),
            ("DUVO_BRIDGE__SOURCES__OMS__LISTEN", "0.0.0.0:18080"),
            ("DUVO_BRIDGE__SOURCES__OMS__ALLOW_UNAUTHENTICATED", "true"),
            ("DUVO_BRIDGE__SOURCES__0__LABELS__TEAM", "ops"),
            ("DUVO_BRIDGE__LOG__FORMAT", "json"),
            (
                "DUVO_BRIDGE__DUVO__API_KEY",
                "dv_from_the_environment_0000000000",
            ),
        ],
        &["run", "--print-config"],
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for needle in [
        "rate_limit_per_minute = 120",
        "rate_share = 0.33",
        "listen = \"0.0.0.0:18080\"",
        "team = \"ops\"",
        "format = \"json\"",
        "api_key = \"[redacted]\"",
    ] {
        assert!(printed.contains(needle), "missing {needle:?} in\n{printed}");
    }
    assert!(!printed.contains("dv_from_the_environment"), "{printed}");

    let out = run(
        &[("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE", "120")],
        &["validate"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("with environment overrides DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE"),
        "{out:?}"
    );

    // Every problem at once, exit 64, values never echoed.
    let out = run(
        &[
            ("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE", "0"),
            ("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUT", "5"),
            ("DUVO_BRIDGE__SOURCES__MISSING__LISTEN", "s3cr3t-value"),
        ],
        &["validate"],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DUVO_BRIDGE__SOURCES__MISSING__LISTEN"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t-value"), "{err}");
    let out = run(
        &[
            ("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE", "0"),
            ("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUT", "5"),
        ],
        &["validate"],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rate_limit_per_minut"), "{err}");
    let out = run(
        &[("DUVO_BRIDGE__DUVO__RATE_LIMIT_PER_MINUTE", "0")],
        &["validate"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("duvo.rate_limit_per_minute must be at least 1"),
        "{err}"
    );
}

/// Kills the child if the test fails before it stopped it.
struct Guard(Option<std::process::Child>);

fn scopeguard(c: std::process::Child) -> Guard {
    Guard(Some(c))
}

impl Guard {
    fn child(&self) -> &std::process::Child {
        self.0.as_ref().expect("child not taken")
    }

    fn take(mut self) -> std::process::Child {
        self.0.take().expect("child not taken")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A second bridge on an outbox another one holds says so in one line
/// naming the path and the rule (one bridge per outbox directory), once,
/// never as a raw OS error, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bridge_on_the_same_outbox_says_so_once_in_plain_words() {
    let sim = start_sim(sim_config()).await;
    let first = HttpBridge::new(&sim, 600);
    let _running = first.spawn();
    assert!(wait_ready(first.admin).await, "first bridge ready");
    // Its own ports, the first one's outbox.
    let second = HttpBridge::new(&sim, 600);
    let toml = std::fs::read_to_string(&second.config).unwrap().replace(
        &second.dir.path().join("outbox").display().to_string(),
        &first.dir.path().join("outbox").display().to_string(),
    );
    std::fs::write(&second.config, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
        .args(["run", "--config"])
        .arg(&second.config)
        .env("DUVO_API_KEY", &second.key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("is in use by another process"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&first.dir.path().join("outbox").display().to_string()),
        "{err}"
    );
    assert!(
        lines[0].contains("one bridge per outbox directory"),
        "{err}"
    );
    assert!(!err.contains("Os {"), "{err}");
}

/// Logs never hold an event's payload, at any level: the bridge at
/// `trace` (every dependency too) takes an event, delivers it, and its log
/// holds the ids but never the producer's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_holds_a_payload_even_at_trace() {
    let sim = start_sim(sim_config()).await;
    let hb = HttpBridge::new(&sim, 600);
    let mut bridge = spawn_bridge_with(&hb.config, &hb.key, &hb.log, &[("RUST_LOG", "trace")]);
    assert!(wait_ready(hb.admin).await, "bridge ready");
    let marker = "ZEBRA-7f3c-PAYLOAD-MARKER";
    let r = post_events(
        &reqwest::Client::new(),
        format!("127.0.0.1:{}", hb.http).parse().unwrap(),
        &json!({ "order_id": "ORD-T1", "note": marker }),
        None,
    )
    .await;
    assert_eq!(r.status(), 202);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            sim.stats().cases_created >= 1
        })
        .await,
        "delivered"
    );
    send_signal(&bridge, "TERM");
    bridge.wait().unwrap();
    let log = std::fs::read_to_string(&hb.log).unwrap();
    assert!(
        log.lines().count() > 100,
        "trace logging was on: {} lines",
        log.lines().count()
    );
    let leaked: Vec<&str> = log.lines().filter(|l| l.contains(marker)).collect();
    assert!(leaked.is_empty(), "payload in the log: {leaked:?}");
}
