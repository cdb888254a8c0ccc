#!/usr/bin/env python3
"""Three Duvo accounts in one bridge, measured from outside.

Starts `duvo-bridge sim` with three keys (each its own budget: `--rate`
requests per `--window` s window) and `duvo-bridge run` with three accounts
(`[duvo]` and two `[[duvo.accounts]]`) and ONE HTTP source whose content
routes send each event by its `/brand` field to the queue of its account.
Posts a backlog of a mixed stream, then, over whole windows of the
simulator (aligned to the epoch, as its limiter is):

1. all three keys working: cases created per queue (= per account) per
   window, against one key's budget (requests x 100 cases);
2. account c's key revoked: a and b must stay at their rate, c at zero;
3. the key restored: everything is delivered, each event exactly once.

Prints one JSON line; exit 1 if a target is missed (aggregate >= 3 x 0.98 of
one key's budget while all work; a and b >= 0.98 each while c is revoked;
exactly once).

    scripts/accounts-budget.py [--bin target/release/duvo-bridge] [--rate 40] [--window 20]

Only the standard library.
"""
import argparse, json, os, subprocess, sys, tempfile, time, uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import free_port, get, http, set_faults, wait_for  # noqa: E402


def stats(base):
    st, body = get(base + "/_sim/stats", timeout=10)
    assert st == 200
    return json.loads(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--rate", type=int, default=40, help="requests per window per key")
    ap.add_argument("--window", type=int, default=20, help="window length, seconds")
    ap.add_argument("--windows", type=int, default=3, help="whole windows measured per phase")
    args = ap.parse_args()
    rpm = args.rate * 60 // args.window
    per_window_cases = args.rate * 100
    # Enough backlog that a and b still have some at the end of phase 2:
    # each phase is a settling window, up to one of alignment and the
    # measured ones.
    per_account = per_window_cases * (2 * args.windows + 6)

    work = tempfile.mkdtemp(prefix="duvo-accounts-")
    keys = ["dv_acct" + uuid.uuid4().hex[:28] for _ in range(3)]
    queues = [str(uuid.uuid4()) for _ in range(3)]
    port = free_port()
    cmd = [args.bin, "sim", "--listen", f"127.0.0.1:{port}", "--rate-limit", str(args.rate),
           "--window-secs", str(args.window)]
    for k in keys:
        cmd += ["--api-key", k]
    for q in queues:
        cmd += ["--queue", q]
    sim = subprocess.Popen(cmd, stdout=open(os.path.join(work, "sim.log"), "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 10), "sim up"
    http_port, admin_port = free_port(), free_port()
    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "KEY_A"
rate_limit_per_minute = {rpm}
[[duvo.accounts]]
name = "b"
api_key_env = "KEY_B"
rate_limit_per_minute = {rpm}
[[duvo.accounts]]
name = "c"
api_key_env = "KEY_C"
rate_limit_per_minute = {rpm}
[outbox]
path = "{work}/outbox"
high_water_events = {per_account * 4}
low_water_events = {per_account * 4 - 1}
[admin]
listen = "127.0.0.1:{admin_port}"
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http_port}"
title = "Order {{/order_id}}"
[[sources.routes]]
name = "brand-a"
pointer = "/brand"
equals = "a"
queue_id = "{queues[0]}"
[[sources.routes]]
name = "brand-b"
pointer = "/brand"
equals = "b"
queue_id = "{queues[1]}"
account = "b"
[[sources.routes]]
name = "brand-c"
pointer = "/brand"
equals = "c"
queue_id = "{queues[2]}"
account = "c"
""")
    env = dict(os.environ, KEY_A=keys[0], KEY_B=keys[1], KEY_C=keys[2])
    log = open(os.path.join(work, "bridge.log"), "w")
    bridge = subprocess.Popen([args.bin, "run", "--config", cfg], env=env, stdout=log, stderr=log)
    out = {"work": work, "rate_per_window": args.rate, "window_s": args.window}
    missed = []
    try:
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 60, 0.05), "bridge ready"
        intake = f"http://127.0.0.1:{http_port}/v1/events"
        # A mixed stream: brands interleaved in every request.
        total = per_account * 3
        for r in range(0, total, 600):
            events = [{"order_id": f"O-{r + i:07d}", "brand": "abc"[(r + i) % 3]} for i in range(600)]
            st, _ = http("POST", intake, json.dumps(events).encode(), {"Content-Type": "application/json"},
                         timeout=60)
            assert st == 202, f"backlog post: {st}"

        def measure(windows):
            start = (int(time.time()) // args.window + 1) * args.window
            time.sleep(max(0.0, start - time.time()))
            a = stats(base)["by_queue"]
            time.sleep(windows * args.window)
            b = stats(base)["by_queue"]
            return [round((b.get(q, 0) - a.get(q, 0)) / (windows * per_window_cases), 3) for q in queues]

        # Let the gates settle into the windows first.
        time.sleep(args.window)
        share = measure(args.windows)
        out["all_working"] = {"per_account_of_budget": share, "aggregate_of_one_key": round(sum(share), 3)}
        if sum(share) < 3 * 0.98:
            missed.append("aggregate")
        set_faults(base, revoked_keys=[keys[2]])
        time.sleep(args.window)  # c's requests in flight fail, the rest goes on
        share = measure(args.windows)
        out["c_revoked"] = {"per_account_of_budget": share}
        if share[0] < 0.98 or share[1] < 0.98 or share[2] != 0:
            missed.append("isolation")
        set_faults(base, revoked_keys=[])
        # Everything delivered, each event once.
        done = wait_for(lambda: stats(base)["cases_total"] >= total, 3600, 2)
        st, body = get(base + "/_sim/cases", timeout=120)
        titles = [json.loads(l)["title"] for l in body.decode().splitlines() if l.strip()]
        out["delivered"] = len(titles)
        out["distinct"] = len(set(titles))
        if not done or len(titles) != total or len(set(titles)) != total:
            missed.append("exactly_once")
        s = stats(base)
        out["rate_limited"] = s["rate_limited"]
        out["early_retries"] = s["early_retries"]
        out["unauthorized"] = s["unauthorized"]
    finally:
        bridge.terminate()
        try:
            bridge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bridge.kill()
        sim.terminate()
        sim.wait()
    out["missed"] = missed
    print(json.dumps(out))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
