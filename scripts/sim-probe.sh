#!/usr/bin/env bash
# Contract probe for a running Duvo simulator (or any Duvo-compatible API).
#
#   scripts/sim-probe.sh BASE_URL KEY QUEUE [RESTRICTED_KEY]
#
# BASE_URL is scheme+host+port (e.g. http://127.0.0.1:8088); the version
# prefix is $DUVO_VERSION_PREFIX (default /v2). Start the sim with a high
# rate limit (e.g. --rate-limit 1000) so the probe itself is not throttled.
# Needs bash, curl and python3 (json module only). Prints one PASS/FAIL line
# per rule and exits non-zero if any rule failed.
set -u

if [ $# -lt 3 ]; then
  echo "usage: $0 BASE_URL KEY QUEUE [RESTRICTED_KEY]" >&2
  exit 2
fi
BASE="${1%/}"
KEY="$2"
QUEUE="$3"
RKEY="${4:-}"
PREFIX="${DUVO_VERSION_PREFIX:-/v2}"
API="$BASE$PREFIX"
CASES="$API/queues/$QUEUE/cases"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAILS=0
PASSES=0

pass() { PASSES=$((PASSES + 1)); echo "PASS  $1"; }
fail() { FAILS=$((FAILS + 1)); echo "FAIL  $1${2:+ ($2)}"; }

# req METHOD URL [curl args...] -> sets STATUS, body in $TMP/body, headers in $TMP/headers
req() {
  local method="$1" url="$2"
  shift 2
  STATUS="$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -X "$method" "$url" "$@" 2>"$TMP/curl_err")" || STATUS="000"
}
auth() { req "$1" "$2" -H "Authorization: Bearer $KEY" "${@:3}"; }
post_json() { auth POST "$1" -H 'Content-Type: application/json' --data-binary "$2" "${@:3}"; }

header() { # header NAME -> value (case-insensitive, last occurrence)
  tr -d '\r' <"$TMP/headers" | awk -v n="$(echo "$1" | tr 'A-Z' 'a-z')" -F': ' 'tolower($1)==n {v=$2} END {print v}'
}
# jget EXPR: evaluate a python expression over the JSON body bound to `b`
jget() { python3 -c "import json,sys; b=json.load(open(sys.argv[1])); print($1)" "$TMP/body" 2>/dev/null; }

has_error_model() { [ "$(jget '1 if isinstance(b.get("error"),str) and isinstance(b.get("message"),str) else 0')" = "1" ]; }
has_rate_headers() { [ -n "$(header x-ratelimit-limit)" ] && [ -n "$(header x-ratelimit-remaining)" ] && [ -n "$(header x-ratelimit-reset)" ]; }

# expect RULE STATUS ERROR_TYPE [rate]: check status, error model and optionally the rate headers
expect() {
  local rule="$1" want="$2" etype="$3" rate="${4:-}"
  if [ "$STATUS" != "$want" ]; then fail "$rule" "got HTTP $STATUS, want $want"; return; fi
  if ! has_error_model; then fail "$rule" "body is not {error, message}"; return; fi
  if [ "$(jget 'b["error"]')" != "$etype" ]; then fail "$rule" "error type $(jget 'b["error"]'), want $etype"; return; fi
  if [ -n "$rate" ] && ! has_rate_headers; then fail "$rule" "missing x-ratelimit-* headers"; return; fi
  pass "$rule"
}

# --- auth -----------------------------------------------------------------
req GET "$CASES";                                   expect "401 without Authorization" 401 unauthorized
req GET "$CASES" -H "Authorization: Basic Zm9vOmJhcg=="; expect "401 malformed Authorization" 401 unauthorized
req GET "$CASES" -H "Authorization: Bearer dv_probe_unknown_key_000000000000"; expect "401 unknown key" 401 unauthorized
if [ -n "$RKEY" ]; then
  req GET "$CASES" -H "Authorization: Bearer $RKEY"; expect "403 key without access to the queue" 403 forbidden rate
else
  echo "SKIP  403 key without access to the queue (no RESTRICTED_KEY given)"
fi
auth GET "$API/queues/00000000-0000-4000-8000-000000000000/cases"; expect "404 unknown queue" 404 not_found rate
auth GET "$API/no/such/route";                      expect "404 unknown route (JSON)" 404 not_found

# --- create ---------------------------------------------------------------
post_json "$CASES" '{"cases":[{"title":"probe A","data":"{\"k\":1}","labels":[{"key":"src","value":"probe"}],"priority":"high"},{"title":"probe B"}]}'
if [ "$STATUS" = 201 ] && [ "$(jget '",".join(c["title"] for c in b["added_cases"])')" = "probe A,probe B" ] \
   && [ "$(jget 'all(c["status"]=="pending" and c["queue_id"] and c["id"] and c["created_at"] and c["updated_at"] for c in b["added_cases"])')" = "True" ]; then
  pass "201 create returns added_cases in request order, pending"
else
  fail "201 create returns added_cases in request order, pending" "HTTP $STATUS"
fi
if has_rate_headers; then pass "x-ratelimit-* headers on success"; else fail "x-ratelimit-* headers on success"; fi
FIRST_ID="$(jget 'b["added_cases"][0]["id"]')"

LONG="$(python3 -c 'print("x"*501)')"
MANY="$(python3 -c 'import json; print(json.dumps({"cases":[{"title":"t%d"%i} for i in range(101)]}))')"
while IFS='|' read -r rule body; do
  post_json "$CASES" "$body"; expect "400 $rule" 400 invalid_request rate
done <<EOB
malformed JSON|{"cases":[
body not an object|[1,2]
neither case nor cases|{}
both case and cases|{"case":{"title":"a"},"cases":[{"title":"b"}]}
zero cases|{"cases":[]}
more than 100 cases|$MANY
missing title|{"case":{"data":"x"}}
empty title|{"case":{"title":""}}
title over 500 characters|{"case":{"title":"$LONG"}}
data not a string|{"case":{"title":"a","data":{"k":1}}}
bad labels|{"case":{"title":"a","labels":[{"key":"k"}]}}
bad priority|{"case":{"title":"a","priority":"urgent"}}
EOB
python3 -c 'import json; print(json.dumps({"case":{"title":"big","data":"x"*(1024*1024+10)}}))' >"$TMP/big.json"
auth POST "$CASES" -H 'Content-Type: application/json' --data-binary "@$TMP/big.json"
expect "413 body over 1 MiB" 413 payload_too_large rate

# --- idempotency ----------------------------------------------------------
IK="probe-$(date +%s)-$$-$RANDOM"
BODY='{"cases":[{"title":"idem 1"},{"title":"idem 2"}]}'
post_json "$CASES" "$BODY" -H "Idempotency-Key: $IK"; S1="$STATUS"; IDS1="$(jget '",".join(c["id"] for c in b["added_cases"])')"
post_json "$CASES" "$BODY" -H "Idempotency-Key: $IK"; S2="$STATUS"; IDS2="$(jget '",".join(c["id"] for c in b["added_cases"])')"
if [ "$S1" = 201 ] && [ "$S2" = 201 ] && [ -n "$IDS1" ] && [ "$IDS1" = "$IDS2" ]; then
  pass "idempotent replay returns the same cases"
else
  fail "idempotent replay returns the same cases" "$S1/$S2"
fi
post_json "$CASES" '{"cases":[{"title":"other body"}]}' -H "Idempotency-Key: $IK"
expect "409 same Idempotency-Key, other body" 409 conflict rate

# --- list & search --------------------------------------------------------
auth GET "$CASES?limit=2&offset=0&sort_by=created_at&sort_order=asc"
if [ "$STATUS" = 200 ] && [ "$(jget 'len(b["cases"])<=2 and b["limit"]==2 and b["offset"]==0 and b["total"]>=4')" = "True" ]; then
  pass "list with limit/offset/sort"
else
  fail "list with limit/offset/sort" "HTTP $STATUS"
fi
auth GET "$CASES?search=PROBE%20b&status=pending,claimed,completed,failed"
if [ "$STATUS" = 200 ] && [ "$(jget 'any(c["id"] for c in b["cases"] if c["title"]=="probe B")')" = "True" ]; then
  pass "list search (case-insensitive) + status filter"
else
  fail "list search (case-insensitive) + status filter" "HTTP $STATUS"
fi
auth GET "$CASES?updated_at_from=2000-01-01T00:00:00Z&sort_by=updated_at&limit=100"
if [ "$STATUS" = 200 ] && [ "$(jget 'b["total"]>=4')" = "True" ]; then pass "list updated_at_from"; else fail "list updated_at_from" "HTTP $STATUS"; fi
for q in "limit=0" "limit=101" "status=bogus" "updated_at_from=yesterday" "sort_order=sideways"; do
  auth GET "$CASES?$q"; expect "400 list $q" 400 invalid_request rate
done
post_json "$CASES/search" '{"filters":{"status":["pending","claimed","completed","failed"]},"search":"idem","limit":10,"sort_order":"asc"}'
if [ "$STATUS" = 200 ] && [ "$(jget 'b["total"]==2 and sorted(c["title"] for c in b["cases"])==["idem 1","idem 2"]')" = "True" ]; then
  pass "search endpoint"
else
  fail "search endpoint" "HTTP $STATUS"
fi
auth GET "$API/queues/$QUEUE"
if [ "$STATUS" = 200 ]; then pass "GET queue"; else fail "GET queue" "HTTP $STATUS"; fi

# --- simulator-only checks (skipped when /_sim is absent) -----------------
req GET "$BASE/_sim/stats"
if [ "$STATUS" = 200 ]; then
  if [ "$(jget 'all(k in b for k in ["requests","create_requests","cases_created","rate_limited","early_retries","idempotent_replays","by_status"]) and b["idempotent_replays"]>=1')" = "True" ]; then
    pass "/_sim/stats counters"
  else
    fail "/_sim/stats counters"
  fi
  req POST "$BASE/_sim/faults" -H 'Content-Type: application/json' --data-binary '{"outage":true}'
  auth GET "$CASES"; expect "503 during outage" 503 service_unavailable rate
  req POST "$BASE/_sim/faults" -H 'Content-Type: application/json' --data-binary '{"outage":false,"error_ratio":1.0,"error_status":502}'
  auth GET "$CASES"; expect "error_ratio answers error_status" 502 bad_gateway rate
  req POST "$BASE/_sim/faults" -H 'Content-Type: application/json' --data-binary '{"error_ratio":0.0,"error_status":503}'
  auth GET "$CASES"
  if [ "$STATUS" = 200 ]; then pass "faults cleared"; else fail "faults cleared" "HTTP $STATUS"; fi
  req GET "$BASE/_sim/cases"
  if [ "$STATUS" = 200 ] && grep -q "$FIRST_ID" "$TMP/body"; then pass "/_sim/cases NDJSON"; else fail "/_sim/cases NDJSON"; fi
  # Agent lifecycle: one case marked to fail, one not; both end terminal.
  post_json "$CASES" '{"cases":[{"title":"lifecycle ok","data":"{\"n\":1}"},{"title":"lifecycle fail","data":"{\"simulate\":\"fail\"}"}]}'
  OK_ID="$(jget 'b["added_cases"][0]["id"]')"; FAIL_ID="$(jget 'b["added_cases"][1]["id"]')"
  got=""
  for _ in $(seq 1 150); do
    auth GET "$CASES?status=completed,failed&limit=100&search=lifecycle"
    got="$(jget '",".join(sorted(c["id"]+"="+c["status"] for c in b["cases"]))')"
    case "$got" in *"$OK_ID=completed"*"$FAIL_ID=failed"*|*"$FAIL_ID=failed"*"$OK_ID=completed"*) break;; esac
    sleep 0.1
  done
  case "$got" in
    *"$OK_ID=completed"*) case "$got" in *"$FAIL_ID=failed"*) pass "agent: pending -> completed, \"simulate\":\"fail\" -> failed";; *) fail "agent lifecycle" "$got";; esac;;
    *) fail "agent lifecycle (start the sim with a small --process-ms)" "$got";;
  esac
else
  echo "SKIP  /_sim checks (not a simulator: HTTP $STATUS)"
fi

echo "----"
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" -eq 0 ]
