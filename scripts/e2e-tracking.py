#!/usr/bin/env python3
"""Outside-in check of case tracking and failure reports (issue 6's "done when").

Starts `duvo-bridge sim --fail-ratio 0.1` (300 requests/min, two queues) and
`duvo-bridge run` with two HTTP sources, one per queue, each with its own
signed callback receiver (this script). Posts N events per source, SIGKILLs
and restarts the bridge once while cases are being tracked, waits until every
case has ended, then checks:

- every failed case was reported to its own source's callback, under exactly
  one report id (a copy re-sent after the kill carries the same id);
- no completed case was reported, and the bridge tracks nothing open;
- every callback's HMAC-SHA256 signature verifies;
- tracking used at most one listing per 100 finished cases plus one per poll
  interval per queue.

    scripts/e2e-tracking.py [--bin target/release/duvo-bridge] [--events 10000]

Only the standard library: it talks HTTP like any outside client.
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import Receiver, free_port, get, http, wait_for  # noqa: E402

SECRET = b"e2e-callback-secret"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--events", type=int, default=10000, help="per source")
    ap.add_argument("--per-request", type=int, default=500)
    ap.add_argument("--poll-ms", type=int, default=2000)
    ap.add_argument("--kill", type=int, default=1, help="SIGKILLs during tracking")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="duvo-e2e-track-")
    sim_port, admin_port = free_port(), free_port()
    key = "dv_e2e" + uuid.uuid4().hex[:29]
    names = ["oms", "shop"]
    queues = {n: str(uuid.uuid4()) for n in names}
    ports = {n: free_port() for n in names}
    receivers = {n: Receiver(SECRET) for n in names}
    sim_log = open(os.path.join(work, "sim.log"), "w")
    cmd = [args.bin, "sim", "--listen", f"127.0.0.1:{sim_port}", "--api-key", key, "--fail-ratio", "0.1"]
    for q in queues.values():
        cmd += ["--queue", q]
    sim = subprocess.Popen(cmd, stdout=sim_log, stderr=sim_log)
    base = f"http://127.0.0.1:{sim_port}"
    assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 10), "sim up"

    cfg = os.path.join(work, "bridge.toml")
    sources = "".join(f"""
[[sources]]
type = "http"
name = "{n}"
listen = "127.0.0.1:{ports[n]}"
queue_id = "{queues[n]}"
title = "Order {{/order_id}}"
callback_url = "{receivers[n].url}"
callback_secret_env = "CALLBACK_SECRET"
""" for n in names)
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = 300
[outbox]
path = "{work}/outbox"
[tracking]
poll_interval_ms = {args.poll_ms}
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
format = "json"
{sources}""")
    bridge_log = open(os.path.join(work, "bridge.log"), "a")
    env = dict(os.environ, DUVO_API_KEY=key, CALLBACK_SECRET=SECRET.decode())

    def start_bridge():
        p = subprocess.Popen([args.bin, "run", "--config", cfg], env=env, stdout=bridge_log, stderr=bridge_log)
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 20), "bridge ready"
        return p

    def stats():
        st, b = get(base + "/_sim/stats")
        return json.loads(b) if st == 200 else {}

    bridge = start_bridge()
    t0 = time.time()
    total = 0
    for n in names:
        for r in range(args.events // args.per_request):
            events = [{"order_id": f"{n}-{r * args.per_request + i:07d}"} for i in range(args.per_request)]
            while True:
                st, _ = http("POST", f"http://127.0.0.1:{ports[n]}/v1/events", json.dumps(events).encode(),
                             {"Content-Type": "application/json", "Idempotency-Key": f"{n}-{r}"})
                if st == 202:
                    total += len(events)
                    break
                time.sleep(0.2)
    print(f"posted {total} events in {time.time() - t0:.1f}s", flush=True)

    for k in range(args.kill):
        # Kill once reports are flowing: a third of the way through creation.
        wait_for(lambda: stats().get("cases_created", 0) >= total * (k + 1) / (args.kill + 2), 600, every=0.5)
        bridge.send_signal(signal.SIGKILL); bridge.wait()
        print(f"SIGKILL at {stats().get('cases_created')} cases, "
              f"{sum(len(r.snapshot()) for r in receivers.values())} reports received; restarting", flush=True)
        bridge = start_bridge()

    def ended():
        s = stats()
        b = s.get("by_status", {})
        return s.get("cases_created", 0) >= total and b.get("completed", 0) + b.get("failed", 0) >= total
    ok_end = wait_for(ended, 900, every=1)
    t_end = time.time()
    _, nd = get(base + "/_sim/cases", timeout=120)
    cases = [json.loads(line) for line in nd.decode().splitlines() if line.strip()]
    failed = {n: {c["id"] for c in cases if c["queue_id"] == queues[n] and c["status"] == "failed"} for n in names}
    want = sum(len(v) for v in failed.values())
    ok_rep = wait_for(lambda: all({j["case_id"] for _, j in receivers[n].snapshot()} >= failed[n] for n in names),
                      900, every=1)
    t_reported = time.time()

    def open_cases():
        _, m = get(f"http://127.0.0.1:{admin_port}/metrics")
        return next((float(l.split()[-1]) for l in m.decode().splitlines()
                     if l.startswith('duvo_bridge_tracked_cases{phase="open"}')), -1)
    # Completions are forgotten by the cleanup stream, inside the tracking
    # share: a burst of them takes a while (3,000 cases/min at 10% of 300/min).
    wait_for(lambda: open_cases() == 0, 1200, every=2)
    t_clean = time.time()
    time.sleep(args.poll_ms / 1000 * 2)
    s = stats()
    open_after = open_cases()
    bridge.send_signal(signal.SIGTERM); bridge.wait(timeout=30)
    sim.send_signal(signal.SIGTERM); sim.wait(timeout=10)
    elapsed = time.time() - t0

    good = ok_end and ok_rep and open_after == 0
    for n in names:
        got = receivers[n].snapshot()
        ids_per_case = {}
        for rid, j in got:
            ids_per_case.setdefault(j["case_id"], set()).add(rid)
            good &= j["status"] == "failed" and j["queue_id"] == queues[n] and j["event"]["order_id"].startswith(n)
        multi = {c: ids for c, ids in ids_per_case.items() if len(ids) > 1}
        extra = set(ids_per_case) - failed[n]
        missing = failed[n] - set(ids_per_case)
        print(f"source {n}: failed={len(failed[n])} reported={len(ids_per_case)} callbacks={len(got)} "
              f"(re-sends {len(got) - len(ids_per_case)}) missing={len(missing)} not_failed={len(extra)} "
              f"several_ids={len(multi)} bad_signatures={receivers[n].bad_signatures}")
        good &= not missing and not extra and not multi and receivers[n].bad_signatures == 0
    finished = s["by_status"].get("completed", 0) + s["by_status"].get("failed", 0)
    tracking_s = t_clean - t0
    bound = finished / 100 + len(names) * tracking_s / (args.poll_ms / 1000)
    print(json.dumps({k: s[k] for k in ("requests", "create_requests", "list_requests", "cases_created",
                                        "rate_limited", "early_retries")}))
    print(f"finished={finished} failed_reported={want} list_requests={s['list_requests']} "
          f"bound={bound:.0f} (finished/100 + queues x {tracking_s:.0f}s / poll) "
          f"open_after={open_after:.0f} early_retries={s['early_retries']} elapsed={elapsed:.1f}s")
    print(f"timeline: cases ended at {t_end - t0:.0f}s, every failure reported at {t_reported - t0:.0f}s, "
          f"every completion forgotten at {t_clean - t0:.0f}s")
    good &= s["list_requests"] <= bound and s["early_retries"] == 0
    print("RESULT:", "PASS" if good else f"FAIL (logs in {work})")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
