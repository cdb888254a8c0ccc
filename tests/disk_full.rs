//! A full disk under the outbox, on the real binary: the outbox on a small
//! tmpfs (mounted by the test; needs root), the API down so nothing drains.
//! Intake must answer 503 before any write fails for want of space, never
//! fail an append or lose what it acknowledged, resume by itself when space
//! comes back, and deliver every acknowledged event exactly once.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::json;

/// A tmpfs of `mib` MiB mounted on `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount(8)")
            .success();
        assert!(ok, "mounting a tmpfs on {} (needs root)", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_intake_before_writes_fail_and_resumes_when_space_is_back() {
    let sim = start_sim(sim_config()).await;
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), 64);
    // Most of the filesystem taken by something else.
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; 32 * 1024 * 1024]).unwrap();

    let (http, admin) = (free_port(), free_port());
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        bridge_toml(
            &sim,
            &fs.0,
            admin,
            6000,
            &http_source_toml(http, sim.queues()[0]),
        )
        .replace("[outbox]\n", "[outbox]\nmin_free_disk_mb = 16\n"),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let mut bridge = spawn_bridge(&config, &key, &log);
    assert!(wait_ready(admin).await, "bridge ready");

    let client = reqwest::Client::new();
    let pad = "x".repeat(2000);
    let post = |r: usize| {
        let body = json!(
            (0..100)
                .map(|i| json!({ "order_id": format!("ORD-{:07}", r * 100 + i), "pad": pad }))
                .collect::<Vec<_>>()
        );
        let client = client.clone();
        async move {
            client
                .post(format!("http://127.0.0.1:{http}/v1/events"))
                .header("Idempotency-Key", format!("disk-{r}"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // Fill until intake refuses; every refusal must be the clean 503.
    let mut acknowledged = 0usize;
    let mut r = 0usize;
    let refused = loop {
        let resp = post(r).await;
        match resp.status().as_u16() {
            202 => {
                acknowledged += 100;
                r += 1;
            }
            503 => break resp.json::<serde_json::Value>().await.unwrap(),
            s => panic!("request {r}: {s} {}", resp.text().await.unwrap_or_default()),
        }
        assert!(r < 2000, "intake never paused");
    };
    assert_eq!(refused["error"], "outbox_full", "{refused}");
    assert!(acknowledged > 0, "nothing fitted at all");
    // Readiness follows within the app's housekeeping interval.
    let readyz = || async {
        let r = reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert!(
        wait_until(Duration::from_secs(10), || async {
            readyz().await.0 == 503
        })
        .await,
        "readyz never said so"
    );
    let why = readyz().await.1;
    assert!(why.contains("min_free_disk_mb"), "{why}");
    eprintln!("intake paused after {acknowledged} events ({r} requests)");

    // Space comes back: intake resumes by itself.
    std::fs::remove_file(&ballast).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            post(r).await.status() == 202
        })
        .await,
        "intake did not resume"
    );
    acknowledged += 100;
    r += 1;
    for _ in 0..5 {
        assert_eq!(post(r).await.status(), 202);
        acknowledged += 100;
        r += 1;
    }

    // The API comes back: everything acknowledged arrives once.
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        outage: Some(false),
        ..Default::default()
    });
    expect_cases(&sim, acknowledged as u64, 120).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    assert_eq!(per.len(), acknowledged, "every acknowledged event, once");
    assert!(per.values().all(|&n| n == 1));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("outbox append failed"),
        "an append failed:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    send_signal(&bridge, "TERM");
    assert!(bridge.wait().unwrap().success());
    drop(fs);
}
