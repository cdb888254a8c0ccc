#!/usr/bin/env python3
"""Chaos run: every source at once, faults everywhere, then count (issue 16).

One `duvo-bridge run` with three sources, each to its own Duvo queue:
an HTTP intake (signed callback reports, received here), a RabbitMQ queue
(reports on a failure exchange) and a Kafka topic (reports on a failure
topic). Outside clients feed them for the whole run at a steady pace,
with unique ids (`http-0000001`, ...; every 50th event fails in the
simulator, so it must be reported back to its source):
- HTTP: arrays of 10 with an Idempotency-Key each, re-posted until 202;
- RabbitMQ: pika, persistent messages with publisher confirms, re-published
  after a connection loss until confirmed;
- Kafka: confluent-kafka, idempotent producer, acks=all.
An event counts as acknowledged when its client got the 202, the confirm or
the delivery report.

While they run, one fault after another (each measured: time from its end
until the next case of the queue it hit, and until every event acknowledged
before its end was a case):
  API outage (minutes in the long mode), a 5xx storm, latency beyond the
  bridge's client timeout, answers dropped after the commit, 429 storms
  with retry-after in seconds and as an HTTP-date, RabbitMQ connections
  closed, RabbitMQ restarted, the Kafka broker SIGKILLed and restarted;
and, all the while, SIGKILLs of the bridge at random moments (restarted at
once), plus some aimed: while create requests hang (between POST and
answer), while answers are dropped, inside a 429's retry-after deadline,
and right after a report arrived (while reports are sent). The
simulator ignores Idempotency-Key throughout (`--idempotency ignore`):
only the bridge's own reconciliation stands between a retry and a duplicate.

At the end: acknowledged, cases, lost, duplicated (per source), early
retries (requests before a retry-after deadline), reports expected /
received / re-sent copies / events with more than one report id, recovery
times. Exit 0 only with nothing lost, nothing duplicated, no early retry,
and every failure reported under exactly one report id.

    scripts/chaos.py --mode short        # about 4 minutes (CI)
    scripts/chaos.py --mode long         # about 20 minutes, 24 SIGKILLs
        [--bin target/release/duvo-bridge] [--seed N] [--idempotency honour]

Needs scripts/services.sh's RabbitMQ and Kafka (started when not up); it
restarts both, so run it alone.
"""
import argparse, json, os, random, signal, subprocess, sys, tempfile, threading, time, uuid
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import (Receiver, cases_per_order, free_port, get, http, metric, set_faults,  # noqa: E402
                        start_sim, wait_for)

import pika
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICES = os.path.join(HERE, "services.sh")
VHOST = "duvo-chaos"
KAFKA = "127.0.0.1:19092"
SECRET = b"chaos-callback-secret"
FAIL_EVERY = 50
SOURCES = ("http", "amqp", "kafka")

MODES = {
    # name: (warm-up s, random SIGKILLs, {fault: seconds}, gap between faults s, producer rate per source)
    "short": dict(warmup=10, kills=4, gap=8, rate=15,
                  outage=20, storm5xx=10, latency=12, dropped=20, throttle=8, rabbit_down=5, kafka_down=5),
    "long": dict(warmup=30, kills=20, gap=20, rate=20,
                 outage=180, storm5xx=60, latency=45, dropped=90, throttle=30, rabbit_down=20, kafka_down=20),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def services(*args):
    r = subprocess.run(["bash", SERVICES, *args], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"services.sh {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
    return r.returncode == 0


def rabbitmqctl(*args):
    env = dict(os.environ, PATH=os.environ["PATH"] + ":/usr/sbin:/usr/lib/rabbitmq/bin")
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, env=env)


def order(src, n):
    return f"{src}-{n:07d}"


def fails(n):
    return n % FAIL_EVERY == FAIL_EVERY - 1


def event(src, n):
    e = {"order_id": order(src, n), "source": src, "n": n}
    if fails(n):
        e["simulate"] = "fail"
    return e


class Acked:
    """Ids whose client got its acknowledgement, per source."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ids = {s: set() for s in SOURCES}

    def add(self, src, ids):
        with self.lock:
            self.ids[src].update(ids)

    def counts(self):
        with self.lock:
            return {s: len(v) for s, v in self.ids.items()}

    def snapshot(self):
        with self.lock:
            return {s: set(v) for s, v in self.ids.items()}


class Bridge:
    """The bridge process: start, SIGKILL and restart, count kills."""

    def __init__(self, bin_, cfg, env, admin_port, logpath):
        self.bin, self.cfg, self.env, self.admin = bin_, cfg, env, admin_port
        self.log = open(logpath, "a")
        self.lock = threading.Lock()
        self.proc = None
        self.kills = []  # (time, why, seconds until /healthz answered again)

    def start(self):
        self.proc = subprocess.Popen([self.bin, "run", "--config", self.cfg], env=self.env,
                                     stdout=self.log, stderr=self.log)
        if not wait_for(lambda: get(f"http://127.0.0.1:{self.admin}/healthz", timeout=2)[0] == 200, 60, 0.05):
            raise SystemExit(f"bridge did not answer /healthz within 60 s (exit {self.proc.poll()})")

    def kill(self, why):
        with self.lock:
            t = time.time()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.start()
            up = time.time() - t
            self.kills.append((t, why, up))
            log(f"SIGKILL #{len(self.kills)} ({why}); up again in {up:.1f}s")

    def stop(self):
        with self.lock:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Monitor:
    """Samples the simulator every 0.2 s: cases per queue over time."""

    def __init__(self, base, queues):
        self.base, self.queues = base, queues
        self.samples = []  # (time, {src: cases})
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self.run, daemon=True).start()

    def stats(self):
        st, b = get(self.base + "/_sim/stats", timeout=10)
        return json.loads(b) if st == 200 else None

    def run(self):
        while not self.stop:
            s = self.stats()
            if s:
                by_q = s.get("by_queue", {})
                with self.lock:
                    self.samples.append((time.time(), {src: by_q.get(q, 0) for src, q in self.queues.items()}))
            time.sleep(0.2)

    def cases(self, src=None):
        with self.lock:
            if not self.samples:
                return 0
            c = self.samples[-1][1]
        return c[src] if src else sum(c.values())

    def first_after(self, t, pred):
        """Seconds from t until the first sample after t where pred(counts) holds."""
        with self.lock:
            for ts, c in self.samples:
                if ts >= t and pred(c):
                    return ts - t
        return None


def http_producer(port, rate, acked, stop, stats):
    n = 0
    per = 10
    t0 = time.time()
    while not stop.is_set():
        events = [event("http", n + i) for i in range(per)]
        body = json.dumps(events).encode()
        key = f"chaos-{n}"
        while True:
            st, _ = http("POST", f"http://127.0.0.1:{port}/v1/events", body,
                         {"Content-Type": "application/json", "Idempotency-Key": key}, timeout=10)
            if st == 202:
                acked.add("http", [e["order_id"] for e in events])
                break
            stats["http_retries"] = stats.get("http_retries", 0) + 1
            time.sleep(0.2)
        n += per
        ahead = t0 + n / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)


def amqp_producer(queue, rate, acked, stop, stats):
    n = 0
    t0 = time.time()
    conn = ch = None
    while not stop.is_set():
        e = event("amqp", n)
        try:
            if ch is None:
                conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, VHOST,
                                                                         connection_attempts=1,
                                                                         socket_timeout=5))
                ch = conn.channel()
                ch.confirm_delivery()
            ch.basic_publish("", queue, json.dumps(e).encode(),
                             pika.BasicProperties(delivery_mode=2, message_id=f"msg-{n}",
                                                  content_type="application/json"),
                             mandatory=True)
            acked.add("amqp", [e["order_id"]])
            n += 1
        except Exception as ex:  # connection lost, broker down, nack: publish again
            stats["amqp_republish"] = stats.get("amqp_republish", 0) + 1
            stats["amqp_last_error"] = type(ex).__name__
            try:
                if conn is not None and conn.is_open:
                    conn.close()
            except Exception:
                pass
            conn = ch = None
            time.sleep(0.5)
            continue
        ahead = t0 + n / rate - time.time()
        if ahead > 0:
            try:
                conn.sleep(ahead)  # keeps heartbeats flowing
            except Exception:
                conn = ch = None
    try:
        if conn is not None and conn.is_open:
            conn.close()
    except Exception:
        pass


def kafka_producer(topic, rate, acked, stop, stats):
    p = Producer({"bootstrap.servers": KAFKA, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                  "message.timeout.ms": 900000, "log_level": 0})
    failed = []

    def report(err, msg):
        e = json.loads(msg.value())
        if err is None:
            acked.add("kafka", [e["order_id"]])
        else:
            failed.append(e)
            stats["kafka_failed_deliveries"] = stats.get("kafka_failed_deliveries", 0) + 1

    n = 0
    t0 = time.time()
    while not stop.is_set():
        todo = [failed.pop()] if failed else [event("kafka", n)]
        for e in todo:
            while True:
                try:
                    p.produce(topic, key=e["order_id"], value=json.dumps(e).encode(), on_delivery=report)
                    break
                except BufferError:
                    p.poll(0.1)
        if todo[0]["n"] == n:
            n += 1
        p.poll(0)
        ahead = t0 + n / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)  # poll() returns at the first delivery report
    while p.flush(5) > 0 or failed:
        while failed:
            e = failed.pop()
            p.produce(topic, key=e["order_id"], value=json.dumps(e).encode(), on_delivery=report)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/duvo-bridge")
    ap.add_argument("--mode", choices=sorted(MODES), default="short")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--idempotency", choices=["honour", "ignore"], default="ignore")
    ap.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for cases, then reports")
    args = ap.parse_args()
    m = MODES[args.mode]
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    log(f"chaos --mode {args.mode} --seed {seed} --idempotency {args.idempotency}")

    assert services("up", "rabbitmq", "kafka"), "RabbitMQ and Kafka"
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    run = uuid.uuid4().hex[:8]
    work = tempfile.mkdtemp(prefix="duvo-chaos-")
    amqp_queue, failure_x = f"chaos-{run}", f"chaos-{run}.failures"
    reports_q = f"chaos-{run}.reports"
    topic, failure_topic = f"chaos-{run}", f"chaos-{run}.failures"

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, VHOST))
    ch = conn.channel()
    ch.queue_declare(amqp_queue, durable=True)
    ch.exchange_declare(failure_x, exchange_type="topic", durable=True)
    ch.queue_declare(reports_q, durable=True)
    ch.queue_bind(reports_q, failure_x, routing_key="#")
    conn.close()
    admin = AdminClient({"bootstrap.servers": KAFKA, "log_level": 0})
    for f in admin.create_topics([NewTopic(topic, 3, 1), NewTopic(failure_topic, 1, 1)]).values():
        f.result(30)

    http_port, admin_port = free_port(), free_port()
    key = "dv_chaos" + uuid.uuid4().hex[:27]
    queues = {s: str(uuid.uuid4()) for s in SOURCES}
    sim, base = start_sim(args.bin, work, key, queues.values(),
                          "--idempotency", args.idempotency, "--process-ms", "1000")

    def faults(**patch):
        set_faults(base, **patch)

    receiver = Receiver(SECRET)
    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = 300
timeout_secs = 5
[outbox]
path = "{work}/outbox"
[tracking]
poll_interval_ms = 1000
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
format = "json"

[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http_port}"
queue_id = "{queues['http']}"
title = "Order {{/order_id}}"
event_id_field = "/order_id"
callback_url = "{receiver.url}"
callback_secret_env = "CALLBACK_SECRET"

[[sources]]
type = "amqp"
name = "rabbit"
uri = "amqp://guest:guest@127.0.0.1:5672/{VHOST}"
queue = "{amqp_queue}"
declare = true
prefetch = 200
queue_id = "{queues['amqp']}"
title = "Order {{/order_id}}"
message_id_field = "/order_id"
failure_exchange = "{failure_x}"
failure_routing_key = "orders.failed"

[[sources]]
type = "kafka"
name = "orders"
brokers = "{KAFKA}"
group_id = "chaos-{run}"
group_instance_id = "chaos-1"
topics = ["{topic}"]
queue_id = "{queues['kafka']}"
title = "Order {{/order_id}}"
message_id_field = "/order_id"
failure_topic = "{failure_topic}"
[sources.librdkafka]
"session.timeout.ms" = 30000
""")
    env = dict(os.environ, DUVO_API_KEY=key, CALLBACK_SECRET=SECRET.decode())
    bridge = Bridge(args.bin, cfg, env, admin_port, os.path.join(work, "bridge.log"))
    bridge.start()
    assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 60), "bridge ready"
    mon = Monitor(base, queues)

    acked, stop, pstats = Acked(), threading.Event(), {}
    producers = [threading.Thread(target=http_producer, args=(http_port, m["rate"], acked, stop, pstats)),
                 threading.Thread(target=amqp_producer, args=(amqp_queue, m["rate"], acked, stop, pstats)),
                 threading.Thread(target=kafka_producer, args=(topic, m["rate"], acked, stop, pstats))]
    for p in producers:
        p.start()
    t0 = time.time()

    # ---------------------------------------------------------------- faults
    records = []  # dict(fault, start, end, hit, acked_at_end)

    def fault(name, secs, on, off=lambda: None, hit=SOURCES, aim=None):
        """Inject a fault for `secs` (on, wait, off), record how things stood
        at its end; `aim` = (delay, why): SIGKILL the bridge that long into it."""
        log(f"fault: {name} for {secs}s")
        start = time.time()
        on()
        if aim:
            time.sleep(min(secs / 2, aim[0]))
            bridge.kill(aim[1])
        time.sleep(secs)
        off()
        end = time.time()
        records.append(dict(fault=name, start=start, end=end, hit=hit, acked=acked.counts(),
                            cases={s: mon.cases(s) for s in SOURCES}))
        time.sleep(m["gap"])

    def rabbit_restart():
        rabbitmqctl("stop_app")
        time.sleep(m["rabbit_down"])
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup", "--timeout", "60")

    def kafka_restart():
        services("kafka-kill")
        time.sleep(m["kafka_down"])
        services("up", "kafka")

    plan = [
        dict(name="API outage (503 to everything)", secs=m["outage"],
             on=lambda: faults(outage=True), off=lambda: faults(outage=False)),
        dict(name="5xx storm (half of all requests 500/503)", secs=m["storm5xx"],
             on=lambda: faults(error_ratio=0.5, error_status=500), off=lambda: faults(error_ratio=0.0)),
        dict(name="latency 7 s, beyond the 5 s client timeout (committed, answer too late)",
             secs=m["latency"], on=lambda: faults(latency_ms=7000), off=lambda: faults(latency_ms=0),
             aim=(6, "while create requests hang (between POST and answer)")),
        dict(name="answers dropped after the commit (30% of creates)", secs=m["dropped"],
             on=lambda: faults(drop_after_commit_ratio=0.3), off=lambda: faults(drop_after_commit_ratio=0.0),
             aim=(8, "while answers are being dropped after the commit")),
        dict(name="429 storm, retry-after in seconds", secs=m["throttle"],
             on=lambda: faults(throttle_secs=m["throttle"], throttle_http_date=False),
             aim=(4, "inside a 429 storm's retry-after deadline")),
        dict(name="429 storm, retry-after as an HTTP-date", secs=m["throttle"],
             on=lambda: faults(throttle_secs=m["throttle"], throttle_http_date=True)),
        dict(name="RabbitMQ: every connection of the vhost closed", secs=0,
             on=lambda: rabbitmqctl("close_all_connections", "--vhost", VHOST, "chaos"), hit=("amqp",)),
        dict(name="RabbitMQ restarted (stop_app, start_app)", secs=0, on=rabbit_restart, hit=("amqp",)),
        dict(name="Kafka broker SIGKILLed and restarted", secs=0, on=kafka_restart, hit=("kafka",)),
    ]
    # The plan's length, roughly (the broker restarts take a while more).
    span = m["warmup"] + sum(f["secs"] + m["gap"] for f in plan) + m["rabbit_down"] + m["kafka_down"]
    kill_times = sorted(rnd.uniform(5, span) for _ in range(m["kills"]))

    def killer():
        for kt in kill_times:
            while time.time() - t0 < kt:
                time.sleep(0.1)
            bridge.kill(f"random, at {time.time() - t0:.0f}s")

    kthread = threading.Thread(target=killer, daemon=True)
    kthread.start()
    time.sleep(m["warmup"])
    for f in plan:
        fault(**f)
    kthread.join()  # the random kills still due (the plan's length was estimated)
    # Aimed kill: right after a report arrived (reports are being sent).
    if wait_for(lambda: time.time() - receiver.last < 0.3, 60, 0.02):
        bridge.kill("right after a failure report arrived (while reports are sent)")
    stop.set()
    for p in producers:
        p.join(timeout=120)
    produce_end = time.time()
    sent = acked.counts()
    log(f"producers stopped after {produce_end - t0:.0f}s: acknowledged {sent} ({pstats})")

    # ---------------------------------------------------------------- drain
    faults(outage=False, error_ratio=0.0, latency_ms=0, drop_after_commit_ratio=0.0, throttle_secs=0)
    want = acked.snapshot()
    delivered = wait_for(lambda: all(mon.cases(s) >= len(want[s]) for s in SOURCES), args.max_wait, 1)
    delivered_at = time.time()
    log(f"cases {dict((s, mon.cases(s)) for s in SOURCES)} after {delivered_at - produce_end:.0f}s of draining")

    failing = {s: {i for i in want[s] if fails(int(i.split("-")[1]))} for s in SOURCES}
    amqp_reports, kafka_reports = [], []  # (report id, order id)
    rconn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, VHOST))
    rch = rconn.channel()
    reader = Consumer({"bootstrap.servers": KAFKA, "group.id": f"chaos-reader-{run}", "log_level": 0,
                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
    reader.subscribe([failure_topic])

    def drain_reports():
        while True:
            meth, props, body = rch.basic_get(reports_q, auto_ack=True)
            if meth is None:
                break
            amqp_reports.append((props.message_id, json.loads(body)["event"]["order_id"]))
        for msg in reader.consume(1000, timeout=0.5):
            if not msg.error():
                h = dict((k, v.decode()) for k, v in (msg.headers() or []))
                kafka_reports.append((h.get("duvo-report-id"), msg.key().decode()))

    def reported():
        drain_reports()
        got = {"http": {j["event"]["order_id"] for _, j in receiver.snapshot()},
               "amqp": {o for _, o in amqp_reports}, "kafka": {o for _, o in kafka_reports}}
        return all(failing[s] <= got[s] for s in SOURCES)

    all_reported = wait_for(reported, args.max_wait, 1)
    reported_at = time.time()
    time.sleep(5)
    drain_reports()  # a late copy would show now
    rconn.close()
    reader.close()

    counts = {s: {} for s in SOURCES}
    for o, n in cases_per_order(base, timeout=300).items():
        counts[o.split("-")[0]][o] = n
    stats = mon.stats()
    recon = metric(admin_port, "duvo_bridge_reconciliations_total")
    bridge.stop()
    mon.stop = True
    sim.send_signal(signal.SIGTERM)
    sim.wait(timeout=10)
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, VHOST))
    ch = conn.channel()
    left = ch.queue_declare(amqp_queue, passive=True).method.message_count
    for q in (amqp_queue, reports_q):
        ch.queue_delete(q)
    ch.exchange_delete(failure_x)
    conn.close()
    admin.delete_topics([topic, failure_topic])

    # ---------------------------------------------------------------- report
    good = delivered and all_reported and left == 0
    print()
    print(f"seed {seed}, mode {args.mode}, idempotency {args.idempotency}; "
          f"{len(bridge.kills)} SIGKILLs; producing {produce_end - t0:.0f}s, "
          f"drained {delivered_at - produce_end:.0f}s later, every failure reported "
          f"{reported_at - produce_end:.0f}s after production ended")
    reports = {"http": [(r, j["event"]["order_id"]) for r, j in receiver.snapshot()],
               "amqp": amqp_reports, "kafka": kafka_reports}
    summary = {}
    for s in SOURCES:
        lost = want[s] - counts[s].keys()
        dups = {k for k, v in counts[s].items() if v > 1}
        ids = {}
        for rid, o in reports[s]:
            ids.setdefault(o, set()).add(rid)
        several = {o for o, v in ids.items() if len(v) > 1}
        unexpected = ids.keys() - failing[s]
        missing = failing[s] - ids.keys()
        copies = len(reports[s]) - len(ids)
        summary[s] = dict(acknowledged=len(want[s]), cases=sum(counts[s].values()), lost=len(lost),
                          duplicated=len(dups), reports_expected=len(failing[s]), reports_received=len(ids),
                          report_copies=copies, several_report_ids=len(several), unexpected_reports=len(unexpected),
                          missing_reports=len(missing))
        print(f"  {s:5}: " + " ".join(f"{k}={v}" for k, v in summary[s].items()))
        good &= not lost and not dups and not several and not unexpected and not missing
    good &= receiver.bad_signatures == 0 and stats["early_retries"] == 0
    print("  simulator: " + " ".join(f"{k}={stats[k]}" for k in (
        "requests", "create_requests", "list_requests", "cases_created", "rate_limited", "early_retries",
        "faults_injected", "dropped_after_commit", "idempotent_replays")))
    print(f"  bad signatures={receiver.bad_signatures} left in the RabbitMQ queue={left} "
          f"reconciliations (last process)={recon} producers={pstats}")
    print("  faults (recovery: first case of the queue hit after the fault ended / every event "
          "acknowledged before its end a case):")
    for r in records:
        first = mon.first_after(r["end"], lambda c, r=r: any(c[s] > r["cases"][s] for s in r["hit"]))
        caught = mon.first_after(r["end"], lambda c, r=r: all(c[s] >= r["acked"][s] for s in r["hit"]))
        r["first_case_s"], r["caught_up_s"] = first, caught
        fmt = lambda v: "never" if v is None else f"{v:.1f}s"
        print(f"    {r['end'] - t0:6.0f}s  {r['fault']}: {r['end'] - r['start']:.0f}s; "
              f"first case {fmt(first)}, caught up {fmt(caught)}")
    print("  SIGKILLs (restart: until /healthz answered; first case after the kill):")
    for t, why, up in bridge.kills:
        before = None
        with mon.lock:
            for ts, c in mon.samples:
                if ts <= t:
                    before = sum(c.values())
        nxt = mon.first_after(t, lambda c, b=before: sum(c.values()) > (b or 0))
        print(f"    {t - t0:6.0f}s  {why}: up in {up:.1f}s, next case after {'never' if nxt is None else f'{nxt:.1f}s'}")
    out = dict(seed=seed, mode=args.mode, kills=len(bridge.kills), sources=summary,
               early_retries=stats["early_retries"], simulator=stats,
               faults=[{k: r[k] for k in ("fault", "first_case_s", "caught_up_s")} for r in records])
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("RESULT:", "PASS" if good else "FAIL", f"(logs and result.json in {work})")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
