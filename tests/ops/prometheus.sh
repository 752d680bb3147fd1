#!/usr/bin/env bash
# tests/ops/prometheus.sh - the server's /metrics, read by Debian's Prometheus.
#
# Starts agentsmithy-server (--max-streams 2, --lame-duck 3) and Debian's
# `prometheus` binary directly (its own --storage.tsdb.path under a temp
# directory, --web.listen-address on a loopback port, a config that scrapes
# the server every second), waits through the HTTP API until the target is
# up, runs streams with known outcomes, and queries the results.
#
# Asserts:
#   - GET /metrics answers 200 with Content-Type text/plain; version=0.0.4,
#     and `promtool check metrics` on it exits 0 and reports nothing;
#   - Prometheus scrapes it (/api/v1/targets health "up", query up == 1);
#   - after 3 POST streams and 1 GET stream that complete, 2 streams whose
#     client leaves, 1 chat refused at capacity, with 1 long stream open,
#     Prometheus returns agentsmithy_streams_ended_total{outcome="completed"}
#     4, {outcome="client_gone"} 2, {outcome="rejected_capacity"} 1,
#     {outcome="shutdown"} 0, {outcome="rejected_stopping"} 0,
#     agentsmithy_http_requests_total{route=~".*chat.*",status="200"} >= 6 and
#     {status="503"} 1, agentsmithy_stream_duration_seconds_count >= 6,
#     agentsmithy_stream_first_event_seconds_count >= 6,
#     agentsmithy_events_sent_total > 0, agentsmithy_sent_bytes_total > 0,
#     agentsmithy_streams_active 1, agentsmithy_lifecycle_state{state="ready"}
#     1 and {state="draining"} 0;
#   - the long stream ends with the shutdown error (code "shutdown");
#   - after SIGTERM, Prometheus sees lifecycle_state{state="lame_duck"} 1 during
#     the lame duck, and up 0 once the server has exited (0).
# Environment: AGENTSMITHY_SERVER (default build/agentsmithy-server),
# OPS_KEEP=1 keeps the temp directory.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/ops/lib.sh
source "$HERE/lib.sh"
OPS_FAILED=0
LAME_DUCK=3

TMP=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-prometheus.XXXXXX")
finish() {
  ops_stop_all
  if [[ -n ${OPS_KEEP:-} ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap finish EXIT
trap 'exit 130' INT TERM

ops_need prometheus prometheus promtool prometheus curl curl ss iproute2 || exit 1
ops_server_snapshot "$TMP/agentsmithy-server" || exit 1
SERVER=$TMP/agentsmithy-server
if ! "$SERVER" --help 2>&1 | grep -q -- '--lame-duck'; then
  echo "FAIL: $SERVER has no --lame-duck flag"
  exit 1
fi

PORT_S=$(ops_free_port) && PORT_P=$(ops_free_port) || exit 1
while [[ $PORT_P == "$PORT_S" ]]; do PORT_P=$(ops_free_port); done
S=http://127.0.0.1:$PORT_S
P=http://127.0.0.1:$PORT_P

mkdir -p "$TMP/wd"
"$SERVER" --workdir "$TMP/wd" --host 127.0.0.1 --port "$PORT_S" --log-format json \
  --max-streams 2 --lame-duck "$LAME_DUCK" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
ops_track "$SERVER_PID"
ops_wait_http "$S/health" 200 10 || exit 1

# --- /metrics itself and promtool ----------------------------------------------
code=$(curl -s -m 5 -D "$TMP/metrics.head" -o "$TMP/metrics.txt" -w '%{http_code}' "$S/metrics")
ctype=$(grep -i '^content-type:' "$TMP/metrics.head" | tr -d '\r' | cut -d' ' -f2-)
if [[ $code == 200 && $ctype == 'text/plain; version=0.0.4'* ]]; then
  ops_pass "/metrics: 200, $ctype, $(grep -vc '^#' "$TMP/metrics.txt") samples"
else
  ops_fail "/metrics: status $code, Content-Type '$ctype'"
fi
lint=$(promtool check metrics <"$TMP/metrics.txt" 2>&1)
lint_status=$?
if [[ $lint_status == 0 && -z $lint ]]; then
  ops_pass "promtool check metrics: no problems"
else
  ops_fail "promtool check metrics (status $lint_status): $lint"
fi
for name in agentsmithy_streams_active agentsmithy_streams_ended_total agentsmithy_http_requests_total \
  agentsmithy_events_sent_total agentsmithy_sent_bytes_total agentsmithy_stream_duration_seconds \
  agentsmithy_stream_first_event_seconds agentsmithy_lifecycle_state; do
  # (agentsmithy_last_drain_* describe a drain: absent until one has run,
  # and the example server exits after its drain, so they are not read here.)
  grep -q "^# TYPE $name " "$TMP/metrics.txt" || ops_fail "/metrics has no '# TYPE $name'"
done

# --- Prometheus --------------------------------------------------------------------
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: agentsmithy
    static_configs:
      - targets: ['127.0.0.1:$PORT_S']
EOF
promtool check config "$TMP/prometheus.yml" >/dev/null || { ops_fail "promtool check config"; exit 1; }
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/data" \
  --web.listen-address="127.0.0.1:$PORT_P" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
ops_track "$PROM_PID"
ops_wait_http "$P/-/ready" 200 30 || { tail -5 "$TMP/prometheus.log"; exit 1; }
ops_log "prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') on $PORT_P scraping $PORT_S"

# prom_value QUERY: the first result's value ("" when there is none).
prom_value() {
  curl -s -m 5 -G "$P/api/v1/query" --data-urlencode "query=$1" |
    grep -o '"value":\[[^]]*\]' | head -1 | sed 's/.*,"\([^"]*\)"\]$/\1/'
}
# prom_wait QUERY OP EXPECTED SECONDS: polls until the value compares (awk OP).
prom_wait() {
  local q=$1 op=$2 want=$3 secs=$4 i v=
  for ((i = 0; i < secs * 10; i++)); do
    v=$(prom_value "$q")
    if [[ -n $v ]] && awk -v v="$v" -v w="$want" "BEGIN { exit !(v + 0 $op w + 0) }"; then
      ops_pass "prometheus: $q = $v ($op $want)"
      return 0
    fi
    sleep 0.1
  done
  ops_fail "prometheus: $q = '${v}', expected $op $want within ${secs}s"
  return 1
}

for ((i = 0; i < 300; i++)); do
  curl -s -m 5 "$P/api/v1/targets" | grep -q '"health":"up"' && break
  sleep 0.1
done
if curl -s -m 5 "$P/api/v1/targets" | grep -q '"health":"up"'; then
  ops_pass "prometheus: target 127.0.0.1:$PORT_S is up"
else
  ops_fail "prometheus: target never up: $(curl -s -m 5 "$P/api/v1/targets" | head -c 400)"
  exit 1
fi
prom_wait 'up{job="agentsmithy"}' == 1 10

# --- streams with known outcomes ------------------------------------------------
post() {  # TOKENS INTERVAL_MS [curl args...]
  local tokens=$1 ms=$2
  shift 2
  curl -s -N "$@" -X POST "$S/api/chat" -H 'Content-Type: application/json' \
    -d "{\"messages\":[{\"role\":\"user\",\"content\":\"metrics\"}],\"context\":{\"demo\":{\"tokens\":$tokens,\"interval_ms\":$ms}}}"
}
for k in 1 2 3; do
  out=$(post 3 10 -m 10)
  [[ $out == *'"type":"chat_end"'*'"type":"done"'* ]] || ops_fail "POST stream $k incomplete: ${out:0:200}"
done
out=$(curl -s -N -m 10 "$S/api/chat?message=metrics")
[[ $out == *'"type":"chat_end"'*'"type":"done"'* ]] || ops_fail "GET stream incomplete: ${out:0:200}"
# A client that leaves mid-stream (curl gives up after 0.5 s of a 10 s stream),
# while a second long stream holds the other slot: the next chat is refused.
post 200 50 -m 0.5 -o /dev/null
# Its slot is free once the server has noticed (its next write fails).
ops_wait_http "$S/health" 200 10 '"active_streams":0' || ops_fail "the stream whose client left is still active"
# (curl itself in the background, not a subshell: its pid is the client's)
curl -s -N -m 30 -o "$TMP/long.txt" -X POST "$S/api/chat" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"long"}],"context":{"demo":{"tokens":1000,"interval_ms":50}}}' &
LONG_PID=$!
ops_track "$LONG_PID"
ops_wait_grep "$TMP/long.txt" '"type":"chat"' 10 || ops_fail "the long stream did not start"
curl -s -N -m 30 -o "$TMP/second.txt" -X POST "$S/api/chat" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"second"}],"context":{"demo":{"tokens":1000,"interval_ms":50}}}' &
SECOND_PID=$!
ops_track "$SECOND_PID"
ops_wait_grep "$TMP/second.txt" '"type":"chat"' 10 || ops_fail "the second long stream did not start"
code=$(post 1 0 -m 5 -o "$TMP/refused.txt" -w '%{http_code}')
[[ $code == 503 ]] || ops_fail "a third chat with --max-streams 2: status $code, expected 503"
kill -TERM "$SECOND_PID" 2>/dev/null  # its client leaves too: client_gone 2

prom_wait 'sum(agentsmithy_streams_ended_total{outcome="completed"})' == 4 15
prom_wait 'sum(agentsmithy_streams_ended_total{outcome="client_gone"})' == 2 15
prom_wait 'sum(agentsmithy_streams_ended_total{outcome="rejected_capacity"})' == 1 15
prom_wait 'sum(agentsmithy_streams_ended_total{outcome="shutdown"})' == 0 5
prom_wait 'sum(agentsmithy_streams_ended_total{outcome="rejected_stopping"})' == 0 5
prom_wait 'sum(agentsmithy_http_requests_total{route=~".*chat.*",status="200"})' '>=' 6 10
prom_wait 'sum(agentsmithy_http_requests_total{route=~".*chat.*",status="503"})' == 1 10
prom_wait 'sum(agentsmithy_stream_duration_seconds_count)' '>=' 6 10
prom_wait 'sum(agentsmithy_stream_first_event_seconds_count)' '>=' 6 10
prom_wait 'sum(agentsmithy_events_sent_total)' '>' 0 10
prom_wait 'sum(agentsmithy_sent_bytes_total)' '>' 0 10
prom_wait 'sum(agentsmithy_streams_active)' == 1 10
prom_wait 'agentsmithy_lifecycle_state{state="ready"}' == 1 10
prom_wait 'agentsmithy_lifecycle_state{state="draining"}' == 0 10

# --- the shutdown, as Prometheus sees it ------------------------------------------------
kill -TERM "$SERVER_PID"
ops_log "SIGTERM to the server; lame duck ${LAME_DUCK}s"
prom_wait 'agentsmithy_lifecycle_state{state="lame_duck"}' == 1 "$LAME_DUCK"
prom_wait 'agentsmithy_lifecycle_state{state="ready"}' == 0 "$LAME_DUCK"
if ops_wait_exit "$SERVER_PID" $((LAME_DUCK + 10)); then
  [[ $OPS_EXIT_STATUS == 0 ]] || ops_fail "server exited with status $OPS_EXIT_STATUS"
else
  ops_fail "server still running $((LAME_DUCK + 10))s after SIGTERM"
fi
if ops_wait_exit "$LONG_PID" 10; then
  grep -q '"code":"shutdown"' "$TMP/long.txt" || ops_fail "the long stream did not get the shutdown error"
fi
prom_wait 'up{job="agentsmithy"}' == 0 10

if ((OPS_FAILED == 0)); then
  echo "prometheus: PASS"
  exit 0
fi
echo "prometheus: FAIL ($OPS_FAILED)"
exit 1
