#!/usr/bin/env python3
"""Run the README's shell blocks marked `<!-- readme-check -->` as a newcomer
would, in order, in one shell, against the given binary, so the documented
steps cannot drift from what works.

- Each marked ```sh block runs in a fresh directory holding a copy of
  `config/` (the steps' relative paths work; nothing lands in the repo),
  with `./target/release/duvo-bridge` replaced by `--bin` and `cargo build`
  lines left out (the binary is given).
- A block ending in `duvo-bridge run ...` starts it in the background and
  waits for its `/readyz` (127.0.0.1:9090, the example config's admin).
- `curl` gets `--fail-with-body`: a documented call answered 4xx/5xx fails.
- A command followed by a comment showing JSON (`# 202 {...}`, `# {...}`)
  must print JSON with at least those keys at the top level, and the same
  values where the comment spells them out (`"..."` and `...` are
  placeholders).

Every process started is stopped at the end. Exit 1 naming the first step
that failed.

    python3 scripts/readme-check.py --bin target/debug/duvo-bridge
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- readme-check -->"


def blocks(readme):
    """The marked ```sh blocks, as lists of logical lines (continuations
    joined), each with the comment lines that follow it."""
    lines = readme.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            k = j + 1
            body = []
            while k < len(lines) and not lines[k].startswith("```"):
                body.append(lines[k])
                k += 1
            out.append(logical(body))
            i = k
        i += 1
    return out


def logical(body):
    cmds, cur = [], ""
    for l in body:
        if l.strip().startswith("#") and not cur:
            if cmds:
                cmds[-1][1].append(l.strip()[1:].strip())
            continue
        cur += l.rstrip("\\").rstrip() + " " if l.endswith("\\") else l
        if not l.endswith("\\"):
            cmds.append([cur.strip(), []])
            cur = ""
    return cmds


def expected_json(comments):
    """The JSON a comment shows (`202 {...}` or `{...}`), as text, or None."""
    for c in comments:
        m = re.match(r"^(?:\d{3}\s+)?(\{.*\})", c)
        if m:
            return m.group(1)
    return None


def check_json(shown, printed):
    got = json.loads(printed)
    # Placeholders: "..." values and a trailing ,... are not checked.
    keys = re.findall(r'"([a-z_]+)":', shown)
    top = [k for k in keys if k in got or not isinstance(got, dict)]
    missing = [k for k in re.findall(r'^\{"([a-z_]+)"', shown) if k not in got]
    for k in keys:
        if k in got:
            continue
        # A nested key (in "state" etc.) is looked for one level down.
        if not any(isinstance(v, dict) and k in v for v in got.values()):
            missing.append(k)
    if missing:
        raise AssertionError(f"keys {missing} missing from {printed.strip()}")
    for k, v in re.findall(r'"([a-z_]+)":(\d+|"[^".]*")', shown):
        want = json.loads(v)
        # The key at the top, or one level down ("state" is both).
        have = ([got[k]] if k in got else []) + [x[k] for x in got.values() if isinstance(x, dict) and k in x]
        if want not in have:
            raise AssertionError(f"{k}: documented {want!r}, got {have!r}")
    return top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    readme = open(os.path.join(ROOT, "README.md")).read()
    work = tempfile.mkdtemp(prefix="duvo-readme-")
    shutil.copytree(os.path.join(ROOT, "config"), os.path.join(work, "config"))
    env = dict(os.environ)
    env.pop("DUVO_BRIDGE_CONFIG", None)
    started = []
    steps = 0
    try:
        for n, cmds in enumerate(blocks(readme)):
            for cmd, comments in cmds:
                if cmd.startswith("cargo build"):
                    continue
                cmd = cmd.replace("./target/release/duvo-bridge", binary)
                cmd = re.sub(r"\bcurl -sS\b", "curl -sS --fail-with-body", cmd)
                steps += 1
                if cmd.startswith("export "):
                    # Evaluate in a shell so $(...) works, keep the result.
                    name, _, value = cmd[len("export "):].partition("=")
                    value = value.split("  #")[0].strip()
                    env[name] = subprocess.run(["bash", "-c", f"printf %s {value}"], env=env,
                                               capture_output=True, text=True, check=True).stdout
                    continue
                background = cmd.rstrip().endswith("&") or f"{binary} run " in cmd
                cmd = cmd.rstrip().rstrip("&").strip()
                print(f"[readme-check] block {n + 1}: {cmd[:110]}", flush=True)
                if background:
                    log = open(os.path.join(work, f"bg-{steps}.log"), "w")
                    p = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=work, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
                    started.append(p)
                    ready_url = ("http://127.0.0.1:9090/readyz" if " run " in cmd
                                 else "http://127.0.0.1:8088/_sim/stats")
                    deadline = time.time() + 30
                    while True:
                        try:
                            if urllib.request.urlopen(ready_url, timeout=2).status == 200:
                                break
                        except OSError:
                            pass
                        if p.poll() is not None or time.time() > deadline:
                            raise SystemExit(f"step {steps} ({cmd[:80]}) did not come up: "
                                             f"{open(log.name).read()[-2000:]}")
                        time.sleep(0.1)
                    continue
                r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True,
                                   timeout=120)
                if r.returncode != 0:
                    raise SystemExit(f"step {steps} ({cmd[:80]}) exited {r.returncode}:\n{r.stdout}{r.stderr}")
                shown = expected_json(comments)
                if shown:
                    # The documented state may take a moment (e.g. delivered).
                    for attempt in range(50):
                        try:
                            check_json(shown, r.stdout)
                            break
                        except AssertionError as e:
                            if attempt == 49:
                                raise SystemExit(f"step {steps} ({cmd[:80]}): {e}")
                            time.sleep(0.2)
                            r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True,
                                               text=True, timeout=120)
        print(f"[readme-check] PASS: {steps} steps of the README ran as documented")
        return 0
    finally:
        for p in reversed(started):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except Exception:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
