#!/usr/bin/env python3
"""Outside-in durability check of the HTTP pipeline (issue 3's "done when").

Starts `duvo-bridge sim` (default 300 requests/min) and `duvo-bridge run`,
posts N events in arrays of 200 (each request with its own Idempotency-Key,
retried until 202 like a careful client), SIGKILLs and restarts the bridge
twice while posting, then checks in the simulator that every acknowledged
event is a case exactly once, that no request came before a retry-after
deadline, and how many cases each create request carried.

    scripts/e2e-http-kill.py [--bin target/release/duvo-bridge] [--events 20000]
        [--kills 2] [--idempotency ignore] [--drop-ratio 0.2] [--rate 300]

`--idempotency ignore` runs a simulator that disregards Idempotency-Key, and
`--drop-ratio` makes it carry out that share of creates without answering
(the connection just stays silent until the bridge's timeout): only the
bridge's own reconciliation then stands between a retry and a duplicate.

Only the standard library: it talks HTTP like any outside client.
"""
import argparse, json, os, signal, socket, subprocess, sys, tempfile, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import cases_per_order, free_port, get, http, wait_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--per-request", type=int, default=200)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--idempotency", choices=["honour", "ignore"], default="honour")
    ap.add_argument("--drop-ratio", type=float, default=0.0,
                    help="share of creates carried out without an answer")
    ap.add_argument("--rate", type=int, default=300, help="API requests per minute (sim and bridge)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="duvo-e2e-")
    sim_port, http_port, admin_port = free_port(), free_port(), free_port()
    key = "dv_e2e" + uuid.uuid4().hex[:29]
    queue = str(uuid.uuid4())
    sim_log = open(os.path.join(work, "sim.log"), "w")
    sim = subprocess.Popen([args.bin, "sim", "--listen", f"127.0.0.1:{sim_port}", "--api-key", key,
                            "--queue", queue, "--idempotency", args.idempotency,
                            "--rate-limit", str(args.rate)], stdout=sim_log, stderr=sim_log)
    base = f"http://127.0.0.1:{sim_port}"
    assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 10), "sim up"
    if args.drop_ratio:
        st, _ = http("POST", base + "/_sim/faults",
                     json.dumps({"drop_after_commit_ratio": args.drop_ratio}).encode(),
                     {"Content-Type": "application/json"})
        assert st == 200, f"faults: {st}"

    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {args.rate}
timeout_secs = 5
[outbox]
path = "{work}/outbox"
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
format = "json"
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http_port}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
""")
    bridge_log = open(os.path.join(work, "bridge.log"), "a")
    env = dict(os.environ, DUVO_API_KEY=key)

    def start_bridge():
        p = subprocess.Popen([args.bin, "run", "--config", cfg], env=env, stdout=bridge_log, stderr=bridge_log)
        ok = wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 20)
        assert ok, "bridge ready"
        return p

    bridge = start_bridge()
    t0 = time.time()
    n_req = args.events // args.per_request
    kill_at = {int(n_req * (k + 1) / (args.kills + 1)) for k in range(args.kills)}
    acknowledged = 0
    retries = 0
    for r in range(n_req):
        if r in kill_at:
            bridge.send_signal(signal.SIGKILL); bridge.wait()
            print(f"SIGKILL bridge before request {r}; restarting", flush=True)
            bridge = start_bridge()
        events = [{"order_id": f"ORD-{r * args.per_request + i:07d}", "request": r}
                  for i in range(args.per_request)]
        body = json.dumps(events).encode()
        while True:
            st, resp = http("POST", f"http://127.0.0.1:{http_port}/v1/events", body,
                            {"Content-Type": "application/json", "Idempotency-Key": f"e2e-{r}"})
            if st == 202:
                acknowledged += args.per_request
                break
            retries += 1
            time.sleep(0.2)
    print(f"posted {acknowledged} events in {time.time() - t0:.1f}s ({retries} client retries)", flush=True)

    def created():
        st, b = get(base + "/_sim/stats")
        return json.loads(b)["cases_created"] if st == 200 else 0
    def depth():
        st, b = get(f"http://127.0.0.1:{admin_port}/metrics")
        for line in (b.decode() if isinstance(b, bytes) else b).splitlines() if st == 200 else []:
            if line.startswith("duvo_bridge_outbox_depth "):
                return float(line.split()[1])
        return -1
    ok = wait_for(lambda: created() >= acknowledged and depth() == 0, 600, every=1)
    time.sleep(2)
    if args.drop_ratio:
        http("POST", base + "/_sim/faults", json.dumps({"drop_after_commit_ratio": 0.0}).encode(),
             {"Content-Type": "application/json"})
    st, b = get(base + "/_sim/stats"); stats = json.loads(b)
    counts = cases_per_order(base)
    bridge.send_signal(signal.SIGTERM); bridge.wait(timeout=30)
    sim.send_signal(signal.SIGTERM); sim.wait(timeout=10)

    expected = {f"ORD-{i:07d}" for i in range(acknowledged)}
    missing = expected - counts.keys()
    dups = {k: v for k, v in counts.items() if v > 1}
    elapsed = time.time() - t0
    print(json.dumps({k: stats[k] for k in ("requests", "create_requests", "cases_created", "rate_limited",
                                            "early_retries", "idempotent_replays", "list_requests",
                                            "dropped_after_commit")}))
    print(f"acknowledged={acknowledged} cases={sum(counts.values())} distinct={len(counts)} "
          f"missing={len(missing)} duplicates={len(dups)} early_retries={stats['early_retries']} "
          f"cases/create_request={stats['cases_created'] / max(1, stats['create_requests']):.1f} "
          f"elapsed={elapsed:.1f}s")
    good = ok and not missing and not dups and stats["early_retries"] == 0 and len(counts) == acknowledged
    print("RESULT:", "PASS" if good else f"FAIL (logs in {work})")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
