//! README step 1 works: `duvo-bridge demo` runs the whole pipeline against
//! the in-process simulator and reports every order as exactly one case.

use std::process::Command;

#[test]
fn demo_delivers_every_order_once_and_summarises() {
    let out = Command::new(env!("CARGO_BIN_EXE_duvo-bridge"))
        .args([
            "demo",
            "--orders",
            "600",
            "--rate-limit",
            "6000",
            "--process-ms",
            "200",
            "--timeout-secs",
            "60",
        ])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |name: &str| -> u64 {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or_else(|| panic!("no {name:?} row in:\n{stdout}"))
    };
    assert_eq!(row("orders submitted"), 600);
    assert_eq!(row("cases created"), 600);
    assert_eq!(row("distinct orders"), 600);
    assert_eq!(row("failed"), 30, "every 20th order is marked to fail");
    assert_eq!(
        row("failed cases reported back"),
        30,
        "each failed case reported to the callback"
    );
    assert_eq!(row("early retries"), 0);
}
