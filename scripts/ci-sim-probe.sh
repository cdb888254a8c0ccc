#!/usr/bin/env bash
# Start `duvo-bridge sim` on a free port with known keys and run the curl
# contract probe against it. Usage: scripts/ci-sim-probe.sh PATH_TO_BINARY
set -euo pipefail
bin=${1:-target/debug/duvo-bridge}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key="dv_probe$(python3 -c 'import secrets; print(secrets.token_hex(13))')"
rkey="dv_restricted$(python3 -c 'import secrets; print(secrets.token_hex(11))')"
queue=$(python3 -c 'import uuid; print(uuid.uuid4())')
other=$(python3 -c 'import uuid; print(uuid.uuid4())')
log=$(mktemp)
wait_up() { # wait_up PORT: until the simulator answers
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/_sim/stats" && return 0
    sleep 0.1
  done
  echo "simulator on port $1 did not start"; cat "$log"; return 1
}
"$bin" sim --listen "127.0.0.1:$port" --api-key "$key" --restricted-key "$rkey=$other" \
  --queue "$queue" --queue "$other" --rate-limit 1000 --process-ms 300 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
wait_up "$port"
bash scripts/sim-probe.sh "http://127.0.0.1:$port" "$key" "$queue" "$rkey"

# A second simulator with a tiny window for the 429 rules.
port2=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" sim --listen "127.0.0.1:$port2" --api-key "$key" --queue "$queue" --rate-limit 5 --window-secs 6 >>"$log" 2>&1 &
pid2=$!
trap 'kill $pid $pid2 2>/dev/null || true; rm -f "$log"' EXIT
wait_up "$port2"
bash scripts/sim-probe-429.sh "http://127.0.0.1:$port2" "$key" "$queue"
