#!/usr/bin/env python3
"""Outside-in check of the AMQP source and its failure reports (issue 5).

Starts `duvo-bridge sim` and `duvo-bridge run` with an AMQP source on the
local RabbitMQ, publishes N persistent messages with pika (each with a
message_id; every 100th, i.e. 1%, carries `"simulate":"fail"` so its case
fails), SIGKILLs and restarts the bridge once and closes every broker
connection of its own vhost once (`rabbitmqctl close_all_connections
--vhost duvo-e2e`, so other users of the broker are not disturbed) while
it consumes, then checks that:
- every message is exactly one case in the simulator and the queue is
  empty (everything acked);
- every failed case produced a report on the failure exchange (read from a
  queue bound to it, so the broker confirmed and routed it), correlated to
  the original message id (`correlation_id`), with the case id in the
  `x-duvo-case-id` header, and exactly one report id per failed message
  (a copy re-sent after the SIGKILL would carry the same id).

    pip install pika
    scripts/e2e-amqp-kill.py [--bin target/release/duvo-bridge] [--messages 50000] [--rate 300]
"""
import argparse, json, os, signal, socket, subprocess, sys, tempfile, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import cases_per_order, free_port, get, http, wait_for  # noqa: E402

import pika

VHOST = "duvo-e2e"


def params():
    return pika.ConnectionParameters("127.0.0.1", 5672, VHOST)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--rate", type=int, default=300, help="API requests per minute (sim and bridge)")
    ap.add_argument("--fail-every", type=int, default=100, help="every n-th message fails (0: none)")
    args = ap.parse_args()
    fails = lambda i: args.fail_every > 0 and i % args.fail_every == 0

    # A vhost of its own (idempotent), so the connection kill stays local.
    subprocess.run(["rabbitmqctl", "add_vhost", VHOST], capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"],
                   capture_output=True, check=True)
    work = tempfile.mkdtemp(prefix="duvo-amqp-e2e-")
    queue_name = "duvo-e2e-" + uuid.uuid4().hex[:8]
    failures = queue_name + ".failures"       # the failure exchange (topic)
    reports_q = queue_name + ".reports"       # a queue bound to it, read at the end
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
uri = "amqp://guest:guest@127.0.0.1:5672/{VHOST}"
queue = "{queue_name}"
declare = true
prefetch = 200
queue_id = "{qid}"
title = "Order {{/order_id}}"
failure_exchange = "{failures}"
failure_routing_key = "orders.failed"
""")
    conn = pika.BlockingConnection(params())
    ch = conn.channel()
    ch.exchange_declare(failures, exchange_type="topic", durable=True)
    ch.queue_declare(reports_q, durable=True)
    ch.queue_bind(reports_q, failures, routing_key="#")
    conn.close()
    blog = open(os.path.join(work, "bridge.log"), "a")
    env = dict(os.environ, DUVO_API_KEY=key)

    def start_bridge():
        p = subprocess.Popen([args.bin, "run", "--config", cfg], env=env, stdout=blog, stderr=blog)
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 30), "bridge ready"
        return p

    bridge = start_bridge()
    conn = pika.BlockingConnection(params())
    ch = conn.channel()
    ch.confirm_delivery()
    t0 = time.time()
    props = lambda i: pika.BasicProperties(delivery_mode=2, message_id=f"msg-{i}",
                                           content_type="application/json")
    for i in range(args.messages):
        body = {"order_id": f"ORD-{i:07d}", "n": i}
        if fails(i):
            body["simulate"] = "fail"
        ch.basic_publish("", queue_name, json.dumps(body).encode(), props(i))
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
    out = subprocess.run(["rabbitmqctl", "close_all_connections", "--vhost", VHOST, "e2e: connection kill"],
                         capture_output=True, text=True)
    print(f"rabbitmqctl close_all_connections at {created()} cases: exit {out.returncode}", flush=True)

    ok = wait_for(lambda: created() >= args.messages, 1200, every=1)
    print(f"all {created()} cases created at {time.time() - t0:.1f}s; waiting for the failure reports", flush=True)

    # Reports: read the queue bound to the failure exchange until every
    # failed message is reported. The tracker lists every ended case (about
    # one request per 100 cases); at 300/min and 50,000 cases that takes
    # a while, hence the long wait.
    want = {f"msg-{i}" for i in range(args.messages) if fails(i)}
    reports = []  # (correlation_id, message_id, headers, body)
    rconn = pika.BlockingConnection(params())
    rch = rconn.channel()

    def drain_reports():
        while True:
            method, props, body = rch.basic_get(reports_q, auto_ack=True)
            if method is None:
                return
            reports.append((props.correlation_id, props.message_id, props.headers or {}, json.loads(body),
                            props.delivery_mode))

    def all_reported():
        drain_reports()
        return want <= {r[0] for r in reports}

    reported = wait_for(all_reported, 2700, every=1)
    time.sleep(3); drain_reports()  # a duplicate would show up now
    t_reports = time.time() - t0
    rch.queue_delete(reports_q); rch.exchange_delete(failures); rconn.close()

    st, b = get(base + "/_sim/stats"); stats = json.loads(b)
    counts = cases_per_order(base)
    _, nd = get(base + "/_sim/cases", timeout=120)
    failed_cases = set()
    for line in nd.decode().splitlines():
        if line.strip():
            c = json.loads(line)
            if c["status"] == "failed":
                failed_cases.add(c["id"])
    _, m = get(f"http://127.0.0.1:{admin_port}/metrics")
    mlines = m.decode().splitlines()
    reconnects = [l for l in mlines if l.startswith("duvo_bridge_amqp_reconnects_total")]
    sent = [l for l in mlines if l.startswith(("duvo_bridge_reports_sent_total", "duvo_bridge_reports_created_total",
                                               "duvo_bridge_reports_pending"))]
    bridge.send_signal(signal.SIGTERM); bridge.wait(timeout=60)
    conn = pika.BlockingConnection(params())
    ch = conn.channel()
    left = ch.queue_declare(queue_name, passive=True).method.message_count
    ch.queue_delete(queue_name); conn.close()
    sim.send_signal(signal.SIGTERM); sim.wait(timeout=10)

    expected = {f"ORD-{i:07d}" for i in range(args.messages)}
    missing = expected - counts.keys()
    dups = {k: v for k, v in counts.items() if v > 1}
    ids_per_msg = {}
    bad_reports = []
    for corr, mid, headers, body, mode in reports:
        ids_per_msg.setdefault(corr, set()).add(mid)
        h = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in headers.items()}
        if (mode != 2 or h.get("x-duvo-status") != "failed" or h.get("x-duvo-case-id") != body.get("case_id")
                or body.get("report_id") != mid or h.get("x-duvo-source-queue") != queue_name
                or corr != "msg-" + str(body["event"]["n"])):
            bad_reports.append((corr, mid, h, body))
    unreported = want - ids_per_msg.keys()
    unexpected = ids_per_msg.keys() - want
    two_ids = {k: v for k, v in ids_per_msg.items() if len(v) > 1}
    reported_cases = {r[3].get("case_id") for r in reports}
    print(json.dumps({k: stats[k] for k in ("requests", "create_requests", "list_requests", "cases_created",
                                            "rate_limited", "early_retries", "idempotent_replays")}))
    print(f"reconnect counter after the kill: {reconnects}")
    print(f"report counters (second run of the bridge): {sent}")
    print(f"messages={args.messages} cases={sum(counts.values())} missing={len(missing)} duplicates={len(dups)} "
          f"left_in_queue={left} early_retries={stats['early_retries']} elapsed={time.time() - t0:.1f}s")
    print(f"failed_messages={len(want)} failed_cases={len(failed_cases)} reports={len(reports)} "
          f"reported_messages={len(ids_per_msg)} unreported={len(unreported)} unexpected={len(unexpected)} "
          f"report_ids_per_message_max={max((len(v) for v in ids_per_msg.values()), default=0)} "
          f"copies={len(reports) - len(ids_per_msg)} bad_reports={len(bad_reports)} "
          f"cases_match={reported_cases == failed_cases} all_reported_at={t_reports:.1f}s")
    if unreported:
        idx = sorted(int(m[4:]) for m in unreported)
        print(f"unreported message numbers: {idx[:10]} ... {idx[-10:]}")
    if bad_reports:
        print("first bad report:", bad_reports[0])
    good = (ok and not missing and not dups and left == 0 and stats["early_retries"] == 0
            and reported and not unreported and not unexpected and not two_ids and not bad_reports
            and reported_cases == failed_cases)
    print("RESULT:", "PASS" if good else f"FAIL (logs in {work})")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
