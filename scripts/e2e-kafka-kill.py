#!/usr/bin/env python3
"""Outside-in check of the Kafka source (issue 4's "done when").

Uses Apache Kafka from scripts/services.sh (started when it is not up; or
--brokers for a running cluster), `duvo-bridge sim` (300 requests/min) and two `duvo-bridge run`
replicas in one consumer group (static membership, half the rate budget
each). A confluent-kafka producer (idempotent, acks=all) writes N records
at a steady pace; replica 1 is SIGKILLed while they are being consumed and
restarted a few seconds later, and SIGKILLed again while its outbox is
still delivering. Then every record must be exactly one case in the
simulator, and every record whose case fails ("simulate":"fail", every
100th) must appear on the failure topic, keyed by the record's key.

    pip install confluent-kafka
    scripts/e2e-kafka-kill.py [--bin target/release/duvo-bridge] [--records 100000]
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import cases_per_order, free_port, get, wait_for  # noqa: E402

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--records", type=int, default=100000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--rate", type=int, default=300, help="API requests per minute (sim; split by the replicas)")
    ap.add_argument("--produce-secs", type=float, default=40.0, help="spread production over this long")
    ap.add_argument("--brokers", help="a running cluster (default: scripts/services.sh's Apache Kafka, "
                                      "started if needed, on 127.0.0.1:19092)")
    ap.add_argument("--max-wait", type=float, default=3600.0,
                    help="give up waiting for cases (and, separately, for failure reports) after this many seconds")
    ap.add_argument("--tracking-share", type=float, default=0.1,
                    help="[tracking] share (the bridge's default): failures are listed between slices of the "
                         "completion cleanup, so they are reported long before the cleanup catches up")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="duvo-kafka-e2e-")
    procs = []
    if args.brokers:
        brokers = args.brokers
    else:
        services = os.path.join(os.path.dirname(os.path.abspath(__file__)), "services.sh")
        subprocess.run(["bash", services, "up", "kafka"], check=True)
        brokers = "127.0.0.1:19092"
    run = uuid.uuid4().hex[:8]
    topic, failures, group = f"orders-{run}", f"orders-{run}.failures", f"duvo-e2e-{run}"
    admin = AdminClient({"bootstrap.servers": brokers})
    assert wait_for(lambda: _metadata_ok(admin), 20), "broker up"
    for f in admin.create_topics([NewTopic(topic, args.partitions, 1), NewTopic(failures, 1, 1)]).values():
        f.result(30)

    sim_port = free_port()
    key = "dv_e2e" + uuid.uuid4().hex[:29]
    qid = str(uuid.uuid4())
    slog = open(os.path.join(work, "sim.log"), "w")
    procs.append(subprocess.Popen([args.bin, "sim", "--listen", f"127.0.0.1:{sim_port}", "--api-key", key,
                                   "--queue", qid, "--rate-limit", str(args.rate)], stdout=slog, stderr=slog))
    base = f"http://127.0.0.1:{sim_port}"
    assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 10), "sim up"

    admins, cfgs = [], []
    for r in (1, 2):
        admin_port = free_port()
        admins.append(admin_port)
        cfg = os.path.join(work, f"bridge-{r}.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = {args.rate}
rate_share = 0.5
[outbox]
path = "{work}/outbox-{r}"
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
format = "json"
[tracking]
share = {args.tracking_share}
[[sources]]
type = "kafka"
name = "orders"
brokers = "{brokers}"
group_id = "{group}"
group_instance_id = "replica-{r}"
topics = ["{topic}"]
queue_id = "{qid}"
title = "Order {{/order_id}}"
failure_topic = "{failures}"
[sources.librdkafka]
"session.timeout.ms" = 30000
""")
        cfgs.append(cfg)
    env = dict(os.environ, DUVO_API_KEY=key)
    blogs = [open(os.path.join(work, f"bridge-{r}.log"), "a") for r in (1, 2)]

    def start(i):
        p = subprocess.Popen([args.bin, "run", "--config", cfgs[i]], env=env, stdout=blogs[i], stderr=blogs[i])
        assert wait_for(lambda: get(f"http://127.0.0.1:{admins[i]}/readyz")[0] == 200, 60), f"replica {i + 1} ready"
        return p

    bridges = [start(0), start(1)]

    def created():
        st, b = get(base + "/_sim/stats")
        return json.loads(b)["cases_created"] if st == 200 else 0

    def kill_and_restart(why):
        bridges[0].send_signal(signal.SIGKILL); bridges[0].wait()
        print(f"SIGKILL replica 1 {why} ({created()} cases so far)", flush=True)
        time.sleep(3)
        bridges[0] = start(0)
        print(f"replica 1 restarted ({created()} cases so far)", flush=True)

    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 20})
    failing = set()
    t0 = time.time()
    killed = False
    for i in range(args.records):
        order = {"order_id": f"ORD-{i:07d}", "n": i}
        if i % 100 == 7:
            order["simulate"] = "fail"
            failing.add(f"key-{i}")
        while True:
            try:
                producer.produce(topic, key=f"key-{i}", value=json.dumps(order).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 999:
            producer.poll(0)
            ahead = t0 + args.produce_secs * (i + 1) / args.records - time.time()
            if ahead > 0:
                time.sleep(ahead)
        if not killed and i == args.records // 2:
            producer.flush(30)
            killed = True
            kill_and_restart("while records are being consumed")
    left = producer.flush(60)
    print(f"produced {args.records} records in {time.time() - t0:.1f}s (unflushed: {left})", flush=True)

    wait_for(lambda: created() >= args.records // 2, args.max_wait, every=1)
    kill_and_restart("while its outbox is delivering")

    ok = wait_for(lambda: created() >= args.records, args.max_wait, every=2)
    time.sleep(3)
    counts = cases_per_order(base)
    st, b = get(base + "/_sim/stats"); stats = json.loads(b)
    delivered_at = time.time() - t0

    # The failure topic: every failing record's key, once or more (a report
    # re-sent after a crash carries the same report id).
    reader = Consumer({"bootstrap.servers": brokers, "group.id": f"reader-{run}", "auto.offset.reset": "earliest",
                       "enable.auto.commit": False})
    reader.subscribe([failures])
    seen, report_ids, bad = {}, set(), 0
    end = time.time() + args.max_wait
    while time.time() < end and not failing.issubset(seen.keys()):
        m = reader.poll(1.0)
        if m is None or m.error():
            continue
        k = m.key().decode()
        seen[k] = seen.get(k, 0) + 1
        hdrs = dict((h, v.decode()) for h, v in (m.headers() or []))
        report_ids.add(hdrs.get("duvo-report-id"))
        if hdrs.get("duvo-status") != "failed" or hdrs.get("duvo-source-topic") != topic:
            bad += 1
    reader.close()
    reports_at = time.time() - t0

    metrics = []
    for i in (0, 1):
        _, m = get(f"http://127.0.0.1:{admins[i]}/metrics")
        consumed = sum(float(l.rsplit(" ", 1)[1]) for l in m.decode().splitlines()
                       if l.startswith("duvo_bridge_kafka_consumed_total{"))
        metrics.append(int(consumed))
    for p in bridges:
        p.send_signal(signal.SIGTERM)
    for p in bridges:
        p.wait(timeout=60)
    for p in procs:
        p.send_signal(signal.SIGTERM); p.wait(timeout=10)

    expected = {f"ORD-{i:07d}" for i in range(args.records)}
    missing = expected - counts.keys()
    dups = {k: v for k, v in counts.items() if v > 1}
    missing_reports = failing - seen.keys()
    print(json.dumps({k: stats.get(k) for k in ("requests", "create_requests", "cases_created", "rate_limited",
                                                "early_retries", "idempotent_replays", "list_requests")}))
    print(f"consumed since last start: replica1={metrics[0]} replica2={metrics[1]}")
    print(f"records={args.records} cases={sum(counts.values())} missing={len(missing)} duplicates={len(dups)} "
          f"delivered_in={delivered_at:.0f}s")
    print(f"failing={len(failing)} reported_keys={len(seen)} missing_reports={len(missing_reports)} "
          f"report_records={sum(seen.values())} distinct_report_ids={len(report_ids)} bad_headers={bad} "
          f"reports_in={reports_at:.0f}s")
    good = ok and not missing and not dups and not missing_reports and bad == 0 and stats["early_retries"] == 0
    print("RESULT:", "PASS" if good else f"FAIL (logs in {work})")
    sys.exit(0 if good else 1)


def _metadata_ok(admin):
    try:
        admin.list_topics(timeout=2)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
