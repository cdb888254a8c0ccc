#!/usr/bin/env python3
"""Several bridge replicas on one API key: how much of the key's budget do
they use together, and does any of them retry before a 429's deadline?

Starts `duvo-bridge sim` (a fixed window of --window-secs with --limit
requests per key) and N `duvo-bridge run` replicas, each with its own
outbox and HTTP source, all with the same key and `rate_share = --share`.
Each replica gets a backlog much larger than it can deliver, so the budget
is the only limit. After --warmup-windows windows (the gates learn the
server's window length from two consecutive resets), it measures the
requests the simulator accepted over --windows whole windows, sampled at
window boundaries, and prints the share of the budget used, the 429s and
the early retries (requests sent by any replica while the key still had an
unexpired 429 deadline).

    scripts/replicas-budget.py --bin target/debug/duvo-bridge --replicas 3

Exit status 0 when usage >= --min-usage and there were no early retries.
Only the standard library.
"""
import argparse, json, os, subprocess, sys, tempfile, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import free_port, get, http, wait_for  # noqa: E402


def stats(base):
    return json.loads(get(base + "/_sim/stats")[1])


def accepted(s):
    """Requests the simulator let through (answered 2xx)."""
    return sum(n for code, n in s["responses"].items() if code.startswith("2"))


def sleep_to_boundary(window, offset):
    """Sleep until `offset` seconds after the next multiple of `window` (epoch-aligned)."""
    now = time.time()
    nxt = (int(now // window) + 1) * window + offset
    time.sleep(nxt - now)
    return nxt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/duvo-bridge")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--limit", type=int, default=50, help="requests per window per key")
    ap.add_argument("--window-secs", type=int, default=10)
    ap.add_argument("--share", type=float, default=None, help="rate_share per replica (default 1/N)")
    ap.add_argument("--warmup-windows", type=int, default=3)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--max-batch", type=int, default=2, help="cases per request (keeps the sim small)")
    ap.add_argument("--min-usage", type=float, default=0.90)
    args = ap.parse_args()
    share = args.share or round(1.0 / args.replicas, 4)

    work = tempfile.mkdtemp(prefix="duvo-replicas-")
    sim_port = free_port()
    key = "dv_rep" + uuid.uuid4().hex[:29]
    queue = str(uuid.uuid4())
    procs = []
    sim_log = open(os.path.join(work, "sim.log"), "w")
    procs.append(subprocess.Popen(
        [args.bin, "sim", "--listen", f"127.0.0.1:{sim_port}", "--api-key", key, "--queue", queue,
         "--rate-limit", str(args.limit), "--window-secs", str(args.window_secs),
         "--process-ms", "100"], stdout=sim_log, stderr=sim_log))
    base = f"http://127.0.0.1:{sim_port}"
    try:
        assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 20), "sim up"
        # Per-minute rate the key allows; each replica is configured for all
        # of it and takes `share` of what the server announces.
        rpm = args.limit * 60 // args.window_secs
        replicas = []
        for i in range(args.replicas):
            http_port, admin_port = free_port(), free_port()
            d = os.path.join(work, f"r{i}")
            os.makedirs(d)
            cfg = os.path.join(d, "bridge.toml")
            with open(cfg, "w") as f:
                f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {rpm}
rate_share = {share}
[outbox]
path = "{d}/outbox"
[delivery]
max_batch = {args.max_batch}
linger_ms = 20
[admin]
listen = "127.0.0.1:{admin_port}"
[shutdown]
grace_period_secs = 2
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http_port}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
""")
            log = open(os.path.join(d, "bridge.log"), "w")
            env = dict(os.environ, DUVO_API_KEY=key, RUST_LOG="info")
            procs.append(subprocess.Popen([args.bin, "run", "--config", cfg], env=env,
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL))
            replicas.append((http_port, admin_port))
        for _, admin in replicas:
            assert wait_for(lambda: get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, 60), "replica ready"
        # Backlog: more than each replica can deliver during the run.
        total_windows = args.warmup_windows + args.windows + 2
        per_replica = int(args.limit * total_windows * args.max_batch * share * 1.5) + 200
        for i, (port, _) in enumerate(replicas):
            for c in range(0, per_replica, 500):
                body = json.dumps([{"order_id": f"R{i}-{n}"} for n in range(c, min(c + 500, per_replica))])
                st, b = http("POST", f"http://127.0.0.1:{port}/v1/events", body.encode(),
                             {"Content-Type": "application/json", "Idempotency-Key": f"r{i}-{c}"}, timeout=60)
                assert st == 202, (st, b)
        print(f"{args.replicas} replicas, rate_share {share}, key limit {args.limit}/{args.window_secs}s "
              f"({rpm}/min), backlog {per_replica} events each, {args.max_batch} cases/request")

        # Sample just after boundaries; the gate holds requests until
        # reset + 100 ms, so few requests straddle a sample.
        off = 0.05
        t = sleep_to_boundary(args.window_secs, off)
        for _ in range(args.warmup_windows - 1):
            t = sleep_to_boundary(args.window_secs, off)
        s0 = stats(base)
        per_window = []
        prev = accepted(s0)
        for _ in range(args.windows):
            sleep_to_boundary(args.window_secs, off)
            s = stats(base)
            a = accepted(s)
            per_window.append(a - prev)
            prev = a
        s1 = stats(base)
        used = accepted(s1) - accepted(s0)
        budget = args.limit * args.windows
        usage = used / budget
        r429 = s1["rate_limited"]
        early = s1["early_retries"]
        per_replica_rpm = []
        for _, admin in replicas:
            _, m = get(f"http://127.0.0.1:{admin}/metrics")
            line = [l for l in m.decode().splitlines() if l.startswith("duvo_bridge_rate_gate_effective_rpm{")]
            per_replica_rpm.append(float(line[0].split()[1]) if line else None)
        print(f"per window: {per_window} (limit {args.limit})")
        print(f"pace per replica (req/min): {per_replica_rpm}")
        print(json.dumps({"replicas": args.replicas, "share": share, "windows": args.windows,
                          "accepted": used, "budget": budget, "usage": round(usage, 4),
                          "rate_limited_total": r429, "early_retries_total": early,
                          "rate_limited_in_measurement": r429 - s0["rate_limited"]}))
        ok = usage >= args.min_usage and early == 0
        print("RESULT:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        print("logs in", work)


if __name__ == "__main__":
    sys.exit(main())
