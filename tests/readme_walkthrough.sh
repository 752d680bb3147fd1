#!/usr/bin/env bash
# shellcheck disable=SC2317  # helpers run from the trap and through wait_for
# shellcheck disable=SC2016  # backquotes in patterns are Markdown's, not commands
# tests/readme_walkthrough.sh - README.md's walkthrough, run for real, against
# what README.md shows.
#
# README.md marks the blocks that show what the server prints with a comment
# on the line before the fence:
#
#   <!-- readme-check: stderr -->         the server's terminal: its log lines;
#                                         `make run`'s own lines (checked
#                                         against the Makefile's run recipe),
#                                         `$ ` commands and, before the first
#                                         log line, the build (`...`)
#   <!-- readme-check: curl -->           the curl command to run (8765 becomes
#                                         the test's port)
#   <!-- readme-check: sse -->            curl's output
#   <!-- readme-check: sse-at-signal -->  curl's output around Ctrl+C; the text
#                                         of a chunk shown there depends on
#                                         when Ctrl+C came, so it is only
#                                         checked to be a chunk of the story
#   <!-- readme-check: health -->         GET /health's body
#   <!-- readme-check: chat-json -->      the non-streaming answer to "hi"
#
# The blocks of one output (the two stderr blocks; sse and sse-at-signal) are
# read as one, in README order. A line that starts with `...` stands for lines
# left out, and `...` inside a line for text left out; everything else is
# what the program prints, line after line: from its first line unless the
# README starts with `...`, to its last unless it ends with `...`. Both sides
# are normalised first: timestamps, dialog ids, ports, pids, durations in ms
# ("drained in N ms", the "*_ms" fields) and /health's "ide" vary.
#
# It also checks outputs the README shows in prose and tables: the story's
# size, the error bodies in the Protocol section's table, the shutdown error
# event, /health during the shutdown, the port-in-use error and the second
# signal's log line and exit status. Those come from a second server, so the
# walkthrough's server does only what the walkthrough does.
#
# Starts build/agentsmithy-server (or $AGENTSMITHY_SERVER; README=path checks
# another copy of the README). Prints a line per check and what differs,
# exits non-zero on any difference, and ends with
# "readme: N passed, M failed".
#
#   bash tests/readme_walkthrough.sh
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
server="${AGENTSMITHY_SERVER:-$root/build/agentsmithy-server}"
case "$server" in /*) ;; *) server="$PWD/$server" ;; esac
readme="${README:-$root/README.md}"
makefile="$root/Makefile"

passed=0
failed=0
pass() {
  passed=$((passed + 1))
  echo "PASS: $*"
}
fail() {
  failed=$((failed + 1))
  echo "FAIL: $*"
}
finish() {
  echo "readme: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}
now_ms() { date +%s%3N; }

if [ ! -x "$server" ]; then
  fail "$server is missing or not executable (run make first)"
  finish
fi
if ! command -v curl >/dev/null 2>&1; then
  fail "curl is not installed"
  finish
fi
if [ ! -r "$readme" ]; then
  fail "cannot read $readme"
  finish
fi

tmp="$(mktemp -d)"
pids=() # every process this script starts, by id
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until the command succeeds, polling every 20 ms, for at most $1 ms.
wait_for() {
  local limit_ms=$1
  shift
  local deadline=$(($(now_ms) + limit_ms))
  until "$@"; do
    [ "$(now_ms)" -ge "$deadline" ] && return 1
    sleep 0.02
  done
}
alive() { kill -0 "$1" 2>/dev/null; }
gone() { ! kill -0 "$1" 2>/dev/null; }
logged() { grep -qF -- "$2" "$1" 2>/dev/null; }
ready_or_gone() { logged "$1" "ready on" || gone "$2"; }
port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits (at most $2 ms) for process $1 to exit; sets `status` (999: still running).
await_exit() {
  status=999
  if wait_for "$2" gone "$1"; then
    wait "$1" 2>/dev/null
    status=$?
  fi
}

# The parts that vary from run to run, made the same on both sides.
normalise() {
  sed -E \
    -e 's/\r$//' \
    -e 's/\x1b\[[0-9;]*m//g' \
    -e 's/^\^C//' \
    -e 's/[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z/<time>/g' \
    -e 's/"dialog_id":"[A-Za-z0-9_-]*"/"dialog_id":"<id>"/g' \
    -e 's/(127\.0\.0\.1|localhost|\[::1\]):[0-9]+/\1:<port>/g' \
    -e 's/"port":[0-9]+/"port":<port>/g' \
    -e 's/"pid":[0-9]+/"pid":<pid>/g' \
    -e 's/"([a-z_]+_ms)":[0-9]+/"\1":<n>/g' \
    -e 's/(in|after) [0-9]+ ms/\1 <n> ms/g' \
    -e 's/"ide":("[^"]*"|null)/"ide":<ide>/g'
}
# A README line as a bash pattern: every character literal but `...`.
pattern_of() {
  printf '%s' "$1" | sed -E -e 's/[^A-Za-z0-9 ]/\\&/g' -e 's/\\\.\\\.\\\./*/g'
}
readme_flat() { tr '\n' ' ' <"$readme"; }

# --- the README's marked blocks: $tmp/readme/NN-KIND, lines "LINENO<TAB>TEXT"
mkdir -p "$tmp/readme" "$tmp/walk" "$tmp/probe" "$tmp/other"
awk -v dir="$tmp/readme" '
  fence {
    if ($0 ~ /^```/) { fence = 0; next }
    printf "%d\t%s\n", NR, $0 > file
    next
  }
  want {
    if ($0 ~ /^```/) { fence = 1; want = 0; next }
    printf "%d\tmarker not followed by a code fence\n", NR - 1 > (dir "/errors")
    want = 0
  }
  /^<!-- readme-check: [a-z-]+ -->$/ {
    kind = $0
    sub(/^<!-- readme-check: /, "", kind)
    sub(/ -->$/, "", kind)
    file = sprintf("%s/%02d-%s", dir, ++n, kind)
    printf "" > file
    want = 1
  }
' "$readme"
if [ -s "$tmp/readme/errors" ]; then
  while IFS=$'\t' read -r no text; do fail "README:$no: $text"; done <"$tmp/readme/errors"
fi
for kind in stderr curl sse sse-at-signal health chat-json; do
  compgen -G "$tmp/readme/*-$kind" >/dev/null || fail "README.md has no block marked <!-- readme-check: $kind -->"
done
for file in "$tmp"/readme/[0-9]*; do
  case "${file##*/[0-9][0-9]-}" in
    stderr | curl | sse | sse-at-signal | health | chat-json) ;;
    *) fail "README.md: unknown marker kind '${file##*/[0-9][0-9]-}'" ;;
  esac
done
[ "$failed" -eq 0 ] || finish

# Starts the server in directory $1 (--workdir ., as `make run` does) with the
# flags after it, on a free port below the kernel's ephemeral range; sets
# `port` and `server_pid`.
read -r ephemeral_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || ephemeral_low=32768
[ "$ephemeral_low" -gt 12000 ] || ephemeral_low=32768
start_server() {
  local dir=$1 attempt candidate
  shift
  server_pid=""
  port=""
  for attempt in 1 2 3 4 5 6 7 8; do
    candidate=$((10000 + (RANDOM * 32768 + RANDOM) % (ephemeral_low - 10000)))
    port_is_free "$candidate" || continue
    (cd "$dir" && exec "$server" --workdir . --port "$candidate" "$@") >"$dir.out" 2>"$dir.err" &
    server_pid=$!
    pids+=("$server_pid")
    if wait_for 10000 ready_or_gone "$dir.err" "$server_pid" && alive "$server_pid"; then
      port=$candidate
      return 0
    fi
    echo "note: attempt $attempt on port $candidate failed:"
    sed 's/^/  | /' "$dir.err"
    kill -KILL "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    server_pid=""
  done
  return 1
}

# ===========================================================================
# 1. The probe server (a token, an allowed origin, one stream at most, a lame
# duck): /health, the non-streaming answer, the story, the error table, the
# port in use, /health during the shutdown and a second signal.
# ===========================================================================

json='Content-Type: application/json'
bearer='Authorization: Bearer readme-token'

# Checks that the body the server gives for a request is one of the texts
# README.md's error table shows in that status's row.
probe() { # STATUS NAME CURL-ARGS...
  local want=$1 name=$2 code body message row item found=""
  shift 2
  code=$(curl -sS --max-time 5 -H 'Expect:' -o "$tmp/probe.json" -w '%{http_code}' "$@" 2>/dev/null)
  body=$(cat "$tmp/probe.json" 2>/dev/null)
  message=$(sed -E 's/^\{("code":"[a-z_]*",)?"error":"(.*)"\}$/\2/; s/\(max [0-9]+\)/(max N)/' <<<"$body")
  row=$(grep -nE "^\| $want \|" "$readme" | head -n 1)
  if [ "$code" != "$want" ]; then
    fail "error table, $name: the server answered $code $body (expected $want)"
    return
  fi
  if [ -z "$row" ]; then
    fail "error table: README.md has no row for $want ($name: $body)"
    return
  fi
  while IFS= read -r item; do
    item=$(sed -E 's/\(max [0-9]+\)/(max N)/' <<<"${item:1:${#item}-2}")
    # shellcheck disable=SC2053  # the right side is a pattern
    [[ $message == $(pattern_of "$item") ]] && found=$item
  done < <(grep -oE '`[^`]+`' <<<"${row#*:}")
  if [ -n "$found" ]; then
    pass "README:${row%%:*} error table, $want: \`$found\`"
  else
    fail "README:${row%%:*} error table, $want ($name): the server says \"$message\", the row shows: ${row#*:}"
  fi
}

if ! AGENTSMITHY_TOKEN=readme-token start_server "$tmp/probe" --lame-duck 5 --max-streams 1 \
  --cors-origin http://allowed.example; then
  fail "the probe server did not become ready"
  finish
fi
probe_pid=$server_pid
base="http://127.0.0.1:$port"

curl -sS --max-time 5 "$base/health" >"$tmp/health.json" 2>&1
curl -sS --max-time 5 "$base/api/chat" -H "$bearer" -H "$json" \
  -d '{"messages": [{"role": "user", "content": "hi"}], "stream": false}' >"$tmp/chat.json" 2>&1

# The whole story at once (no pause between chunks): its size, and its chunks.
curl -sS -N --max-time 10 "$base/api/chat" -H "$bearer" -H "$json" \
  -d '{"messages": [{"role": "user", "content": "Tell me a long story"}], "context": {"demo": {"interval_ms": 0}}}' \
  >"$tmp/story.txt" 2>&1
grep -E '^data: \{"content":"[^"]*","type":"chat",' "$tmp/story.txt" |
  sed -E 's/^data: \{"content":"([^"]*)".*/\1/' >"$tmp/story-chunks.txt"
story_chunks=$(wc -l <"$tmp/story-chunks.txt")
story_words=$(tr -s ' ' '\n' <"$tmp/story-chunks.txt" | grep -c .)

probe 400 "invalid JSON" "$base/api/chat" -H "$bearer" -H "$json" -d '{x'
probe 400 "no user message" "$base/api/chat" -H "$bearer" -H "$json" -d '{"messages":[{"role":"assistant","content":"x"}]}'
probe 401 "no token" "$base/api/chat" -H "$json" -d '{}'
probe 403 "foreign Host" "$base/api/chat" -H "Host: example.com" -H "$bearer" -H "$json" -d '{}'
probe 403 "preflight from a foreign Origin" -X OPTIONS "$base/api/chat" -H "Origin: http://other.example" \
  -H "Access-Control-Request-Method: POST"
probe 404 "GET /nope" "$base/nope"
head -c 1100000 /dev/zero | tr '\0' x >"$tmp/big.txt"
probe 413 "a large body" "$base/api/chat" -H "$bearer" -H "$json" --data-binary "@$tmp/big.txt"
probe 422 "no messages" "$base/api/chat" -H "$bearer" -H "$json" -d '{}'
probe 422 "stream not a bool" "$base/api/chat" -H "$bearer" -H "$json" -d '{"messages":[{"role":"user","content":"x"}],"stream":1}'

# Troubleshooting: a second server on the same port.
(cd "$tmp/other" && exec "$server" --workdir . --port "$port") >"$tmp/other.out" 2>"$tmp/other.err" &
other_pid=$!
pids+=("$other_pid")
await_exit "$other_pid" 10000
other_status=$status
shown=$(grep -noE '`ERROR cannot listen on [^`]*`, exit status [0-9]+' "$readme" | head -n 1)
if [ -n "$shown" ]; then
  no=${shown%%:*}
  text=${shown#*:}
  text=${text#\`}
  want_status=${text##* }
  text=${text%%\`*}
  if normalise <"$tmp/other.err" | grep -qF -- "$(normalise <<<"$text")" && [ "$other_status" = "$want_status" ]; then
    pass "README:$no port in use: $text, exit status $want_status"
  else
    fail "README:$no port in use: README shows \`$text\`, exit status $want_status; the server printed (exit status $other_status):
$(sed 's/^/    /' "$tmp/other.err")"
  fi
fi

# A stream fills the one slot: the next chat gets the capacity 503.
curl -sS -N --max-time 20 "$base/api/chat" -H "$bearer" -H "$json" \
  -d '{"messages":[{"role":"user","content":"Tell me a long story"}]}' >"$tmp/probe-sse.txt" 2>&1 &
pids+=("$!")
if wait_for 10000 grep -q chat_start "$tmp/probe-sse.txt"; then
  probe 503 "over max_streams" "$base/api/chat" -H "$bearer" -H "$json" -d '{"messages":[{"role":"user","content":"x"}]}'
else
  fail "the probe server's stream did not start"
fi

# SIGINT: the lame duck, with /health saying so; then a second signal.
first_signal=$(now_ms)
kill -INT "$probe_pid"
if wait_for 5000 logged "$tmp/probe.err" "lame duck for"; then
  code=$(curl -sS --max-time 5 -o "$tmp/health-stopping.json" -w '%{http_code}' "$base/health" 2>/dev/null)
  if [[ $(readme_flat) =~ During\ shutdown\ it\ returns\ ([0-9]+)\ with\ \`([^\`]*)\` ]]; then
    if [ "$code" = "${BASH_REMATCH[1]}" ] && grep -qF -- "${BASH_REMATCH[2]}" "$tmp/health-stopping.json"; then
      pass "/health during the shutdown: $code with ${BASH_REMATCH[2]}"
    else
      fail "/health during the shutdown: README says ${BASH_REMATCH[1]} with ${BASH_REMATCH[2]}; the server answered $code $(cat "$tmp/health-stopping.json")"
    fi
  fi
else
  fail "no \"lame duck for\" line within 5 s of SIGINT"
fi
# Signals closer together than 20 ms count as one (README: "arriving 20 ms or
# more after the first"): this spacing is that rule, not a wait for something.
while [ $(($(now_ms) - first_signal)) -lt 30 ]; do sleep 0.01; done
kill -INT "$probe_pid"
await_exit "$probe_pid" 5000
second_status=$status
shown=$(grep -noE '`second signal received: [^`]*`, exit status [0-9]+' "$readme" | head -n 1)
if [ -n "$shown" ]; then
  no=${shown%%:*}
  text=${shown#*:}
  text=${text#\`}
  want_status=${text##* }
  text=${text%%\`*}
  if grep -qF -- "$text" "$tmp/probe.err" && [ "$second_status" = "$want_status" ]; then
    pass "README:$no second signal: $text, exit status $want_status"
  else
    fail "README:$no second signal: README shows \`$text\`, exit status $want_status; the server printed (exit status $second_status):
$(sed 's/^/    /' "$tmp/probe.err")"
  fi
fi

# ===========================================================================
# 2. The walkthrough: the server as `make run` starts it, README's curl
# command, and Ctrl+C (SIGINT) once the chunk README shows last has arrived.
# ===========================================================================

if ! start_server "$tmp/walk"; then
  fail "the walkthrough's server did not become ready"
  finish
fi
walk_pid=$server_pid
echo "note: the walkthrough's server is ready on 127.0.0.1:$port (pid $walk_pid)"

curl_files=("$tmp"/readme/*-curl)
curl_line=$(cut -f2- "${curl_files[0]}" | sed -E 's/\\$//' | tr '\n' ' ' | tr -s ' ')
curl_line=$(sed -E "s#(localhost|127\\.0\\.0\\.1):8765#\\1:$port#g" <<<"$curl_line")
case "$curl_line" in
  "curl "*) ;;
  *) fail "README:$(head -n 1 "${curl_files[0]}" | cut -f1): the curl block is not one curl command: $curl_line" ;;
esac
bash -c "exec $curl_line" >"$tmp/sse.txt" 2>"$tmp/curl.err" &
curl_pid=$!
pids+=("$curl_pid")

last_chunk=$(cat "$tmp"/readme/*-sse-at-signal | cut -f2- |
  sed -nE 's/^data: \{"content":"([^"]*)","type":"chat",.*/\1/p' | tail -n 1)
# A chunk the story does not have fails below; meanwhile wait for a few chunks.
grep -qxF -- "$last_chunk" "$tmp/story-chunks.txt" || last_chunk=""
chat_count() { grep -c '"type":"chat",' "$tmp/sse.txt" 2>/dev/null || true; }
streamed() {
  if [ -n "$last_chunk" ]; then
    grep -qF -- "{\"content\":\"$last_chunk\",\"type\":\"chat\"," "$tmp/sse.txt"
  else
    [ "$(chat_count)" -ge 3 ]
  fi
}
if ! wait_for 10000 streamed; then
  fail "the stream did not reach ${last_chunk:+\"$last_chunk\" }within 10 s ($(chat_count) chunks)"
fi
kill -INT "$walk_pid"
await_exit "$walk_pid" 10000
walk_status=$status
await_exit "$curl_pid" 5000
curl_status=$status
[ "$walk_status" = 999 ] && fail "the walkthrough's server was still running 10 s after SIGINT"
[ "$curl_status" = 999 ] && fail "curl was still running 5 s after SIGINT"

# ===========================================================================
# 3. Compare.
# ===========================================================================

# The README's lines for one output: SEG_* hold a run of lines that must be
# printed one after the other; REAL the output's normalised non-empty lines
# (heartbeats left out), CURSOR where the next run may start.
SEG_PAT=()
SEG_NO=()
SEG_TXT=()

# check_run LABEL ANCHOR_START ANCHOR_END: checks SEG_* against REAL from
# CURSOR on. Anchored at the start, the run starts at CURSOR; at the end, it
# ends with REAL. A line that breaks the run fails, and the lines after it
# are checked as a run of their own.
check_run() {
  local label=$1 at_start=$2 at_end=$3 n=${#SEG_PAT[@]} first=0 s k best_s best_len miss last
  local total=${#REAL[@]}
  while ((first < n)); do
    best_s=-1
    best_len=0
    for ((s = CURSOR; s < total; s++)); do
      k=0
      # shellcheck disable=SC2053  # the right side is a pattern
      while ((first + k < n && s + k < total)) && [[ ${REAL[s + k]} == ${SEG_PAT[first + k]} ]]; do
        k=$((k + 1))
      done
      # Anchored at the end, the latest of the longest runs; else the first.
      if ((k > best_len || (k == best_len && k > 0 && at_end))); then
        best_len=$k
        best_s=$s
      fi
      ((at_start)) && break
      ((!at_end && first + best_len == n)) && break
    done
    ((best_len > 0)) && CURSOR=$((best_s + best_len))
    miss=$((first + best_len))
    last=$((miss - 1))
    # The run reached the README's last line: then it must be the output's last.
    if ((miss == n && at_end && CURSOR < total)); then
      last=$((miss - 2))
    fi
    for ((k = first; k <= last; k++)); do
      pass "README:${SEG_NO[k]} $label: ${SEG_TXT[k]:0:100}"
    done
    if ((miss == n)); then
      if ((at_end && CURSOR < total)); then
        fail "README:${SEG_NO[n - 1]} $label: README ends with
    ${SEG_TXT[n - 1]}
  but after it the server printed
    ${REAL[CURSOR]}"
      fi
      break
    fi
    if ((best_len > 0 || at_start)); then
      fail "README:${SEG_NO[miss]} $label: README shows
    ${SEG_TXT[miss]}
  but there the server printed
    ${REAL[CURSOR]:-(nothing more)}"
    else
      fail "README:${SEG_NO[miss]} $label: the server did not print (normalised)
    ${SEG_TXT[miss]}"
    fi
    first=$((miss + 1))
    at_start=0
  done
}

# The `make run` lines: echoed by the Makefile's run recipe.
mapfile -t make_echoes < <(awk '/^run:/ { f = 1; next } f && !/^\t/ { f = 0 } f' "$makefile" 2>/dev/null |
  grep -oE 'echo "[^"]*"' | sed -E 's/^echo "//; s/"$//')
check_make_line() { # LINENO TEXT
  local echo_text pat found=""
  for echo_text in "${make_echoes[@]}"; do
    pat=$(printf '%s' "$echo_text" | sed -E -e 's/[^A-Za-z0-9 $]/\\&/g' -e 's/\$\$?[A-Za-z_]+/*/g')
    # shellcheck disable=SC2053
    [[ $2 == $pat ]] && found=$echo_text
  done
  if [ -z "$found" ]; then
    fail "README:$1 make run prints no such line (Makefile's run recipe echoes: ${make_echoes[*]:-nothing}): $2"
  elif [[ $2 =~ exited\ with\ status\ ([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" != "$walk_status" ]; then
    fail "README:$1 the server exited with status $walk_status: $2"
  else
    pass "README:$1 make run: $2"
  fi
}

# check_output LABEL REAL-FILE KIND...: every README block of these kinds, in
# README order, as one output.
check_output() {
  local label=$1 real_file=$2 file kind no text line pat chunk started=0 at_start=1
  shift 2
  local make_lines=()
  mapfile -t REAL < <(normalise <"$real_file" | grep -v '^$' | grep -v '^:')
  CURSOR=0
  SEG_PAT=()
  SEG_NO=()
  SEG_TXT=()
  for file in "$tmp"/readme/[0-9]*; do
    kind=${file##*/[0-9][0-9]-}
    [[ " $* " == *" $kind "* ]] || continue
    while IFS=$'\t' read -r no text; do
      [ -z "$text" ] && continue
      if [ "$kind" = stderr ]; then
        [[ $text == '$ '* ]] && continue
        # Before the server's first line: make's (the build, its banner).
        if ((!started)) && [[ $text == ...* ]]; then continue; fi
        line=$(normalise <<<"$text")
        if [[ $line != "<time> "* && $text != ...* ]]; then
          make_lines+=("$no"$'\t'"$text")
          continue
        fi
      fi
      if [[ $text == ...* ]]; then
        if ((${#SEG_PAT[@]})); then
          check_run "$label" "$at_start" 0
          SEG_PAT=()
          SEG_NO=()
          SEG_TXT=()
        fi
        at_start=0
        started=1
        continue
      fi
      started=1
      line=$(normalise <<<"$text")
      pat=$(pattern_of "$line")
      if [ "$kind" = sse-at-signal ] && [[ $line =~ ^data:\ \{\"content\":\"([^\"]*)\",\"type\":\"chat\", ]]; then
        chunk=${BASH_REMATCH[1]}
        if grep -qxF -- "$chunk" "$tmp/story-chunks.txt"; then
          pass "README:$no the story has the chunk \"$chunk\""
        else
          fail "README:$no the story has no chunk \"$chunk\""
        fi
        pat=$(pattern_of "$(sed -E 's/^(data: \{"content":")[^"]*(",)/\1...\2/' <<<"$line")")
      fi
      SEG_PAT+=("$pat")
      SEG_NO+=("$no")
      SEG_TXT+=("$line")
    done <"$file"
  done
  # The last run ends with the output unless the README ends with `...`.
  if ((${#SEG_PAT[@]})); then
    check_run "$label" "$at_start" 1
  fi
  local entry
  for entry in "${make_lines[@]}"; do check_make_line "${entry%%$'\t'*}" "${entry#*$'\t'}"; done
}

check_output stderr "$tmp/walk.err" stderr
check_output sse "$tmp/sse.txt" sse sse-at-signal
check_output health "$tmp/health.json" health
check_output chat-json "$tmp/chat.json" chat-json

# The story's size, as the walkthrough tells it.
if [[ $(readme_flat) =~ answers\ with\ ([0-9,]+)\ words\ in\ ([0-9,]+)\ chunks\ sent\ ([0-9]+)\ ms\ apart,\ about\ ([0-9.]+)\ s ]]; then
  words=${BASH_REMATCH[1]//,/}
  chunks=${BASH_REMATCH[2]//,/}
  interval=${BASH_REMATCH[3]}
  seconds=${BASH_REMATCH[4]}
  expected_seconds=$(awk -v c="$story_chunks" -v i="$interval" 'BEGIN { printf "%.1f", (c - 1) * i / 1000 }')
  if [ "$words" = "$story_words" ] && [ "$chunks" = "$story_chunks" ] && [ "$seconds" = "$expected_seconds" ]; then
    pass "the story: $words words in $chunks chunks, about $seconds s"
  else
    fail "the story: README says $words words in $chunks chunks, about $seconds s; the server sends $story_words words in $story_chunks chunks (about $expected_seconds s at $interval ms)"
  fi
else
  fail "README.md no longer says how long the story is (\"answers with N words in M chunks sent I ms apart, about S s\")"
fi

if [[ $(readme_flat) =~ curl\ prints\ its\ last\ events\ and\ exits\ ([0-9]+) ]]; then
  if [ "${BASH_REMATCH[1]}" = "$curl_status" ]; then
    pass "curl exits $curl_status"
  else
    fail "curl exited $curl_status, README says ${BASH_REMATCH[1]} ($(head -c 200 "$tmp/curl.err"))"
  fi
fi

# The shutdown error event wherever README.md shows it whole (without dialog_id).
real_error=$(grep -m 1 '"type":"error"' "$tmp/sse.txt" | sed -E 's/^data: //; s/,"dialog_id":"[^"]*"//')
while IFS=: read -r no item; do
  item=${item:1:${#item}-2}
  if [ "$item" = "$real_error" ]; then
    pass "README:$no the shutdown error event: $item"
  else
    fail "README:$no README shows the shutdown error event as $item; the server sends $real_error"
  fi
done < <(grep -noE '`\{[^`]*"type":"error"[^`]*\}`' "$readme" | grep -F 'shutting down' | grep -vF '...')

if [ "$failed" -ne 0 ]; then
  echo "--- the walkthrough's server's stderr (normalised)"
  normalise <"$tmp/walk.err" | sed 's/^/  | /'
  echo "--- curl's output (normalised; the first and last 4 events)"
  normalise <"$tmp/sse.txt" | grep -v '^$' | head -n 4 | sed 's/^/  | /'
  echo "  | ..."
  normalise <"$tmp/sse.txt" | grep -v '^$' | tail -n 4 | sed 's/^/  | /'
fi
finish
