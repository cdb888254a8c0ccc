//! The HTTP intake under a flood of large bodies, on the real binary, from
//! raw sockets: memory stays bounded however many clients announce 4 MiB.
//! Peak RSS (`VmHWM`) is read from /proc; a bridge that buffered bodies
//! before checking the token reached 1.86 GB with 400 such clients.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: usize = 400;
const BODY: usize = 4 * 1024 * 1024;

/// Peak resident set of `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

/// POST a `BODY`-byte body (`chunk` repeated, then `tail`) with `token`;
/// returns the answer's status, read while the body is still being sent.
async fn flood_one(port: u16, token: Option<&'static str>, tail: &'static [u8]) -> u16 {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n{auth}Content-Length: {BODY}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(b"[{\"pad\":\"").await?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = BODY - 9 - tail.len();
        while left > 0 {
            let n = left.min(chunk.len());
            wr.write_all(&chunk[..n]).await?;
            left -= n;
        }
        wr.write_all(tail).await?;
        std::io::Result::Ok(wr)
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    assert!(read.is_ok(), "no answer within 60 s");
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// `CLIENTS` at once; the answers' statuses, counted.
async fn flood(
    port: u16,
    token: Option<&'static str>,
    tail: &'static [u8],
) -> std::collections::BTreeMap<u16, usize> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        set.spawn(flood_one(port, token, tail));
    }
    let mut counts = std::collections::BTreeMap::new();
    while let Some(r) = set.join_next().await {
        *counts.entry(r.unwrap()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_clients_announcing_4_mib_bodies_leave_memory_bounded() {
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
    // The source gets its token from the environment.
    let toml =
        std::fs::read_to_string(&config).unwrap() + "auth_token_env = \"INTAKE_MEMORY_TOKEN\"\n";
    std::fs::write(&config, toml).unwrap();
    let mut child = spawn_bridge_with(
        &config,
        &sim.api_keys()[0],
        &dir.path().join("bridge.log"),
        &[("INTAKE_MEMORY_TOKEN", "s3cret-token")],
    );
    assert!(wait_ready(admin).await, "bridge not ready");
    let pid = child.id();
    let baseline = peak_rss_mib(pid);

    // Without the token: every one refused on its headers, no body read.
    let counts = flood(http, None, b"\"}]").await;
    assert_eq!(counts, [(401, CLIENTS)].into(), "unauthenticated answers");
    let after_unauth = peak_rss_mib(pid);
    eprintln!(
        "peak RSS: {baseline} MiB at start, {after_unauth} MiB after {CLIENTS} unauthenticated 4 MiB bodies"
    );
    assert!(
        after_unauth < 150,
        "peak RSS {after_unauth} MiB after unauthenticated bodies"
    );

    // With the token, bodies that are read and then refused (malformed at
    // the very end): bytes in flight are capped, the rest get 503.
    let counts = flood(http, Some("s3cret-token"), b"\"").await;
    let after_auth = peak_rss_mib(pid);
    eprintln!("peak RSS {after_auth} MiB after {CLIENTS} authenticated 4 MiB bodies: {counts:?}");
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        if counts.len() == 1 {
            vec![400]
        } else {
            vec![400, 503]
        },
        "{counts:?}"
    );
    assert!(
        after_auth < 200,
        "peak RSS {after_auth} MiB after authenticated bodies (64 MiB in flight at most)"
    );
    // Nothing was stored, and the bridge still serves.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .bearer_auth("s3cret-token")
        .json(&order(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    send_signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
