#!/usr/bin/env python3
"""Checks of everything under deploy/ (run by .ci/run).

    python3 scripts/deploy-check.py --bin target/debug/duvo-bridge
    python3 scripts/deploy-check.py --write     # regenerate deploy/kubernetes/prometheusrule.yaml

- systemd: `systemd-analyze verify` (ExecStart pointed at --bin) and
  `systemd-analyze security --offline=yes` rated OK or better (exposure
  <= 4.9); TimeoutStopSec above the drain, the credential and state
  directory matching the config; the config validates with the binary.
- Kubernetes: every manifest validates against the Kubernetes schemas
  (kubernetes-validate --strict) or, for the Prometheus Operator kinds,
  against deploy/kubernetes/schemas; the kustomization lists every manifest
  (and builds, when kubectl is there); grace period, ports, probes, volume
  size, secret path and replicas x rate_share agree with the config, which
  validates with the binary.
- Prometheus: `promtool check rules`, `promtool test rules`, the
  PrometheusRule carries exactly the rules file's groups, and
  `promtool check metrics` passes on a live /metrics scrape of the binary
  (simulator + bridge, a few events delivered and one refused).
- Grafana: the dashboard parses; every metric it or the rules query is
  described in src/telemetry.rs (describe_all).

Needs PyYAML, jsonschema and kubernetes-validate (pip), promtool
(Debian: prometheus) and systemd-analyze. Exit status 1 on any failure.
"""
import argparse, json, os, re, shutil, subprocess, sys, tempfile, time, tomllib, uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import free_port, get, http, wait_for  # noqa: E402

import yaml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
RULES = os.path.join(DEPLOY, "prometheus", "duvo-bridge-rules.yml")
RULES_TEST = os.path.join(DEPLOY, "prometheus", "duvo-bridge-rules.test.yml")
PROMRULE = os.path.join(K8S, "prometheusrule.yaml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "duvo-bridge.json")
UNIT = os.path.join(DEPLOY, "systemd", "duvo-bridge.service")
UNIT_CONFIG = os.path.join(DEPLOY, "systemd", "duvo-bridge.toml")
K8S_CONFIG = os.path.join(K8S, "duvo-bridge.toml")
KUBERNETES_VERSION = "1.30.0"  # preStop `sleep` needs 1.30+
# Metrics the alerts or the dashboard may query before the code that
# registers them is merged (none now); the check says when one can go.
PENDING_METRICS = set()
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.json",
}

failures = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(name)
    return ok


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def rules_groups():
    with open(RULES) as f:
        return yaml.safe_load(f)["groups"]


PROMRULE_HEADER = """\
# GENERATED from deploy/prometheus/duvo-bridge-rules.yml by
# `python3 scripts/deploy-check.py --write`; edit the rules file, not this.
# CI fails when the two differ.
"""


def render_promrule():
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "duvo-bridge"},
        "spec": {"groups": rules_groups()},
    }
    return PROMRULE_HEADER + yaml.safe_dump(doc, sort_keys=False, width=1000, allow_unicode=True)


# ---------------------------------------------------------------- metrics

def described_metrics():
    with open(os.path.join(ROOT, "src", "telemetry.rs")) as f:
        src = f.read()
    return set(re.findall(r'describe_(?:counter|gauge|histogram)!\(\s*"([a-z0-9_]+)"', src))


def queried_metrics(text):
    names = set()
    for m in re.findall(r"\bduvo_bridge_[a-z0-9_]+", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if m.endswith(suffix) and not m.endswith("_total" + suffix):
                base = m[: -len(suffix)]
                names.add(base)
                break
        else:
            names.add(m)
    return names


def check_metric_names():
    described = described_metrics()
    check("describe_all lists metrics", len(described) > 20, f"{len(described)} found")
    known = described | PENDING_METRICS
    with open(RULES) as f:
        rules_text = f.read()
    with open(DASHBOARD) as f:
        dash_text = f.read()
    for what, text in (("alert rules", rules_text), ("dashboard", dash_text)):
        used = queried_metrics(text)
        # A histogram's base name (e.g. ..._seconds) is described; a
        # `_count`-suffixed counter is not a histogram part.
        unknown = sorted(n for n in used if n not in known)
        check(f"{what}: every metric queried is described in src/telemetry.rs", not unknown, str(unknown))
    now_described = sorted(PENDING_METRICS & described)
    if now_described:
        print(f"NOTE: {now_described} are now in describe_all: drop them from PENDING_METRICS")


def check_dashboard():
    try:
        with open(DASHBOARD) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        check("dashboard parses as JSON", False, str(e))
        return
    check("dashboard parses as JSON", True)
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    exprs = [t.get("expr", "") for p in panels for t in p.get("targets", [])]
    check("dashboard has panels with queries", len(panels) >= 10 and all(exprs), f"{len(panels)} panels")
    ids = [p.get("id") for p in dash.get("panels", [])]
    check("dashboard panel ids are unique", len(ids) == len(set(ids)))
    # Every query is valid PromQL: promtool parses it as a rule expression.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": e.replace("$job", ".*").replace("$instance", ".*")}
        for i, e in enumerate(exprs)]}]}
    if shutil.which("promtool"):
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            yaml.safe_dump(rules, f)
        r = run(["promtool", "check", "rules", f.name])
        os.unlink(f.name)
        check("dashboard queries parse as PromQL (promtool)", r.returncode == 0, r.stdout + r.stderr)


# ---------------------------------------------------------------- prometheus

def check_prometheus(write):
    rendered = render_promrule()
    if write:
        with open(PROMRULE, "w") as f:
            f.write(rendered)
        print(f"wrote {os.path.relpath(PROMRULE, ROOT)}")
    with open(PROMRULE) as f:
        current = f.read()
    same = yaml.safe_load(current)["spec"]["groups"] == rules_groups()
    check("PrometheusRule carries exactly the rules file's groups", same and current == rendered,
          "run `python3 scripts/deploy-check.py --write`")
    if not shutil.which("promtool"):
        check("promtool is installed", False, "apt-get install prometheus")
        return
    r = run(["promtool", "check", "rules", RULES])
    check("promtool check rules", r.returncode == 0, r.stdout + r.stderr)
    r = run(["promtool", "test", "rules", os.path.basename(RULES_TEST)], cwd=os.path.dirname(RULES_TEST))
    check("promtool test rules", r.returncode == 0, r.stdout + r.stderr)
    # The rules inside the PrometheusRule, as promtool sees them.
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": yaml.safe_load(current)["spec"]["groups"]}, f)
    r = run(["promtool", "check", "rules", f.name])
    os.unlink(f.name)
    check("promtool check rules (PrometheusRule's groups)", r.returncode == 0, r.stdout + r.stderr)


def check_live_metrics(binary):
    """Simulator + bridge, some traffic, then promtool check metrics on /metrics."""
    if not shutil.which("promtool"):
        return
    work = tempfile.mkdtemp(prefix="duvo-metrics-")
    sim_port, http_port, admin_port = free_port(), free_port(), free_port()
    key = "dv_met" + uuid.uuid4().hex[:29]
    queue = str(uuid.uuid4())
    procs = []
    try:
        log = open(os.path.join(work, "sim.log"), "w")
        procs.append(subprocess.Popen([binary, "sim", "--listen", f"127.0.0.1:{sim_port}", "--api-key", key,
                                       "--queue", queue, "--process-ms", "100"], stdout=log, stderr=log))
        base = f"http://127.0.0.1:{sim_port}"
        if not check("simulator starts", wait_for(lambda: get(base + "/_sim/stats")[0] == 200, 30)):
            return
        cfg = os.path.join(work, "bridge.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[duvo]
base_url = "{base}"
[outbox]
path = "{work}/outbox"
[delivery]
linger_ms = 20
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
        procs.append(subprocess.Popen([binary, "run", "--config", cfg], env=dict(os.environ, DUVO_API_KEY=key),
                                      stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        admin = f"http://127.0.0.1:{admin_port}"
        if not check("bridge starts", wait_for(lambda: get(admin + "/readyz")[0] == 200, 60)):
            return
        events = f"http://127.0.0.1:{http_port}/v1/events"
        body = json.dumps([{"order_id": f"M-{i}"} for i in range(5)]).encode()
        st, _ = http("POST", events, body, {"Content-Type": "application/json"})
        http("POST", events, b"not json", {"Content-Type": "application/json"})
        check("events accepted", st == 202)
        check("cases delivered", wait_for(
            lambda: json.loads(get(base + "/_sim/stats")[1])["cases_created"] >= 5, 60))
        time.sleep(1.5)  # one housekeeping tick for the gauges
        st, scrape = get(admin + "/metrics")
        text = scrape.decode()
        with open(os.path.join(work, "metrics.txt"), "w") as f:
            f.write(text)
        check("/metrics answers", st == 200 and "duvo_bridge_cases_created_total" in text)
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        check("promtool check metrics on a live scrape", r.returncode == 0 and not r.stdout.strip()
              and not r.stderr.strip(), r.stdout + r.stderr)
        scraped = set(re.findall(r"^# HELP (duvo_bridge_[a-z0-9_]+) ", text, re.M))
        missing = sorted(scraped - described_metrics())
        check("every scraped metric is described in src/telemetry.rs", not missing, str(missing))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- kubernetes

def k8s_docs():
    docs = []
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml") and name != "kustomization.yaml":
            with open(os.path.join(K8S, name)) as f:
                for d in yaml.safe_load_all(f):
                    if d:
                        docs.append((name, d))
    return docs


def check_kubernetes(binary):
    import jsonschema
    docs = k8s_docs()
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    files = sorted({n for n, _ in docs})
    listed = sorted(kust.get("resources", []))
    check("kustomization lists every manifest", listed == files, f"listed {listed}, files {files}")
    core = sorted({n for n, d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS})
    if shutil.which("kubernetes-validate"):
        r = run(["kubernetes-validate", "--strict", "--no-warn", "-k", KUBERNETES_VERSION]
                + [os.path.join(K8S, n) for n in core])
        check(f"kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION})", r.returncode == 0,
              r.stdout + r.stderr)
    else:
        check("kubernetes-validate is installed", False, "pip install kubernetes-validate")
    for name, d in docs:
        key = (d["apiVersion"], d["kind"])
        if key in CRD_SCHEMAS:
            with open(os.path.join(K8S, "schemas", CRD_SCHEMAS[key])) as f:
                schema = json.load(f)
            errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(d), key=str)
            check(f"{name}: {d['kind']} matches its schema", not errs,
                  "; ".join(f"{list(e.path)}: {e.message}" for e in errs))
    if shutil.which("kubectl"):
        r = run(["kubectl", "kustomize", K8S])
        ok = r.returncode == 0
        check("kubectl kustomize builds", ok, r.stderr)
        if ok:
            built = [d for d in yaml.safe_load_all(r.stdout) if d]
            cm = [d for d in built if d["kind"] == "ConfigMap"]
            sts = [d for d in built if d["kind"] == "StatefulSet"]
            vols = sts[0]["spec"]["template"]["spec"]["volumes"] if sts else []
            refs = [v["configMap"]["name"] for v in vols if "configMap" in v]
            check("the StatefulSet mounts the generated (hashed) ConfigMap",
                  len(cm) == 1 and refs == [cm[0]["metadata"]["name"]], f"{refs} vs {[c['metadata']['name'] for c in cm]}")

    with open(K8S_CONFIG, "rb") as f:
        cfg = tomllib.load(f)
    sts = next(d for _, d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    grace = cfg["shutdown"]["grace_period_secs"]
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = pod["terminationGracePeriodSeconds"]
    check("terminationGracePeriodSeconds >= preStop + drain grace + 10 s", tgps >= pre + grace + 10,
          f"{tgps} < {pre} + {grace} + 10")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
    http_ports = [int(s["listen"].rsplit(":", 1)[1]) for s in cfg["sources"] if s["type"] == "http"]
    check("container port `admin` is admin.listen's", ports.get("admin") == admin_port, f"{ports} vs {admin_port}")
    check("container port `http` is the HTTP source's", [ports.get("http")] == http_ports, f"{ports} vs {http_ports}")
    probes = {k: c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
    check("liveness /healthz and readiness /readyz on the admin port",
          probes["livenessProbe"] == {"path": "/healthz", "port": "admin"}
          and probes["readinessProbe"] == {"path": "/readyz", "port": "admin"}, str(probes))
    sc, csc = pod["securityContext"], c["securityContext"]
    check("non-root, read-only root filesystem, no capabilities",
          sc.get("runAsNonRoot") and csc.get("readOnlyRootFilesystem") and csc.get("capabilities") == {"drop": ["ALL"]}
          and csc.get("allowPrivilegeEscalation") is False)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    check("the outbox is on the PersistentVolumeClaim",
          mounts.get("outbox") == cfg["outbox"]["path"]
          and [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["outbox"], str(mounts))
    size = sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", size)
    size_bytes = int(m.group(1)) * units[m.group(2)] if m else 0
    check("outbox.high_water_bytes is below the volume size", cfg["outbox"]["high_water_bytes"] < size_bytes,
          f"{cfg['outbox']['high_water_bytes']} vs {size}")
    key_file = cfg["duvo"].get("api_key_file", "")
    check("duvo.api_key_file is in the mounted Secret", os.path.dirname(key_file) == mounts.get("api-key"),
          f"{key_file} vs {mounts.get('api-key')}")
    share = cfg["duvo"].get("rate_share", 1.0)
    check("replicas x rate_share <= 1", sts["spec"]["replicas"] * share <= 1.0 + 1e-9,
          f"{sts['spec']['replicas']} x {share}")
    pdb = next(d for _, d in docs if d["kind"] == "PodDisruptionBudget")
    check("the PodDisruptionBudget selects the pods",
          pdb["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items())
    sm = next(d for _, d in docs if d["kind"] == "ServiceMonitor")
    svc = next(d for _, d in docs if d["kind"] == "Service"
               and sm["spec"]["selector"]["matchLabels"].items() <= d["metadata"].get("labels", {}).items())
    check("the ServiceMonitor scrapes the admin port of the governing Service",
          svc["metadata"]["name"] == sts["spec"]["serviceName"]
          and [p["name"] for p in svc["spec"]["ports"]] == [e["port"] for e in sm["spec"]["endpoints"]] == ["admin"]
          and svc["metadata"]["name"].startswith("duvo-bridge"))
    if binary:
        with tempfile.TemporaryDirectory() as d:
            kf = os.path.join(d, "api-key")
            with open(kf, "w") as f:
                f.write("dv_deploy_check_0000000000000000000\n")
            env = dict(os.environ, DUVO_BRIDGE__DUVO__API_KEY_FILE=kf, DUVO_BRIDGE_INTAKE_TOKEN="t")
            r = run([binary, "validate", "--config", K8S_CONFIG], env=env)
            check("deploy/kubernetes/duvo-bridge.toml validates", r.returncode == 0, r.stdout + r.stderr)


# ---------------------------------------------------------------- systemd

def unit_settings():
    settings = {}
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                k, v = line.split("=", 1)
                settings.setdefault(k.strip(), []).append(v.strip())
    return settings


def seconds(v):
    m = re.fullmatch(r"(\d+)\s*(s|min|m)?", v)
    return int(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1) if m else None


def check_systemd(binary):
    s = unit_settings()
    with open(UNIT_CONFIG, "rb") as f:
        cfg = tomllib.load(f)
    grace = cfg["shutdown"]["grace_period_secs"]
    stop = seconds(s.get("TimeoutStopSec", ["0"])[0])
    check("TimeoutStopSec >= drain grace + 10 s", stop is not None and stop >= grace + 10, f"{stop} vs {grace}")
    check("Type=notify with a watchdog", s.get("Type") == ["notify"] and "WatchdogSec" in s)
    cred = cfg["duvo"].get("api_key_credential")
    creds = [v.split(":", 1)[0] for v in s.get("LoadCredential", [])]
    check("the API key credential is loaded", cred in creds, f"{cred} not in {creds}")
    state = s.get("StateDirectory", [""])[0]
    check("outbox.path is the StateDirectory", cfg["outbox"]["path"] == f"/var/lib/{state}", f"{state}")
    if binary:
        with tempfile.TemporaryDirectory() as d:
            for c in creds:
                with open(os.path.join(d, c), "w") as f:
                    f.write("dv_deploy_check_0000000000000000000\n")
            r = run([binary, "validate", "--config", UNIT_CONFIG], env=dict(os.environ, CREDENTIALS_DIRECTORY=d))
            check("deploy/systemd/duvo-bridge.toml validates (key from a credential)", r.returncode == 0,
                  r.stdout + r.stderr)
    if not shutil.which("systemd-analyze"):
        check("systemd-analyze is installed", False)
        return
    with tempfile.TemporaryDirectory() as d:
        unit = os.path.join(d, "duvo-bridge.service")
        with open(UNIT) as f:
            text = f.read()
        if binary:
            text = text.replace("/usr/local/bin/duvo-bridge", os.path.abspath(binary))
        with open(unit, "w") as f:
            f.write(text)
        r = run(["systemd-analyze", "verify", unit])
        check("systemd-analyze verify", r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr)
    r = run(["systemd-analyze", "security", "--offline=yes", "--threshold=49", UNIT])
    last = (r.stdout.strip().splitlines() or [""])[-1]
    print(f"     {last}")
    check("systemd-analyze security rates the unit OK or better (exposure <= 4.9)",
          r.returncode == 0 and re.search(r"\b(OK|SAFE|PERFECT)\b", last) is not None, last + r.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", help="duvo-bridge binary (for validate, verify and the live scrape)")
    ap.add_argument("--write", action="store_true", help="regenerate the PrometheusRule from the rules file")
    args = ap.parse_args()
    check_prometheus(args.write)
    check_metric_names()
    check_dashboard()
    check_kubernetes(args.bin)
    check_systemd(args.bin)
    if args.bin:
        check_live_metrics(args.bin)
    print(f"\n{len(failures)} failed" if failures else "\ndeploy checks: all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
