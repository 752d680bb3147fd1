#!/usr/bin/env bash
# tests/ops/rolling.sh [CLIENTS] - a rolling restart behind Debian's nginx.
#
# Starts two agentsmithy-server instances (A, B) on loopback ports and nginx
# with examples/deploy/nginx.conf in front of them (its own prefix, logs and
# temp dirs under a temp directory, not a daemon), then CLIENTS (default 200)
# clients of tests/ops/rolling_client that stream continuously through nginx.
# Restarts A (SIGTERM, wait for its exit, start it again on the same port,
# wait for /health 200 and for nginx to send it traffic again), then B.
#
# Asserts:
#   - the client's checks (see rolling_client.cpp): every stream that ended got
#     `done`; every stream cut by a shutdown ended with the shutdown error
#     (code "shutdown") then `done`; no 502, 504, other status, reset or
#     truncated stream; no client-visible 503; every client completed streams
#     in each phase, i.e. after both restarts;
#   - during the lame duck (--lame-duck, OPS_LAME_DUCK s) the stopping
#     instance's /health answers 503 "stopping" while it still serves a chat;
#   - while A's drain is held open (a connection still sending its request
#     keeps it going until the read timeout), a chat sent straight to A gets
#     503, Retry-After: 1 and the shutdown body (code "shutdown"), and a POST
#     and a GET through a test-only server (A first, B as backup, the
#     recommended retry policy) come back whole, logged "503, 200";
#   - each instance exits 0 after SIGTERM;
#   - nginx's access log shows only 200s to clients, and requests that hit a
#     stopping or stopped instance retried on the other (upstream_status
#     "503, 200" or "502, 200"), so the retries were really exercised;
#   - nginx's error log has no "no live upstreams".
# Prints the client's figures and the retry counts; exits 0 if all held.
#
# Environment: AGENTSMITHY_SERVER (default build/agentsmithy-server),
# ROLLING_CLIENT (default build/ops/rolling_client), OPS_LAME_DUCK (1),
# OPS_TOKENS (30) and OPS_INTERVAL_MS (50): a 1.5 s stream, OPS_GET_EVERY (4),
# OPS_FINAL_STREAMS (2), OPS_CLIENT_ARGS (more rolling_client flags),
# OPS_KEEP=1 keeps the temp directory.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/ops/lib.sh
source "$HERE/lib.sh"
ROOT=$OPS_ROOT

N=${1:-${OPS_CLIENTS:-200}}
LAME_DUCK=${OPS_LAME_DUCK:-1}
TOKENS=${OPS_TOKENS:-30}
INTERVAL_MS=${OPS_INTERVAL_MS:-50}
GET_EVERY=${OPS_GET_EVERY:-4}
FINAL_STREAMS=${OPS_FINAL_STREAMS:-2}
CLIENT=${ROLLING_CLIENT:-$ROOT/build/ops/rolling_client}
MAX_STREAMS=$((N * 2 > 256 ? N * 2 : 256))  # one instance must hold every client
OPS_FAILED=0

TMP=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-rolling.XXXXXX")
chmod 755 "$TMP"  # nginx's workers (user nobody) create their temp files under it
finish() {
  ops_stop_all
  if [[ -n ${OPS_KEEP:-} ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap finish EXIT
trap 'exit 130' INT TERM

ops_need nginx nginx curl curl ss iproute2 || exit 1
if [[ ! -x $CLIENT || $HERE/rolling_client.cpp -nt $CLIENT ]]; then
  mkdir -p "$(dirname "$CLIENT")"
  ${CXX:-g++} -std=c++17 -O2 -Wall -Wextra -Wpedantic -Werror -o "$CLIENT" "$HERE/rolling_client.cpp" || exit 1
fi
ops_server_snapshot "$TMP/agentsmithy-server" || exit 1
SERVER=$TMP/agentsmithy-server
ld_flag=()
if ((LAME_DUCK > 0)); then
  if ! "$SERVER" --help 2>&1 | grep -q -- '--lame-duck'; then
    echo "FAIL: $SERVER has no --lame-duck flag (set OPS_LAME_DUCK=0 to run without it)"
    exit 1
  fi
  ld_flag=(--lame-duck "$LAME_DUCK")
fi

PORT_A=$(ops_free_port) && PORT_B=$(ops_free_port) && PORT_NGINX=$(ops_free_port) || exit 1
while [[ $PORT_B == "$PORT_A" ]]; do PORT_B=$(ops_free_port); done
while [[ $PORT_NGINX == "$PORT_A" || $PORT_NGINX == "$PORT_B" ]]; do PORT_NGINX=$(ops_free_port); done
declare -A PORT=([A]=$PORT_A [B]=$PORT_B) PID=()

start_instance() {  # NAME
  local name=$1 wd=$TMP/wd-$1
  mkdir -p "$wd"
  "$SERVER" --workdir "$wd" --host 127.0.0.1 --port "${PORT[$name]}" --log-format json \
    --grace-period 5 --max-streams "$MAX_STREAMS" "${ld_flag[@]}" >>"$TMP/$name.log" 2>&1 &
  PID[$name]=$!
  ops_track "${PID[$name]}"
  ops_wait_http "http://127.0.0.1:${PORT[$name]}/health" 200 10 || return 1
  ops_log "instance $name up on ${PORT[$name]} (pid ${PID[$name]})"
}

# --- nginx: the recommended file, with this run's ports and paths ------------
NG=$TMP/nginx
mkdir -p "$NG/conf" "$NG/logs" "$NG/temp"
conf=$NG/conf/nginx.conf
cp "$ROOT/examples/deploy/nginx.conf" "$conf"
printf 'server 127.0.0.1:%s max_fails=3 fail_timeout=5s;\nserver 127.0.0.1:%s max_fails=3 fail_timeout=5s;\n' \
  "$PORT_A" "$PORT_B" >"$NG/conf/agentsmithy-upstreams.conf"
substitute() {  # PATTERN REPLACEMENT: exactly one line must match
  local n
  n=$(grep -cF -- "$1" "$conf")
  if [[ $n != 1 ]]; then
    echo "FAIL: examples/deploy/nginx.conf: expected one line with '$1', found $n"
    exit 1
  fi
  local esc_from esc_to
  esc_from=$(printf '%s' "$1" | sed 's/[][\/.*^$]/\\&/g')
  esc_to=$(printf '%s' "$2" | sed 's/[\/&]/\\&/g')
  sed -i "s/$esc_from/$esc_to/" "$conf"
}
substitute 'listen 8080;' "listen 127.0.0.1:$PORT_NGINX;"
substitute '/var/log/nginx/agentsmithy.access.log' "$NG/logs/access.log"
substitute '/var/log/nginx/agentsmithy.error.log warn' "$NG/logs/error.log info"
# A test-only server on a second port: A first and never marked failed
# (max_fails=0), B as its backup. It inherits the recommended http-level
# retry policy (proxy_next_upstream ...), so while A drains, every POST and
# GET sent to it must hit A's 503 and come back whole from B.
PORT_PROBE=$(ops_free_port) || exit 1
cat >"$NG/conf/probe.conf" <<EOF
upstream agentsmithy_probe {
    server 127.0.0.1:$PORT_A max_fails=0;
    server 127.0.0.1:$PORT_B backup;
}
server {
    listen 127.0.0.1:$PORT_PROBE;
    access_log $NG/logs/probe.log agentsmithy;
    location / {
        proxy_pass http://agentsmithy_probe;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host localhost;
        proxy_buffering off;
    }
}
EOF
substitute '    send_timeout 60s;' '    send_timeout 60s; include probe.conf;'
substitute 'http {' "http { client_body_temp_path $NG/temp/body; proxy_temp_path $NG/temp/proxy; fastcgi_temp_path $NG/temp/fastcgi; uwsgi_temp_path $NG/temp/uwsgi; scgi_temp_path $NG/temp/scgi;"
NGINX_ARGS=(-p "$NG" -c "$conf" -e "$NG/logs/startup.log"
  -g "daemon off; pid $NG/nginx.pid; error_log $NG/logs/main.log warn;")
if ! nginx -t "${NGINX_ARGS[@]}" >"$NG/logs/test.txt" 2>&1; then
  cat "$NG/logs/test.txt"
  echo "FAIL: nginx -t rejects the configuration"
  exit 1
fi

start_instance A || exit 1
start_instance B || exit 1
nginx "${NGINX_ARGS[@]}" >"$NG/logs/stdout.log" 2>&1 &
NGINX_PID=$!
ops_track "$NGINX_PID"
ops_wait_http "http://127.0.0.1:$PORT_NGINX/health" 200 10 '"server_status":"ready"' || exit 1
ops_log "nginx $(nginx -v 2>&1 | sed 's/.*\///') on $PORT_NGINX (pid $NGINX_PID) in front of A:$PORT_A B:$PORT_B"

# --- the clients --------------------------------------------------------------
CLIENT_OUT=$TMP/client.out
"$CLIENT" --port "$PORT_NGINX" --clients "$N" --tokens "$TOKENS" --interval-ms "$INTERVAL_MS" \
  --get-every "$GET_EVERY" --phases 3 --final-streams "$FINAL_STREAMS" --timeout 150 ${OPS_CLIENT_ARGS:-} \
  >"$CLIENT_OUT" 2>&1 &
CLIENT_PID=$!
ops_track "$CLIENT_PID"
ops_wait_grep "$CLIENT_OUT" '^phase 0: every client served' 60 || { cat "$CLIENT_OUT"; exit 1; }
ops_log "$N clients streaming through nginx"

access=$NG/logs/access.log
# wait_routed PORT SINCE FROM_BYTE SECONDS: polls nginx's access log for a 200
# whose last upstream was 127.0.0.1:PORT and which began (t - rt) after SINCE.
wait_routed() {
  local port=$1 since=$2 from=$3 secs=$4 i
  for ((i = 0; i < secs * 20; i++)); do
    if tail -c +"$((from + 1))" "$access" | awk -v addr="127.0.0.1:$port\"" -v since="$since" '
        {
          up = ""; st = ""; rt = 0; t = 0
          for (f = 1; f <= NF; f++) {
            if ($f ~ /^up=/) up = $f
            else if ($f ~ /^up_status=/) st = $f
            else if ($f ~ /^rt=/) rt = substr($f, 4) + 0
            else if ($f ~ /^t=/) t = substr($f, 3) + 0
          }
          n = length(addr)
          if (substr(up, length(up) - n + 1) == addr && st ~ /200"$/ && t - rt > since) { found = 1; exit }
        }
        END { exit !found }'; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}
CHAT_BODY='{"messages":[{"role":"user","content":"probe"}],"context":{"demo":{"tokens":2,"interval_ms":0}}}'

# During A's drain (held open by a client still sending its request): a chat sent to
# A directly gets the 503 of the contract, and a POST and a GET sent through
# the probe server (A first, B backup) hit that 503 and come back whole.
probe_drain() {  # PORT
  local port=$1 i code out
  for ((i = 0; i < (LAME_DUCK + 5) * 20; i++)); do
    code=$(curl -s -m 5 -o "$TMP/direct.txt" -D "$TMP/direct.head" -w '%{http_code}' -X POST \
      "http://127.0.0.1:$port/api/chat" -H 'Content-Type: application/json' -d "$CHAT_BODY")
    [[ $code == 503 || $code == 000 ]] && break  # 000: refused, the drain is over
    sleep 0.05
  done
  if [[ $code != 503 ]]; then
    ops_fail "instance A never answered a chat with 503 during its drain (last: $code): the drain did not wait for the connection still sending its request"
    return
  fi
  if grep -qi '^retry-after: 1' "$TMP/direct.head" &&
    grep -qF '"code":"shutdown"' "$TMP/direct.txt" &&
    grep -qF 'Server is shutting down (graceful shutdown)' "$TMP/direct.txt"; then
    ops_pass "instance A draining: a new chat gets 503, Retry-After: 1, code shutdown"
  else
    ops_fail "instance A draining: 503 without Retry-After: 1 or the shutdown body: $(tr -d '\r' <"$TMP/direct.head" | tr '\n' ' ') $(cat "$TMP/direct.txt")"
  fi
  local from
  from=$(stat -c %s "$NG/logs/probe.log" 2>/dev/null || echo 0)
  out=$(curl -s -N -m 10 -X POST "http://127.0.0.1:$PORT_PROBE/api/chat" \
    -H 'Content-Type: application/json' -d "$CHAT_BODY")
  [[ $out == *'"type":"chat_end"'*'"type":"done"'* ]] || ops_fail "probe POST during the drain: ${out:0:300}"
  if ((GET_EVERY > 0)); then
    out=$(curl -s -N -m 10 "http://127.0.0.1:$PORT_PROBE/api/chat?message=probe")
    [[ $out == *'"type":"chat_end"'*'"type":"done"'* ]] || ops_fail "probe GET during the drain: ${out:0:300}"
  fi
  # nginx writes its access-log line after the response has gone out: wait
  # for the lines (bounded) instead of reading the log at once.
  ops_wait_grep "$NG/logs/probe.log" '"POST /api/chat ' 5 "$from" || true
  if ((GET_EVERY > 0)); then ops_wait_grep "$NG/logs/probe.log" '"GET /api/chat' 5 "$from" || true; fi
  local lines
  lines=$(tail -c +"$((from + 1))" "$NG/logs/probe.log")
  if grep -qE '"POST /api/chat [^"]*" 200 up="[^"]*" up_status="503, 200"' <<<"$lines"; then
    ops_pass "nginx passed A's 503 on a POST to B (non_idempotent)"
  else
    ops_fail "no POST retried after A's 503: $lines"
  fi
  if ((GET_EVERY > 0)); then
    if grep -qE '"GET /api/chat[^"]*" 200 up="[^"]*" up_status="503, 200"' <<<"$lines"; then
      ops_pass "nginx passed A's 503 on a GET to B"
    else
      ops_fail "no GET retried after A's 503: $lines"
    fi
  fi
}

restart() {  # NAME PHASE HOLD (1: hold the drain open, and probe it)
  local name=$1 phase=$2 hold=$3 port=${PORT[$1]} pid=${PID[$1]} from t0 t1 t2 stall_fd=
  from=$(stat -c %s "$access")
  if [[ $hold == 1 ]]; then
    # A client still sending its request (headers and the first bytes of a
    # 200-byte body) holds the drain open: the server waits for that
    # connection until its read timeout (5 s from the request's first byte),
    # and answers every new chat meanwhile with 503.
    exec {stall_fd}<>"/dev/tcp/127.0.0.1/$port"
    printf 'POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"messages":' \
      "$port" >&"$stall_fd"
  fi
  t0=$(date +%s%N)
  ops_log "SIGTERM to instance $name (pid $pid)"
  kill -TERM "$pid"
  if ((LAME_DUCK > 0)); then
    # The lame duck: /health says stopping at once, chats are still served.
    if ops_wait_http "http://127.0.0.1:$port/health" 503 "$LAME_DUCK" '"server_status":"stopping"'; then
      local out
      out=$(curl -s -m 5 -X POST "http://127.0.0.1:$port/api/chat" -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"lame duck"}],"context":{"demo":{"tokens":2,"interval_ms":0}}}')
      if [[ $out == *'"type":"chat_end"'* && $out == *'"type":"done"'* ]]; then
        ops_pass "instance $name in lame duck: /health 503 stopping, chat still served"
      else
        ops_fail "instance $name in lame duck: a chat was not served whole: ${out:0:300}"
      fi
    else
      ops_fail "instance $name: /health did not answer 503 stopping within ${LAME_DUCK}s of SIGTERM"
    fi
  fi
  [[ $hold == 1 ]] && probe_drain "$port"
  if ! ops_wait_exit "$pid" $((LAME_DUCK + 15)); then
    ops_fail "instance $name still running $((LAME_DUCK + 15))s after SIGTERM"
    return 1
  fi
  t1=$(date +%s%N)
  [[ -n $stall_fd ]] && exec {stall_fd}>&-
  if [[ $OPS_EXIT_STATUS != 0 ]]; then ops_fail "instance $name exited with status $OPS_EXIT_STATUS"; fi
  ops_log "instance $name exited $OPS_EXIT_STATUS after $(((t1 - t0) / 1000000)) ms"
  start_instance "$name" || { ops_fail "instance $name did not come back"; return 1; }
  # nginx reads no /health: it tries the instance again after fail_timeout.
  # Only once it has served a stream through nginx that began after the
  # restart may the next instance stop.
  if ! wait_routed "$port" "$(date +%s.%N)" "$from" 30; then
    ops_fail "nginx sent no traffic to the restarted instance $name within 30 s"
    return 1
  fi
  t2=$(date +%s%N)
  ops_log "nginx routes to instance $name again, $(((t2 - t0) / 1000000)) ms after its SIGTERM"
  kill -USR1 "$CLIENT_PID"
  if [[ $phase -lt 2 ]]; then
    ops_wait_grep "$CLIENT_OUT" "^phase $phase: every client served" 60 || return 1
  fi
}

restart A 1 1 || exit 1
restart B 2 0 || exit 1

if ! ops_wait_exit "$CLIENT_PID" 120; then
  ops_fail "rolling_client did not finish"
  kill -TERM "$CLIENT_PID"
  ops_wait_exit "$CLIENT_PID" 10
fi
client_status=$OPS_EXIT_STATUS
cat "$CLIENT_OUT"
summary=$(grep '^rolling_client: clients=' "$CLIENT_OUT")
if [[ $client_status == 0 ]]; then
  ops_pass "rolling_client: no violation"
else
  ops_fail "rolling_client exited with status $client_status"
fi
if [[ $summary =~ client_503=([0-9]+) ]] && ((BASH_REMATCH[1] > 0)); then
  ops_fail "clients saw ${BASH_REMATCH[1]} 503s: nginx should have passed them to the other instance"
fi
if [[ $summary =~ cut_by_shutdown=([0-9]+) ]] && ((BASH_REMATCH[1] == 0)); then
  ops_fail "no stream was cut by a shutdown: the restarts did not hit open streams"
fi

# --- what nginx saw -------------------------------------------------------------
total=$(wc -l <"$access")
not_200=$(grep -Evc '" 200 up=' "$access")
retried=$(grep -Ec 'up_status="[0-9]+, ' "$access")
retried_503=$(grep -Ec 'up_status="503, ' "$access")
retried_503_post=$(grep -E '"POST [^"]*" 200 up="[^"]*" up_status="503, ' "$access" | wc -l)
retried_503_get=$(grep -E '"GET [^"]*" 200 up="[^"]*" up_status="503, ' "$access" | wc -l)
retried_post=$(grep -E '"POST [^"]*" 200 up="[^"]*" up_status="[0-9]+, ' "$access" | wc -l)
no_live=$(grep -c 'no live upstreams' "$NG/logs/error.log" 2>/dev/null)
echo "nginx: $total requests, $not_200 not 200; retried on the other instance: $retried" \
  "(after a 503: $retried_503, of them POST $retried_503_post, GET $retried_503_get; POST after any: $retried_post);" \
  "'no live upstreams': ${no_live:-0}"
if ((not_200 > 0)); then
  ops_fail "nginx answered $not_200 requests with a status other than 200:"
  grep -Ev '" 200 up=' "$access" | head -5
fi
if ((retried == 0)); then
  ops_fail "no request was retried: the restarts were not exercised through nginx"
fi
if ((${no_live:-0} > 0)); then ops_fail "nginx logged 'no live upstreams'"; fi
for name in A B; do
  if grep -q '"level":"error"\|ERROR' "$TMP/$name.log"; then
    ops_fail "instance $name logged an error:"
    grep '"level":"error"\|ERROR' "$TMP/$name.log" | head -3
  fi
done
grep -h 'drain\|notified\|shutdown' "$TMP"/A.log "$TMP"/B.log | head -12

if ((OPS_FAILED == 0)); then
  echo "rolling restart ($N clients): PASS"
  exit 0
fi
echo "rolling restart ($N clients): FAIL ($OPS_FAILED)"
exit 1
