"""Helpers shared by the outside-in e2e scripts (standard library only)."""
import hashlib, hmac, json, os, socket, subprocess, threading, time
import urllib.request, urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def http(method, url, body=None, headers=None, timeout=10):
    """(status, body); status 0 when nothing answered."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def get(url, timeout=10):
    return http("GET", url, timeout=timeout)


def wait_for(cond, timeout, every=0.1):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(every)
    return False


def start_sim(bin_, work, key, queues, *extra):
    """`duvo-bridge sim` on a free port with `key` and `queues` (and `extra`
    arguments), logging to WORK/sim.log: (process, base URL) once it answers."""
    port = free_port()
    cmd = [bin_, "sim", "--listen", f"127.0.0.1:{port}", "--api-key", key, *extra]
    for q in queues:
        cmd += ["--queue", q]
    log = open(os.path.join(work, "sim.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 10), "sim up"
    return proc, base


def set_faults(sim_base, **patch):
    """Apply a `/_sim/faults` patch (absent fields keep their value)."""
    st, _ = http("POST", sim_base + "/_sim/faults", json.dumps(patch).encode(),
                 {"Content-Type": "application/json"})
    assert st == 200, f"faults {patch}: {st}"


def metric(admin_port, prefix):
    """Sum of the bridge's /metrics samples whose line starts with `prefix`
    (None when the admin listener does not answer)."""
    st, b = get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5)
    if st != 200:
        return None
    return sum(float(l.rsplit(" ", 1)[1]) for l in b.decode().splitlines() if l.startswith(prefix))


def cases_per_order(sim_base, timeout=120):
    """How many cases the simulator holds per `order_id` in the case data."""
    _, nd = get(sim_base + "/_sim/cases", timeout=timeout)
    counts = {}
    for line in nd.decode().splitlines():
        if line.strip():
            oid = json.loads(json.loads(line)["data"])["order_id"]
            counts[oid] = counts.get(oid, 0) + 1
    return counts


class Receiver:
    """A customer's signed callback endpoint: verifies each report's
    HMAC-SHA256 signature with `secret`, records (report id, body JSON)."""

    def __init__(self, secret):
        self.lock = threading.Lock()
        self.reports = []  # (report_id, json)
        self.bad_signatures = 0
        self.last = 0.0  # when the last good report arrived
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(want, self.headers.get("X-Duvo-Bridge-Signature", ""))
                with outer.lock:
                    if ok:
                        outer.reports.append((self.headers.get("X-Duvo-Bridge-Report-Id"), json.loads(body)))
                        outer.last = time.time()
                    else:
                        outer.bad_signatures += 1
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/duvo-callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self):
        with self.lock:
            return list(self.reports)
