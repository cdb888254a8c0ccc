#!/usr/bin/env python3
"""Soak: N events end to end, memory and disk sampled until everything is delivered.

Starts `duvo-bridge sim` at a raised limit and `duvo-bridge run` (release
build, tracking on) with an HTTP source, posts N events (~0.5 KiB each, 200
per request, two clients, each request with its own Idempotency-Key) as fast
as the bridge takes them, and samples every `--every` seconds: events
acknowledged, cases created, outbox depth, the bridge's RSS (and peak), and
the outbox directory's size on disk. It waits until every event is a case and
the outbox is empty, samples `--after` seconds more, then checks that every
event is a case exactly once.

    scripts/soak.py [--bin target/release/duvo-bridge] [--events 1000000] [--rate 60000]
        [--cache-mb 32] [--waiting]

`--waiting` first posts everything with the API down (a backlog: peak RSS
and disk with N events waiting), then SIGKILLs the bridge and restarts it
(seconds until `/readyz` answers 200, RSS then), then ends the outage and
delivers as above.

Only the standard library: it talks HTTP like any outside client.
"""
import argparse, json, os, signal, subprocess, sys, tempfile, threading, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import cases_per_order, free_port, get, http, metric, set_faults, start_sim, wait_for  # noqa: E402


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def proc_status(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--per-request", type=int, default=200)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rate", type=int, default=60000, help="API requests per minute (sim and bridge)")
    ap.add_argument("--every", type=float, default=10.0)
    ap.add_argument("--after", type=float, default=60.0, help="seconds sampled after the last delivery")
    ap.add_argument("--max-wait", type=float, default=5400.0)
    ap.add_argument("--cache-mb", type=int, default=None, help="[outbox] cache_mb (default: the bridge's)")
    ap.add_argument("--waiting", action="store_true",
                    help="post with the API down, SIGKILL and restart with the backlog, then deliver")
    ap.add_argument("--only-waiting", action="store_true",
                    help="with --waiting: stop once the restarted bridge has loaded its backlog")
    ap.add_argument("--deliver-for", type=float, default=None,
                    help="with --waiting: sample this many seconds of delivery, then stop (no completeness check)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="duvo-soak-")
    http_port, admin_port = free_port(), free_port()
    key = "dv_soak" + uuid.uuid4().hex[:28]
    queue = str(uuid.uuid4())
    sim, base = start_sim(args.bin, work, key, [queue], "--rate-limit", str(args.rate))
    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {args.rate}
[outbox]
path = "{work}/outbox"
high_water_events = {max(args.events + 1, 1000)}
low_water_events = {max(args.events, 999)}
{f"cache_mb = {args.cache_mb}" if args.cache_mb else ""}
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
    blog = open(os.path.join(work, "bridge.log"), "a")

    def start_bridge():
        p = subprocess.Popen([args.bin, "run", "--config", cfg], env=dict(os.environ, DUVO_API_KEY=key),
                             stdout=blog, stderr=blog)
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 120, 0.02), "bridge ready"
        return p

    if args.waiting:
        set_faults(base, outage=True)
    bridge = start_bridge()

    acked = [0] * args.clients
    pad = "x" * 400  # ~0.5 KiB per event with the rest

    def client(c):
        n_req = args.events // args.per_request
        for r in range(c, n_req, args.clients):
            events = [{"order_id": f"ORD-{r * args.per_request + i:08d}", "note": pad}
                      for i in range(args.per_request)]
            body = json.dumps(events).encode()
            while True:
                st, _ = http("POST", f"http://127.0.0.1:{http_port}/v1/events", body,
                             {"Content-Type": "application/json", "Idempotency-Key": f"soak-{r}"}, timeout=60)
                if st == 202:
                    acked[c] += args.per_request
                    break
                time.sleep(0.2)

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    waiting = None
    if args.waiting:
        for t in threads:
            t.join()
        time.sleep(5)
        p = proc_status(bridge.pid)
        disk = du(os.path.join(work, "outbox"))
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        t_kill = time.time()
        blog.flush()
        log_from = os.path.getsize(blog.name)
        bridge = start_bridge()
        ready_s = time.time() - t_kill
        rss_ready = proc_status(bridge.pid).get("VmRSS", 0)
        # Until the background load says it is done (the log line), then 2 s.

        def loaded():
            with open(blog.name) as f:
                f.seek(log_from)
                return "outbox events loaded" in f.read()
        wait_for(loaded, 300, 0.2)
        load_s = time.time() - t_kill
        time.sleep(2)
        p2 = proc_status(bridge.pid)
        waiting = dict(acknowledged_in_s=round(t_kill - t0, 1), waiting_rss_mib=p.get("VmRSS", 0) >> 20,
                       waiting_peak_rss_mib=p.get("VmHWM", 0) >> 20, disk_mib=disk >> 20,
                       ready_after_sigkill_s=round(ready_s, 2), rss_at_ready_mib=rss_ready >> 20,
                       loaded_after_sigkill_s=round(load_s, 1), rss_loaded_mib=p2.get("VmRSS", 0) >> 20,
                       peak_after_restart_mib=p2.get("VmHWM", 0) >> 20)
        print(f"{args.events} waiting: {waiting}", flush=True)
        if args.only_waiting:
            bridge.send_signal(signal.SIGKILL); sim.send_signal(signal.SIGTERM)
            print(json.dumps(waiting))
            return
        set_faults(base, outage=False)
        t_deliver = time.time()


    def created():
        st, b = get(base + "/_sim/stats", timeout=30)
        return json.loads(b)["cases_created"] if st == 200 else -1

    print(f"{'t_s':>6} {'acked':>9} {'cases':>9} {'depth':>9} {'rss_mib':>8} {'peak_mib':>8} {'disk_mib':>8}", flush=True)
    samples = []
    intake_done = delivered_at = None
    while True:
        time.sleep(args.every)
        p = proc_status(bridge.pid)
        depth = metric(admin_port, "duvo_bridge_outbox_depth ")
        s = dict(t=time.time() - t0, acked=sum(acked), cases=created(), depth=-1 if depth is None else depth,
                 rss=p.get("VmRSS", 0), peak=p.get("VmHWM", 0), disk=du(os.path.join(work, "outbox")))
        samples.append(s)
        print(f"{s['t']:6.0f} {s['acked']:9d} {s['cases']:9d} {s['depth']:9.0f} {s['rss'] / 2**20:8.0f} "
              f"{s['peak'] / 2**20:8.0f} {s['disk'] / 2**20:8.0f}", flush=True)
        if intake_done is None and s["acked"] >= args.events:
            intake_done = s["t"]
        if delivered_at is None and s["cases"] >= args.events and s["depth"] == 0:
            delivered_at = s["t"]
        if delivered_at is not None and s["t"] - delivered_at >= args.after:
            break
        if s["t"] > args.max_wait:
            break
        if args.deliver_for is not None and time.time() - t_deliver >= args.deliver_for:
            bridge.send_signal(signal.SIGKILL); sim.send_signal(signal.SIGTERM)
            d = [x for x in samples if x["t"] >= t_deliver - t0]
            out = dict(waiting, delivering_s=round(time.time() - t_deliver), cases=d[-1]["cases"],
                       rss_delivering_max_mib=max(x["rss"] for x in d) >> 20)
            print(json.dumps(out))
            return

    counts = cases_per_order(base, timeout=600)
    _, b = get(base + "/_sim/stats"); stats = json.loads(b)
    bridge.send_signal(signal.SIGTERM); bridge.wait(timeout=120)
    sim.send_signal(signal.SIGTERM); sim.wait(timeout=30)
    missing = args.events - len(counts)
    dups = sum(1 for v in counts.values() if v > 1)
    peak = max(s["peak"] for s in samples)
    print(f"events={args.events} acknowledged_in={intake_done}s delivered_in={delivered_at}s "
          f"cases={sum(counts.values())} missing={missing} duplicated={dups} peak_rss_mib={peak / 2**20:.0f} "
          f"disk_mib_at_end={samples[-1]['disk'] / 2**20:.0f} max_disk_mib={max(s['disk'] for s in samples) / 2**20:.0f} "
          f"create_requests={stats['create_requests']} cases_per_request={stats['cases_created'] / max(1, stats['create_requests']):.1f}")
    with open(os.path.join(work, "samples.json"), "w") as f:
        json.dump(samples, f)
    if waiting:
        print(f"waiting backlog: {waiting}")
    good = delivered_at is not None and missing == 0 and dups == 0
    print("RESULT:", "PASS" if good else "FAIL", f"(logs and samples.json in {work})")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
