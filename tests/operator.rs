//! The operator's commands, run as an operator would: the real binary's
//! `outbox ...` against a running bridge (`--admin`, with its token) and a
//! stopped one (`--path`). A poison event is dead-lettered, listed,
//! exported, replayed once its cause is fixed (the simulator's
//! `reject_marked` turned off) and becomes exactly one case; the census
//! matches what the simulator holds.

mod common;

use std::time::Duration;

use common::*;
use duvo_bridge::sim::{FaultsPatch, SimHandle};

const TOKEN: &str = "op-token-3f9c2e71a8";
const TOKEN_ENV: &str = "DUVO_BRIDGE_ADMIN_TOKEN";

/// A bridge whose `[admin]` turns the operator endpoints on.
fn operator_bridge(sim: &SimHandle) -> HttpBridge {
    let hb = HttpBridge::new(sim, 6000);
    let toml = std::fs::read_to_string(&hb.config).unwrap().replace(
        "[admin]\n",
        &format!("[admin]\ntoken_env = \"{TOKEN_ENV}\"\n"),
    );
    std::fs::write(&hb.config, toml).unwrap();
    hb
}

fn spawn(hb: &HttpBridge) -> BridgeProcess {
    spawn_bridge_with(&hb.config, &hb.key, &hb.log, &[(TOKEN_ENV, TOKEN)])
}

/// `duvo-bridge outbox ARGS`, with the admin token in the environment:
/// (exit status, stdout, stderr).
async fn outbox_cmd(args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"));
    cmd.arg("outbox").args(args).env_remove(TOKEN_ENV);
    if let Some(t) = token {
        cmd.env(TOKEN_ENV, t);
    }
    let out = cmd.output().await.expect("run duvo-bridge outbox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Post orders 0..n, order `poison` marked for the simulator to refuse.
async fn post_orders(http: u16, n: usize, poison: usize) {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut o = order(i);
            if i == poison {
                o["simulate"] = "reject".into();
            }
            o
        })
        .collect();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .json(&serde_json::Value::Array(events))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "events accepted");
}

async fn census_via(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["stats", "--json"];
    a.extend_from_slice(args);
    let (code, out, err) = outbox_cmd(&a, Some(TOKEN)).await;
    assert_eq!(code, 0, "stats: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats JSON: {e}: {out}"))
}

fn admin_url(hb: &HttpBridge) -> String {
    format!("http://127.0.0.1:{}", hb.admin)
}

fn one_case_per_order(sim: &SimHandle, n: usize) {
    let per = cases_per_order(sim);
    for i in 0..n {
        let id = order(i)["order_id"].as_str().unwrap().to_string();
        assert_eq!(per.get(&id), Some(&1), "order {id}: one case ({per:?})");
    }
    assert_eq!(per.values().sum::<usize>(), n, "no other case");
}

fn dead_letter_ids(ndjson: &str) -> Vec<String> {
    ndjson
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("an NDJSON line");
            v["id"].as_str().expect("id").to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_exported_and_replayed_once_through_a_running_bridge() {
    let sim = start_sim(sim_config()).await;
    let hb = operator_bridge(&sim);
    let _bridge = spawn(&hb);
    assert!(wait_ready(hb.admin).await, "bridge ready");
    let admin = admin_url(&hb);

    post_orders(hb.http, 6, 3).await;
    expect_cases(&sim, 5, 20).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            census_via(&["--admin", &admin]).await["dead_letters_total"] == 1
        })
        .await,
        "the poison event is dead-lettered"
    );

    // Nobody gets in: no token, a wrong token, and the CLI without one.
    let c = reqwest::Client::new();
    let no = c
        .get(format!("{admin}/v1/outbox/dead-letters"))
        .send()
        .await
        .unwrap();
    assert_eq!(no.status(), 401);
    let wrong = c
        .post(format!("{admin}/v1/outbox/dead-letters/purge"))
        .bearer_auth("op-token-3f9c2e71a9")
        .body(r#"{"all":true,"confirm":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let (code, _, err) = outbox_cmd(&["dead-letters", "list", "--admin", &admin], None).await;
    assert_ne!(code, 0);
    assert!(err.contains(TOKEN_ENV), "names the variable: {err}");

    // Listed and exported: the event, the API's error, the time.
    let (code, table, err) =
        outbox_cmd(&["dead-letters", "list", "--admin", &admin], Some(TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("invalid_request"), "{table}");
    assert!(table.contains("1 dead letters"), "{table}");
    let (code, ndjson, err) =
        outbox_cmd(&["dead-letters", "export", "--admin", &admin], Some(TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    let ids = dead_letter_ids(&ndjson);
    assert_eq!(ids.len(), 1, "{ndjson}");
    let letter: serde_json::Value = serde_json::from_str(ndjson.lines().next().unwrap()).unwrap();
    assert_eq!(letter["status"], 400);
    assert!(letter["rejected_at_ms"].as_u64().unwrap() > 0);
    let data: serde_json::Value =
        serde_json::from_str(letter["case"]["data"].as_str().unwrap()).unwrap();
    assert_eq!(
        data["order_id"],
        order(3)["order_id"],
        "the producer's event"
    );

    // The record itself.
    let (code, rec, err) = outbox_cmd(&["inspect", &ids[0], "--admin", &admin], Some(TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    let rec: serde_json::Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["state"]["state"], "rejected", "{rec}");

    // Fix the cause, replay: exactly one case, and a second replay is a no-op.
    sim.set_faults(FaultsPatch {
        reject_marked: Some(false),
        ..FaultsPatch::default()
    });
    let (code, out, err) = outbox_cmd(
        &["dead-letters", "replay", "--id", &ids[0], "--admin", &admin],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 replayed"), "{out}");
    expect_cases(&sim, 6, 20).await;
    let (code, out, _) = outbox_cmd(
        &["dead-letters", "replay", "--id", &ids[0], "--admin", &admin],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 1, "nothing left to replay: {out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    one_case_per_order(&sim, 6);

    // The census matches what the simulator holds.
    let census = census_via(&["--admin", &admin]).await;
    assert_eq!(census["dead_letters_total"], 0, "{census}");
    assert_eq!(
        census["events"]["delivered"],
        sim.stats().cases_total,
        "{census}"
    );
    assert_eq!(census["events"]["rejected"], 1, "{census}");
    assert!(census["events"].get("stored").is_none(), "{census}");

    // A stopped bridge's directory is refused while the bridge runs.
    let path = hb.dir.path().join("outbox");
    let (code, _, err) = outbox_cmd(&["stats", "--path", path.to_str().unwrap()], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("--admin"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_bridges_dead_letters_are_replayed_from_its_directory_and_purged_on_confirmation()
{
    let sim = start_sim(sim_config()).await;
    let hb = operator_bridge(&sim);
    let mut bridge = spawn(&hb);
    assert!(wait_ready(hb.admin).await, "bridge ready");
    post_orders(hb.http, 4, 1).await;
    post_orders_from(hb.http, 100, 2).await; // two more poison events
    expect_cases(&sim, 3, 20).await;
    let admin = admin_url(&hb);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            census_via(&["--admin", &admin]).await["dead_letters_total"] == 3
        })
        .await,
        "three poison events dead-lettered"
    );
    send_signal(&bridge, "TERM");
    assert!(bridge.wait().unwrap().success(), "clean stop");

    let path = hb.dir.path().join("outbox");
    let path = path.to_str().unwrap();
    let census = census_via(&["--path", path]).await;
    assert_eq!(census["dead_letters_total"], 3, "{census}");
    assert_eq!(census["events"]["delivered"], sim.stats().cases_total);
    let (_, ndjson, _) = outbox_cmd(&["dead-letters", "export", "--path", path], None).await;
    let ids = dead_letter_ids(&ndjson);
    assert_eq!(ids.len(), 3);

    // A purge needs a confirmation (no terminal here: --yes), and takes
    // only what it selects.
    let (code, _, err) = outbox_cmd(
        &["dead-letters", "purge", "--id", &ids[2], "--path", path],
        None,
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = outbox_cmd(
        &[
            "dead-letters",
            "purge",
            "--id",
            &ids[2],
            "--yes",
            "--path",
            path,
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 purged"), "{out}");

    // Replay the rest from the directory; the restarted bridge delivers them.
    let (code, out, err) =
        outbox_cmd(&["dead-letters", "replay", "--all", "--path", path], None).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 replayed"), "{out}");
    sim.set_faults(FaultsPatch {
        reject_marked: Some(false),
        ..FaultsPatch::default()
    });
    let _bridge = spawn(&hb);
    assert!(wait_ready(hb.admin).await, "bridge ready again");
    expect_cases(&sim, 5, 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    assert_eq!(per.values().sum::<usize>(), 5, "{per:?}");
    assert!(per.values().all(|n| *n == 1), "{per:?}");
    let census = census_via(&["--admin", &admin]).await;
    assert_eq!(census["dead_letters_total"], 0, "{census}");

    // A directory without an outbox is not silently created.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) =
        outbox_cmd(&["stats", "--path", empty.path().to_str().unwrap()], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("no outbox here"), "{err}");
    assert!(std::fs::read_dir(empty.path()).unwrap().next().is_none());
}

/// Post `n` poison orders numbered from `from`.
async fn post_orders_from(http: u16, from: usize, n: usize) {
    let events: Vec<serde_json::Value> = (from..from + n)
        .map(|i| {
            let mut o = order(i);
            o["simulate"] = "reject".into();
            o
        })
        .collect();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .json(&serde_json::Value::Array(events))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_retry_sends_failed_cases_back_to_pending_and_their_second_failure_is_reported() {
    let mut sc = sim_config();
    sc.process_ms = 1500; // a retried case stays pending long enough to see it
    let sim = start_sim(sc).await;
    let sink = CallbackSink::start().await;
    let hb = HttpBridge::new(&sim, 6000);
    let toml = bridge_toml(
        &sim,
        hb.dir.path(),
        hb.admin,
        6000,
        &format!(
            r#"
[tracking]
poll_interval_ms = 200
watch_interval_ms = 300
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
labels = {{ channel = "{{/channel}}" }}
callback_url = "{callback}"
callback_secret_env = "OMS_CALLBACK_SECRET"
"#,
            http = hb.http,
            queue = sim.queues()[0],
            callback = sink.url,
        ),
    )
    .replace(
        "[admin]\n",
        &format!("[admin]\ntoken_env = \"{TOKEN_ENV}\"\n"),
    );
    std::fs::write(&hb.config, toml).unwrap();
    let _bridge = spawn_bridge_with(
        &hb.config,
        &hb.key,
        &hb.log,
        &[
            (TOKEN_ENV, TOKEN),
            ("OMS_CALLBACK_SECRET", "retry-test-secret"),
        ],
    );
    assert!(wait_ready(hb.admin).await, "bridge ready");
    let admin = admin_url(&hb);
    let queue = sim.queues()[0].to_string();

    // Five orders, two that the simulated agent fails.
    let events: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            let mut o = order(i);
            if i % 2 == 1 {
                o["simulate"] = "fail".into();
            }
            o
        })
        .collect();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/events", hb.http))
        .json(&serde_json::Value::Array(events))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let failures = |n: usize| {
        let sink = sink.clone();
        async move {
            wait_until(Duration::from_secs(30), || {
                let sink = sink.clone();
                async move {
                    sink.received()
                        .iter()
                        .filter(|c| c.json["status"] == "failed")
                        .count()
                        >= n
                }
            })
            .await
        }
    };
    assert!(failures(2).await, "both failures reported");
    let failed = case_ids_in(&sim, "failed");
    assert_eq!(failed.len(), 2);

    // A label that matches nothing retries nothing.
    let (code, out, err) = cases_cmd(&[
        "retry",
        "--queue",
        &queue,
        "--label",
        "channel=phone",
        "--admin",
        &admin,
        "--json",
    ])
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(json(&out)["matched"], 0);
    // A dry run counts.
    let (code, out, err) = cases_cmd(&[
        "retry",
        "--queue",
        &queue,
        "--label",
        "channel=web",
        "--dry-run",
        "--admin",
        &admin,
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["matched"], 2, "{out}");
    assert_eq!(
        case_ids_in(&sim, "failed").len(),
        2,
        "a dry run retries nothing"
    );

    // The re-drive: both back to pending, followed again by the bridge.
    let (code, out, err) =
        cases_cmd(&["retry", "--queue", &queue, "--admin", &admin, "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let o = json(&out);
    assert_eq!(o["retried"].as_array().unwrap().len(), 2, "{o}");
    assert_eq!(o["followed"], 2, "{o}");
    assert!(case_ids_in(&sim, "failed").is_empty(), "back to pending");
    let pending: std::collections::BTreeSet<String> = case_ids_in(&sim, "pending")
        .union(&case_ids_in(&sim, "claimed"))
        .cloned()
        .collect();
    assert!(failed.is_subset(&pending), "{failed:?} in {pending:?}");

    // Their second failure is seen and reported: once each, later than the first.
    assert!(failures(4).await, "the second failures are reported");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reports: Vec<_> = sink
        .received()
        .into_iter()
        .filter(|c| c.json["status"] == "failed")
        .collect();
    assert_eq!(reports.len(), 4, "each failure reported once");
    for case in &failed {
        let mut at: Vec<String> = reports
            .iter()
            .filter(|c| c.json["case_id"] == case.as_str())
            .map(|c| c.json["updated_at"].as_str().unwrap().to_string())
            .collect();
        at.sort();
        at.dedup();
        assert_eq!(at.len(), 2, "two distinct failures of {case}: {at:?}");
    }
    assert_eq!(case_ids_in(&sim, "failed"), failed);
}

async fn cases_cmd(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
        .arg("cases")
        .args(args)
        .env(TOKEN_ENV, TOKEN)
        .output()
        .await
        .expect("run duvo-bridge cases");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("JSON: {e}: {s}"))
}

#[tokio::test]
async fn completions_and_man_pages_come_from_the_cli_definition() {
    let bin = env!("CARGO_BIN_EXE_duvo-bridge");
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(bin)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["outbox", "dead-letters", "replay", "retry", "--admin"] {
            assert!(script.contains(word), "{shell} completion knows {word}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let page = std::fs::read_to_string(dir.path().join("duvo-bridge-outbox-dead-letters-replay.1"))
        .unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH"),
        "roff: {page}"
    );
    assert!(
        page.contains("\\-\\-admin") || page.contains("--admin"),
        "{page}"
    );
    assert!(dir.path().join("duvo-bridge.1").exists());
}

fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .output()
        .expect("tmux (scripts/services.sh installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_moving_rates_in_an_80x24_tmux_pane_and_quits_on_q() {
    let sim = start_sim(sim_config()).await;
    let hb = HttpBridge::new(&sim, 6000);
    let _bridge = hb.spawn();
    assert!(wait_ready(hb.admin).await, "bridge ready");
    let http = hb.http;
    let feeder = tokio::spawn(async move {
        let c = reqwest::Client::new();
        for i in 0..400 {
            let body = serde_json::json!([order(2 * i), order(2 * i + 1)]);
            let _ = c
                .post(format!("http://127.0.0.1:{http}/v1/events"))
                .json(&body)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let socket = format!("duvo-top-{}", std::process::id());
    let cmd = format!(
        "{} top --admin http://127.0.0.1:{}",
        env!("CARGO_BIN_EXE_duvo-bridge"),
        hb.admin
    );
    let out = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "80",
            "-y",
            "24",
            &cmd,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let capture = || {
        String::from_utf8_lossy(&tmux(&socket, &["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned()
    };
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let first = capture();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let second = capture();
    for screen in [&first, &second] {
        for word in [
            "Intake",
            "oms",
            "cases/s",
            "API budget",
            "Tracking and reports",
            "q quits",
        ] {
            assert!(screen.contains(word), "{word} on screen:\n{screen}");
        }
        assert!(screen.lines().count() <= 24, "{screen}");
        assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    }
    // The intake row shows a rate above zero, and the screen moves.
    let stored_rate = |screen: &str| -> f64 {
        let row = screen.lines().find(|l| l.contains("│oms")).unwrap_or("");
        row.split_whitespace()
            .nth(2)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        stored_rate(&first) > 0.0 || stored_rate(&second) > 0.0,
        "{first}\n{second}"
    );
    assert_ne!(first, second, "the view refreshes");
    tmux(&socket, &["send-keys", "-t", "top", "q"]);
    let mut gone = false;
    for _ in 0..30 {
        if !tmux(&socket, &["has-session", "-t", "top"])
            .status
            .success()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "q quits");
    let _ = tmux(&socket, &["kill-server"]);
    feeder.abort();
}
