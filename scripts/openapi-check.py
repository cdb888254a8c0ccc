#!/usr/bin/env python3
"""Validate the OpenAPI documents the bridge serves (docs/openapi/*.json,
embedded in the binary: the intake's at a source's /openapi.json, the admin
listener's at its /openapi.json) against the OpenAPI 3.1 schema, with
openapi-spec-validator (installed by .ci/run). With --bin, also start the
binary (simulator + bridge) and check that what it serves is those files,
byte for byte.

    python3 scripts/openapi-check.py [--bin target/debug/duvo-bridge]
"""
import argparse, os, subprocess, sys, tempfile, uuid

from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import free_port, get, start_sim, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = {name: os.path.join(ROOT, "docs", "openapi", f"{name}.json") for name in ("intake", "admin")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin")
    args = ap.parse_args()
    for name, path in DOCS.items():
        spec, _ = read_from_filename(path)
        validate(spec)
        print(f"PASS {os.path.relpath(path, ROOT)} is a valid OpenAPI {spec['openapi']} document "
              f"({len(spec['paths'])} paths)")
    if not args.bin:
        return 0
    work = tempfile.mkdtemp(prefix="duvo-openapi-")
    key, queue = "dv_oapi" + uuid.uuid4().hex[:28], str(uuid.uuid4())
    sim, base = start_sim(args.bin, work, key, [queue])
    http_port, admin_port = free_port(), free_port()
    cfg = os.path.join(work, "bridge.toml")
    with open(cfg, "w") as f:
        f.write(f'[duvo]\nbase_url = "{base}"\napi_key_env = "DUVO_API_KEY"\n[outbox]\npath = "{work}/outbox"\n'
                f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n[[sources]]\ntype = "http"\nname = "oms"\n'
                f'listen = "127.0.0.1:{http_port}"\nqueue_id = "{queue}"\ntitle = "Order {{/order_id}}"\n')
    log = open(os.path.join(work, "bridge.log"), "w")
    bridge = subprocess.Popen([args.bin, "run", "--config", cfg], env=dict(os.environ, DUVO_API_KEY=key),
                              stdout=log, stderr=log)
    try:
        assert wait_for(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, 30), "bridge ready"
        for name, port in (("intake", http_port), ("admin", admin_port)):
            st, body = get(f"http://127.0.0.1:{port}/openapi.json")
            assert st == 200, f"{name} /openapi.json: {st}"
            assert body == open(DOCS[name], "rb").read(), f"{name} serves another document"
            print(f"PASS the {name} listener serves docs/openapi/{name}.json")
    finally:
        bridge.terminate()
        bridge.wait()
        sim.terminate()
        sim.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
