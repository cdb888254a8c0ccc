#!/usr/bin/env python3
"""Pacing from outside: the release binary's budget use and latency at 300/min.

Starts `duvo-bridge sim` (300 requests per 60 s window, the production
limit; agents fail `--fail-ratio` of the cases, so the tracker has failures
to find) and `duvo-bridge run` (tracking on, `linger_ms = 50`, an HTTP
source), and measures what an outside client can see:

1. Latency, acknowledgement (the 202) to case created (the simulator's
   `created_at`), one event per request, paced: 2 events/s for 60 s (the
   budget not binding: target p99 <= linger + 50 ms) and then 20 events/s
   for 60 s (binding: target p99 <= 1.25 x the 200 ms request interval).
2. Budget under a backlog: posts `--backlog` events (more than the run can
   deliver), then counts, over `--windows` whole 60 s windows of the
   simulator (aligned to the epoch, as its limiter is), create and listing
   requests from `/_sim/stats` sampled every 50 ms, and the cases the
   agents failed (at least one 100-case listing per 100 failures is the
   floor of following them). Targets: creates >= 98%
   of the window's 300, no second with more than 2x the even share (5/s),
   0 early retries, 0 429s.

Prints one JSON line at the end (bench.py reads it) and exits 1 if a target
is missed.

    scripts/pacing.py [--bin target/release/duvo-bridge] [--windows 2] [--backlog 150000]

Only the standard library: it talks HTTP like any outside client.
"""
import argparse, bisect, datetime, json, os, subprocess, sys, tempfile, threading, time, uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import free_port, get, http, start_sim, wait_for  # noqa: E402

RATE, WINDOW_S, LINGER_MS = 300, 60, 50
INTERVAL_MS = WINDOW_S * 1000 / RATE


def percentile(xs, q):
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def sim_cases(base):
    st, body = get(base + "/_sim/cases", timeout=60)
    assert st == 200, f"/_sim/cases: {st}"
    return [json.loads(l) for l in body.decode().splitlines() if l.strip()]


def created_unix(case):
    return datetime.datetime.fromisoformat(case["created_at"]).timestamp()


def stats(base):
    st, body = get(base + "/_sim/stats", timeout=5)
    assert st == 200, f"/_sim/stats: {st}"
    return json.loads(body)


def latency(base, intake, tag, per_sec, secs):
    """Post one event per request every 1/per_sec s for secs; p50/p99/max ms."""
    acked = {}
    t0 = time.time()
    n = int(per_sec * secs)
    for i in range(n):
        due = t0 + i / per_sec
        if (d := due - time.time()) > 0:
            time.sleep(d)
        order = f"{tag}-{i:06d}"
        body = json.dumps({"order_id": order}).encode()
        st, _ = http("POST", intake, body, {"Content-Type": "application/json"})
        assert st == 202, f"post {order}: {st}"
        acked[f"Order {order}"] = time.time()
    time.sleep(3)
    lat = sorted(max(0.0, (created_unix(c) - acked[c["title"]]) * 1e3)
                 for c in sim_cases(base) if c["title"] in acked)
    assert len(lat) == n, f"{tag}: {len(lat)} of {n} events became cases"
    return {"events": n, "p50_ms": round(percentile(lat, 0.5)), "p99_ms": round(percentile(lat, 0.99)),
            "max_ms": round(lat[-1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--backlog", type=int, default=150_000)
    ap.add_argument("--fail-ratio", type=float, default=0.01)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="duvo-pacing-")
    http_port, admin_port = free_port(), free_port()
    key = "dv_pace" + uuid.uuid4().hex[:28]
    queue = str(uuid.uuid4())
    sim, base = start_sim(args.bin, work, key, [queue], "--rate-limit", str(RATE), "--window-secs", str(WINDOW_S),
                          "--fail-ratio", str(args.fail_ratio))
    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {RATE}
[delivery]
linger_ms = {LINGER_MS}
[outbox]
path = "{work}/outbox"
high_water_events = {args.backlog * 2}
low_water_events = {args.backlog * 2 - 1}
[admin]
listen = "127.0.0.1:{admin_port}"
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http_port}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
""")
    log = open(os.path.join(work, "bridge.log"), "w")
    bridge = subprocess.Popen([args.bin, "run", "--config", cfg], env=dict(os.environ, DUVO_API_KEY=key),
                              stdout=log, stderr=log)
    out = {"work": work}
    try:
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 60, 0.05), "bridge ready"
        intake = f"http://127.0.0.1:{http_port}/v1/events"
        if not args.skip_latency:
            out["idle"] = dict(latency(base, intake, "idle", 2.0, 60), per_sec=2.0,
                               target_ms=LINGER_MS + 50)
            out["binding"] = dict(latency(base, intake, "bind", 20.0, 60), per_sec=20.0,
                                  target_ms=round(INTERVAL_MS * 1.25))

        # The backlog, 500 events per request.
        for r in range(0, args.backlog, 500):
            events = [{"order_id": f"B-{r + i:07d}", "amount": 1234} for i in range(500)]
            st, _ = http("POST", intake, json.dumps(events).encode(), {"Content-Type": "application/json"},
                         timeout=60)
            assert st == 202, f"backlog post: {st}"
        # Sample the simulator's counters from the next window boundary on.
        samples = []
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                s = stats(base)
                samples.append((time.time(), s["create_requests"], s["list_requests"], s["by_status"].get("failed", 0)))
                time.sleep(0.05)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        start_w = (int(time.time()) // WINDOW_S + 1) * WINDOW_S
        end_w = start_w + args.windows * WINDOW_S
        time.sleep(max(0.0, end_w - time.time()) + 1.0)
        stop.set()
        th.join()
        times = [s[0] for s in samples]

        def at(t):  # the sample nearest to t
            i = bisect.bisect_left(times, t)
            return min((samples[j] for j in (i - 1, i) if 0 <= j < len(samples)), key=lambda s: abs(s[0] - t))

        windows = []
        for w in range(args.windows):
            a, b = at(start_w + w * WINDOW_S), at(start_w + (w + 1) * WINDOW_S)
            failed = b[3] - a[3]
            windows.append({"creates": b[1] - a[1], "listings": b[2] - a[2], "failed": failed,
                            "listing_floor": -(-failed // 100)})
        creates = sum(w["creates"] for w in windows)
        listings = sum(w["listings"] for w in windows)
        busiest = 0
        inside = [s for s in samples if start_w <= s[0] <= end_w]
        for s in inside:
            j = bisect.bisect_left(times, s[0] + 1.0)
            if j < len(samples):
                e = samples[j - 1]
                busiest = max(busiest, (e[1] + e[2]) - (s[1] + s[2]))
        st = stats(base)
        out["budget"] = {
            "windows": windows, "creates_per_budget": round(creates / (RATE * args.windows), 3),
            "listings": listings, "busiest_second": busiest, "even_share_per_s": RATE / WINDOW_S,
            "early_retries": st["early_retries"], "rate_limited": st["rate_limited"],
            "cases_created": st["cases_created"],
        }
    finally:
        bridge.terminate()
        try:
            bridge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bridge.kill()
        sim.terminate()
        sim.wait()
    b = out["budget"]
    missed = []
    if b["creates_per_budget"] < 0.98:
        missed.append("creates/budget")
    if b["busiest_second"] > 2 * b["even_share_per_s"] or b["early_retries"] or b["rate_limited"]:
        missed.append("pacing")
    for tag in ("idle", "binding"):
        if tag in out and out[tag]["p99_ms"] > out[tag]["target_ms"]:
            missed.append(f"latency {tag}")
    out["missed"] = missed
    print(json.dumps(out))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
