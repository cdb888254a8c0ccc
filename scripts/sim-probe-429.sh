#!/usr/bin/env bash
# Rate-limit probe for a running simulator started with a SMALL limit, e.g.
#   duvo-bridge sim --rate-limit 5 --window-secs 10 ...
#   scripts/sim-probe-429.sh BASE_URL KEY QUEUE
# Spends the window, checks the 429 (error model, retry-after,
# x-ratelimit-*), that an early retry is counted by /_sim/stats, and that a
# retry after retry-after succeeds.
set -u
BASE="${1%/}"; KEY="$2"; QUEUE="$3"
CASES="$BASE${DUVO_VERSION_PREFIX:-/v2}/queues/$QUEUE/cases"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
FAILS=0; PASSES=0
pass() { PASSES=$((PASSES + 1)); echo "PASS  $1"; }
fail() { FAILS=$((FAILS + 1)); echo "FAIL  $1${2:+ ($2)}"; }
get() { STATUS="$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -H "Authorization: Bearer $KEY" "$CASES")" || STATUS=000; }
header() { tr -d '\r' <"$TMP/headers" | awk -v n="$1" -F': ' 'tolower($1)==n {v=$2} END {print v}'; }
stat() { curl -sS "$BASE/_sim/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

get
limit="$(header x-ratelimit-limit)"
[ -n "$limit" ] && [ "$limit" -le 50 ] || { echo "start the simulator with --rate-limit <= 50 (got '$limit')"; exit 2; }
# Start at the beginning of a window, so the 429 checks are not cut short
# by the window ending under us.
reset="$(header x-ratelimit-reset)"
python3 -c "import time; time.sleep(max(0.0, $reset - time.time()) + 0.2)"
for _ in $(seq 0 "$limit"); do get; [ "$STATUS" = 429 ] && break; done
if [ "$STATUS" = 429 ]; then
  ra="$(header retry-after)"; rem="$(header x-ratelimit-remaining)"; reset="$(header x-ratelimit-reset)"
  err="$(python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); print(b["error"] if isinstance(b.get("message"),str) else "")' "$TMP/body")"
  if [ -n "$ra" ] && [ "$rem" = 0 ] && [ -n "$reset" ] && [ "$err" = rate_limited ]; then
    pass "429 rate_limited with retry-after=$ra, x-ratelimit-remaining=0, x-ratelimit-reset=$reset"
  else
    fail "429 answer" "retry-after='$ra' remaining='$rem' reset='$reset' error='$err'"
  fi
  before="$(stat early_retries)"
  get
  after="$(stat early_retries)"
  if [ "$STATUS" = 429 ] && [ "$after" -gt "$before" ]; then pass "request before retry-after counted as early retry ($before -> $after)"; else fail "early retry counting" "HTTP $STATUS, $before -> $after"; fi
  sleep "$((ra + 1))"
  get
  if [ "$STATUS" = 200 ]; then pass "after retry-after the request succeeds"; else fail "after retry-after" "HTTP $STATUS"; fi
else
  fail "429 after spending the window" "HTTP $STATUS"
fi
echo "----"
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" -eq 0 ]
