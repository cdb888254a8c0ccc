"""Helpers shared by the outside-in e2e scripts (standard library only)."""
import json, socket, time
import urllib.request, urllib.error


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


def cases_per_order(sim_base):
    """How many cases the simulator holds per `order_id` in the case data."""
    _, nd = get(sim_base + "/_sim/cases", timeout=120)
    counts = {}
    for line in nd.decode().splitlines():
        if line.strip():
            oid = json.loads(json.loads(line)["data"])["order_id"]
            counts[oid] = counts.get(oid, 0) + 1
    return counts
