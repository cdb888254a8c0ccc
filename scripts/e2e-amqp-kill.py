#!/usr/bin/env python3
"""Outside-in durability check of the AMQP intake (issue 5, intake half).

Starts `duvo-bridge sim` and `duvo-bridge run` with an AMQP source on the
local RabbitMQ, publishes N persistent messages with pika (each with a
message_id), SIGKILLs and restarts the bridge once and closes every broker
connection once (`rabbitmqctl close_all_connections`) while it consumes,
then checks that every message is exactly one case in the simulator and
that the queue is empty (everything acked).

    pip install pika
    scripts/e2e-amqp-kill.py [--bin target/release/duvo-bridge] [--messages 50000] [--rate 300]
"""
import argparse, json, os, signal, socket, subprocess, sys, tempfile, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import cases_per_order, free_port, get, http, wait_for  # noqa: E402

import pika


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--rate", type=int, default=300, help="API requests per minute (sim and bridge)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="duvo-amqp-e2e-")
    queue_name = "duvo-e2e-" + uuid.uuid4().hex[:8]
    sim_port, admin_port = free_port(), free_port()
    key = "dv_e2e" + uuid.uuid4().hex[:29]
    qid = str(uuid.uuid4())
    log = open(os.path.join(work, "sim.log"), "w")
    sim = subprocess.Popen([args.bin, "sim", "--listen", f"127.0.0.1:{sim_port}", "--api-key", key,
                            "--queue", qid, "--rate-limit", str(args.rate)], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{sim_port}"
    assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 10), "sim up"
    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {args.rate}
[outbox]
path = "{work}/outbox"
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
format = "json"
[[sources]]
type = "amqp"
name = "rabbit"
uri = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "{queue_name}"
declare = true
prefetch = 200
queue_id = "{qid}"
title = "Order {{/order_id}}"
""")
    blog = open(os.path.join(work, "bridge.log"), "a")
    env = dict(os.environ, DUVO_API_KEY=key)

    def start_bridge():
        p = subprocess.Popen([args.bin, "run", "--config", cfg], env=env, stdout=blog, stderr=blog)
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 30), "bridge ready"
        return p

    bridge = start_bridge()
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    ch = conn.channel()
    ch.confirm_delivery()
    t0 = time.time()
    props = lambda i: pika.BasicProperties(delivery_mode=2, message_id=f"msg-{i}",
                                           content_type="application/json")
    for i in range(args.messages):
        ch.basic_publish("", queue_name, json.dumps({"order_id": f"ORD-{i:07d}", "n": i}).encode(),
                         props(i))
    conn.close()
    print(f"published {args.messages} persistent messages (publisher confirms) in {time.time() - t0:.1f}s",
          flush=True)

    def created():
        st, b = get(base + "/_sim/stats")
        return json.loads(b)["cases_created"] if st == 200 else 0

    wait_for(lambda: created() >= args.messages // 5, 600, every=0.5)
    bridge.send_signal(signal.SIGKILL); bridge.wait()
    print(f"SIGKILL bridge at {created()} cases; restarting", flush=True)
    bridge = start_bridge()
    wait_for(lambda: created() >= args.messages // 2, 600, every=0.5)
    out = subprocess.run(["rabbitmqctl", "close_all_connections", "e2e: connection kill"],
                         capture_output=True, text=True)
    print(f"rabbitmqctl close_all_connections at {created()} cases: exit {out.returncode}", flush=True)

    ok = wait_for(lambda: created() >= args.messages, 1200, every=1)
    time.sleep(2)
    st, b = get(base + "/_sim/stats"); stats = json.loads(b)
    counts = cases_per_order(base)
    _, m = get(f"http://127.0.0.1:{admin_port}/metrics")
    reconnects = [l for l in m.decode().splitlines() if l.startswith("duvo_bridge_amqp_reconnects_total")]
    bridge.send_signal(signal.SIGTERM); bridge.wait(timeout=60)
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    ch = conn.channel()
    left = ch.queue_declare(queue_name, passive=True).method.message_count
    ch.queue_delete(queue_name); conn.close()
    sim.send_signal(signal.SIGTERM); sim.wait(timeout=10)

    expected = {f"ORD-{i:07d}" for i in range(args.messages)}
    missing = expected - counts.keys()
    dups = {k: v for k, v in counts.items() if v > 1}
    print(json.dumps({k: stats[k] for k in ("requests", "create_requests", "cases_created", "rate_limited",
                                            "early_retries", "idempotent_replays")}))
    print(f"reconnect counter after the kill: {reconnects}")
    print(f"messages={args.messages} cases={sum(counts.values())} missing={len(missing)} duplicates={len(dups)} "
          f"left_in_queue={left} early_retries={stats['early_retries']} elapsed={time.time() - t0:.1f}s")
    good = ok and not missing and not dups and left == 0 and stats["early_retries"] == 0
    print("RESULT:", "PASS" if good else f"FAIL (logs in {work})")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
