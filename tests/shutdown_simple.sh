#!/usr/bin/env bash
# shellcheck disable=SC2317  # helpers run from the trap and through wait_for
# tests/shutdown_simple.sh - the seed's manual graceful-shutdown test, automated.
#
# Starts build/agentsmithy-server (or $AGENTSMITHY_SERVER) on a free port,
# streams "Tell me a long story" with curl, sends SIGINT once chat events are
# arriving, and checks that the stream ends with the shutdown error and then
# done, that curl saw a complete chunked response and that the server exits 0.
# Prints PASS/FAIL lines; exits non-zero on any failure.
#
#   bash tests/shutdown_simple.sh
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
server="${AGENTSMITHY_SERVER:-$root/build/agentsmithy-server}"
case "$server" in /*) ;; *) server="$root/$server" ;; esac

failures=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
now_ms() { date +%s%3N; }

if [ ! -x "$server" ]; then
  echo "FAIL: $server is missing or not executable (run make first)"
  exit 1
fi
if ! command -v curl >/dev/null 2>&1; then
  echo "FAIL: curl is not installed"
  exit 1
fi

tmp="$(mktemp -d)"
server_pid=""
curl_pid=""
cleanup() {
  if [ -n "$curl_pid" ] && kill -0 "$curl_pid" 2>/dev/null; then kill "$curl_pid" 2>/dev/null; fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Waits until the command succeeds, polling every 50 ms, for at most $1 ms.
wait_for() {
  local limit_ms=$1
  shift
  local deadline=$(($(now_ms) + limit_ms))
  until "$@"; do
    [ "$(now_ms)" -ge "$deadline" ] && return 1
    sleep 0.05
  done
}

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
server_alive() { kill -0 "$server_pid" 2>/dev/null; }
server_gone() { ! kill -0 "$server_pid" 2>/dev/null; }
curl_gone() { ! kill -0 "$curl_pid" 2>/dev/null; }
health_ok() { curl -sf --max-time 1 "http://127.0.0.1:$port/health" >"$tmp/health.json" 2>/dev/null; }
ready_or_dead() { health_ok || server_gone; }
chat_events() { grep -cE '^data: .*"type": ?"chat"[,}]' "$tmp/out.txt" 2>/dev/null || true; }
has_chat_events() { [ "$(chat_events)" -ge 3 ]; }

# --- start the server on a free port below the kernel's ephemeral range
# (another process may take it between the probe and the bind: try a few)
read -r ephemeral_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || ephemeral_low=32768
[ "$ephemeral_low" -gt 12000 ] || ephemeral_low=32768
port=""
for attempt in 1 2 3 4 5 6 7 8; do
  candidate=$((10000 + (RANDOM * 32768 + RANDOM) % (ephemeral_low - 10000)))
  port_is_free "$candidate" || continue
  port=$candidate
  "$server" --workdir "$tmp" --port "$port" >"$tmp/server.out" 2>"$tmp/server.err" &
  server_pid=$!
  if wait_for 10000 ready_or_dead && health_ok; then break; fi
  if server_alive; then
    kill -KILL "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  echo "note: attempt $attempt on port $port failed:"
  sed 's/^/  | /' "$tmp/server.err"
  server_pid=""
  port=""
done
if [ -z "$server_pid" ]; then
  echo "FAIL: the server did not become ready"
  exit 1
fi
pass "server ready on 127.0.0.1:$port (pid $server_pid): $(cat "$tmp/health.json")"

# --- the seed's curl
curl -sN --max-time 60 -X POST "http://127.0.0.1:$port/api/chat" \
  -H "Content-Type: application/json" \
  -H "Accept: text/event-stream" \
  -d '{"messages": [{"role": "user", "content": "Tell me a long story"}], "stream": true}' \
  >"$tmp/out.txt" 2>"$tmp/curl.err" &
curl_pid=$!

if wait_for 10000 has_chat_events; then
  pass "chat events are streaming ($(chat_events) so far)"
else
  fail "no chat events within 10 s"
fi

# --- Ctrl+C
signal_ms=$(now_ms)
kill -INT "$server_pid"
if wait_for 15000 server_gone; then
  exit_ms=$(($(now_ms) - signal_ms))
  wait "$server_pid"
  status=$?
  server_pid=""
  echo "note: the server exited $exit_ms ms after SIGINT"
  if [ "$status" -eq 0 ]; then
    pass "server exit status 0"
  else
    fail "server exit status $status (expected 0)"
  fi
else
  fail "the server was still running 15 s after SIGINT"
  kill -KILL "$server_pid" 2>/dev/null
  wait "$server_pid" 2>/dev/null
  server_pid=""
fi

if wait_for 5000 curl_gone; then
  wait "$curl_pid"
  curl_status=$?
  curl_pid=""
  if [ "$curl_status" -eq 0 ]; then
    pass "curl finished cleanly (complete chunked response)"
  else
    fail "curl exit status $curl_status ($(head -c 300 "$tmp/curl.err"))"
  fi
else
  fail "curl was still running 5 s after the server exited"
fi

# --- the output order: user, chat_start, chat..., error "Server is shutting down ...", done
grep -E '^data: ' "$tmp/out.txt" | sed 's/^data: //' >"$tmp/events.txt"
total=$(wc -l <"$tmp/events.txt")
chats=$(grep -cE '"type": ?"chat"[,}]' "$tmp/events.txt")
first=$(head -n 1 "$tmp/events.txt")
second=$(sed -n 2p "$tmp/events.txt")
last=$(tail -n 1 "$tmp/events.txt")
before_last=$(tail -n 2 "$tmp/events.txt" | head -n 1)
errors=$(grep -cE '"type": ?"error"' "$tmp/events.txt")
dones=$(grep -cE '"type": ?"done"' "$tmp/events.txt")
non_data=$(grep -vE '^(data: .*)?$' "$tmp/out.txt" | grep -vc '^:')

echo "note: $total events, $chats chat chunks; the last two:"
tail -n 2 "$tmp/events.txt" | sed 's/^/  | /'

if [ "$chats" -ge 3 ]; then pass "the output has chat events ($chats)"; else fail "only $chats chat events"; fi
if grep -qE '"type": ?"user"' <<<"$first" && grep -q '"content": \?"Tell me a long story"' <<<"$first"; then
  pass "the first event is the user event with the query"
else
  fail "the first event is not the user event: $first"
fi
if grep -qE '"type": ?"chat_start"' <<<"$second"; then
  pass "chat_start follows it"
else
  fail "the second event is not chat_start: $second"
fi
if grep -qE '"type": ?"error"' <<<"$before_last" && grep -q '"error": \?"Server is shutting down (graceful shutdown)"' <<<"$before_last" &&
  grep -q '"code": \?"shutdown"' <<<"$before_last"; then
  pass "the shutdown error comes after the chat events"
else
  fail "the event before the last is not the shutdown error: $before_last"
fi
if grep -qE '"type": ?"done"' <<<"$last" && grep -qE '"done": ?true' <<<"$last"; then
  pass "done is the last event"
else
  fail "the last event is not done: $last"
fi
if [ "$errors" -eq 1 ]; then pass "exactly one error event"; else fail "$errors error events (expected 1)"; fi
if [ "$dones" -eq 1 ]; then pass "exactly one done event"; else fail "$dones done events (expected 1)"; fi
if [ "$non_data" -eq 0 ]; then pass "nothing but SSE lines in the output"; else fail "$non_data lines that are not SSE"; fi
if [ "$(grep -oE '"dialog_id": ?"[^"]*"' "$tmp/events.txt" | sort -u | wc -l)" -eq 1 ] &&
  [ "$(grep -cE '"dialog_id": ?"[^"]+"' "$tmp/events.txt")" -eq "$total" ]; then
  pass "every event carries the same dialog_id"
else
  fail "dialog_id missing or not the same on every event"
fi

# --- the lifecycle in the server's log
for step in "ready on" "signal received: SIGINT" "1 stream notified" "drained in" "stopped"; do
  if grep -q "$step" "$tmp/server.err" "$tmp/server.out"; then
    pass "server log: $step"
  else
    fail "server log lacks \"$step\""
  fi
done

if [ "$failures" -ne 0 ]; then
  echo "--- server stderr"
  sed 's/^/  | /' "$tmp/server.err"
  echo "--- curl output (first and last 5 lines)"
  head -n 5 "$tmp/out.txt" | sed 's/^/  | /'
  echo "  | ..."
  tail -n 5 "$tmp/out.txt" | sed 's/^/  | /'
  echo "shutdown_simple.sh: $failures check(s) failed"
  exit 1
fi
echo "shutdown_simple.sh: all checks passed"
exit 0
