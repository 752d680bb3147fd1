#!/usr/bin/env bash
# bench/run.sh - agentsmithy's benchmark: builds the load client and the
# baseline (a bare cpp-httplib server that calls Server::stop() on SIGTERM),
# runs the scenarios of issue 3 against build/agentsmithy-server and the
# baseline, and prints one table (scenario, N, metric, agentsmithy, baseline,
# target).
#
#   bash bench/run.sh                 # full run, under 5 minutes on 2 cores
#   BENCH_QUICK=1 bash bench/run.sh   # N = 100 and 1,000 only, smaller throughput
#
# Environment: BENCH_QUICK=1; BENCH_WAIT_IDLE=S (before each scenario, wait up
# to S seconds for other work on the machine to fall under 10% of the CPUs);
# BENCH_OUT=DIR (default build/bench: binaries,
# raw key=value results, server logs, per-client CSVs, table.md);
# AGENTSMITHY_SERVER=PATH (default build/agentsmithy-server).
#
# Every scenario is bounded twice: by the load client's own timeouts (it
# SIGKILLs a server that outlives them, and the server dies with it through
# PR_SET_PDEATHSIG) and by `timeout` around the load client.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/build/bench}
QUICK=${BENCH_QUICK:-0}
SERVER=${AGENTSMITHY_SERVER:-$ROOT/build/agentsmithy-server}
CXX=${CXX:-g++}
CXXFLAGS=(-std=c++17 -O2 -Wall -Wextra -Wpedantic)

mkdir -p "$OUT"
rm -f "$OUT"/s[1-4]-*.txt
LC=$OUT/loadclient
BASE=$OUT/baseline

# --- build ------------------------------------------------------------------
if ! pkg-config --exists cpp-httplib 2>/dev/null; then
  make -C "$ROOT" deps >&2
fi
if [[ ! -x $LC || $ROOT/bench/loadclient.cpp -nt $LC ]]; then
  echo "bench: building loadclient" >&2
  "$CXX" "${CXXFLAGS[@]}" -o "$LC" "$ROOT/bench/loadclient.cpp"
fi
if [[ ! -x $BASE || $ROOT/bench/baseline.cpp -nt $BASE ]]; then
  echo "bench: building baseline" >&2
  read -ra HTTPLIB <<<"$(pkg-config --cflags --libs cpp-httplib)"
  "$CXX" "${CXXFLAGS[@]}" -o "$BASE" "$ROOT/bench/baseline.cpp" "${HTTPLIB[@]}" -pthread
fi
if [[ ! -x $SERVER ]]; then
  echo "bench: building $SERVER" >&2
  make -C "$ROOT" build/agentsmithy-server >&2
fi

# A snapshot of the server binary: others may rebuild build/ during the run,
# and every scenario must run the same build.
SERVER_SRC=$SERVER
SERVER_INFO="$SERVER_SRC ($(date -u -r "$SERVER_SRC" '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$SERVER_SRC" | cut -c1-12)), tree at $(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo 'no commit')$(if git -C "$ROOT" status --porcelain -- agentsmithy.hpp examples 2>/dev/null | grep -q .; then echo ', with uncommitted changes in agentsmithy.hpp or examples/'; fi)"
cp "$SERVER_SRC" "$OUT/agentsmithy-server.snapshot"
SERVER=$OUT/agentsmithy-server.snapshot

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-bench.XXXXXX")
trap 'rm -rf "$WORKDIR"' EXIT

# --- a shared machine -----------------------------------------------------------
# Builds and tests of other sessions may run beside the benchmark. busy_pct
# tells how busy the CPUs are; with BENCH_WAIT_IDLE=S each scenario first waits
# up to S seconds for them to be under 10% busy.
busy_pct() {  # percent of all CPU time not idle over one second
  local a b
  a=$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    t = y[1] - x[1]; i = y[2] - x[2]; printf "%.0f", (t > 0 ? 100 * (t - i) / t : 0) }'
}
wait_idle() {
  local limit=${BENCH_WAIT_IDLE:-0} waited=0 b
  while (( waited < limit )); do
    b=$(busy_pct)
    (( b < 10 )) && return 0
    (( waited == 0 )) && echo "bench: the CPUs are ${b}% busy with other work; waiting up to ${limit} s" >&2
    waited=$((waited + 1))
  done
}

# --- running one scenario -----------------------------------------------------
# run NAME OUTER_TIMEOUT_S SCENARIO LOADCLIENT_OPTIONS... -- SERVER_COMMAND...
# Writes $OUT/NAME.txt (key=value), $OUT/NAME.log (server), $OUT/NAME.csv.
run() {
  local name=$1 bound=$2 scenario=$3
  shift 3
  wait_idle
  echo "bench: $name" >&2
  : >"$OUT/$name.log"
  local rc=0
  timeout --kill-after=5 "$bound" "$LC" "$scenario" --server-log "$OUT/$name.log" \
    --dump "$OUT/$name.csv" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "bench: $name: load client exit status $rc (see $OUT/$name.err)" >&2
    echo "loadclient_status=$rc" >>"$OUT/$name.txt"
  fi
}

# val NAME KEY -> the value, or "-" when absent
val() {
  local f=$OUT/$1.txt v
  [[ -f $f ]] || { echo "-"; return; }
  v=$(grep -m1 "^$2=" "$f" | cut -d= -f2-) || true
  echo "${v:--}"
}

AS=("$SERVER" --workdir "$WORKDIR" --port "{PORT}")
BL=("$BASE" --workdir "$WORKDIR" --port "{PORT}")

# The agentsmithy server is connected to at 5,000 connections/s, 64 handshakes
# in flight. The baseline listens with cpp-httplib's compiled-in backlog of 5:
# it gets 500/s, 4 in flight, so that handshakes lost to its accept queue do
# not dominate what is measured of its streaming.
AS_PACE=(--connect-rate 5000 --connect-inflight 64)
BL_PACE=(--connect-rate 500 --connect-inflight 4)

if [[ $QUICK == 1 ]]; then
  S1_N="100 1000"
  TP_TOKENS=2000
else
  S1_N="100 1000 5000 10000"
  TP_TOKENS=10000
fi
S1_BASE_N="100 1000"

# Say how busy the machine was, so that a run taken beside a compiler is
# recognisable as such.
BUSY_BEFORE=$(busy_pct)
if (( BUSY_BEFORE > 10 )); then
  echo "bench: warning: the machine is ${BUSY_BEFORE}% busy before the run; figures will be low" >&2
fi

T_START=$(date +%s)

# Scenario 1: shutdown under load
for n in $S1_N; do
  run "s1-as-$n" 120 shutdown --n "$n" --interval-ms 50 --tokens 100000 \
    --ready-timeout 60 --drain-timeout 15 "${AS_PACE[@]}" -- "${AS[@]}" --max-streams "$n" --grace-period 10
done
for n in $S1_BASE_N; do
  run "s1-bl-$n" 60 shutdown --n "$n" --interval-ms 50 --tokens 100000 \
    --ready-timeout 5 --drain-timeout 10 "${BL_PACE[@]}" -- "${BL[@]}"
done

# Scenario 2: idle keep-alive connections at shutdown
run s2-as 60 idle --n 100 --ready-timeout 10 --drain-timeout 10 "${AS_PACE[@]}" -- "${AS[@]}"
run s2-bl 60 idle --n 100 --ready-timeout 2 --drain-timeout 10 "${BL_PACE[@]}" -- "${BL[@]}"

# Scenario 3: throughput
run s3-as 120 throughput --n 100 --tokens "$TP_TOKENS" --interval-ms 0 \
  --run-timeout 60 --drain-timeout 10 "${AS_PACE[@]}" -- "${AS[@]}"
run s3-bl 90 throughput --n 100 --tokens "$TP_TOKENS" --interval-ms 0 \
  --run-timeout 30 --drain-timeout 10 "${BL_PACE[@]}" -- "${BL[@]}"

# Scenario 4: capacity
run s4-as 90 capacity --n 1100 --interval-ms 50 --tokens 100000 \
  --ready-timeout 30 --drain-timeout 15 "${AS_PACE[@]}" -- "${AS[@]}" --max-streams 1000 --grace-period 10

T_END=$(date +%s)
BUSY_AFTER=$(busy_pct)

# --- the table ----------------------------------------------------------------
# Float comparison: ok A OP B -> exit 0 when A OP B holds.
ok() { awk -v a="$1" -v b="$3" -v op="$2" 'BEGIN {
  if (a == "-" || a == "") exit 1
  if (op == "<=") exit !(a + 0 <= b + 0); if (op == ">=") exit !(a + 0 >= b + 0)
  if (op == "==") exit !(a + 0 == b + 0); exit 1 }'; }
# mark VALUE CONDITION_HELD -> VALUE, with " (miss)" when the target is missed
mark() { if [[ $2 == yes ]]; then echo "$1"; else echo "$1 (miss)"; fi; }
held() { if "$@"; then echo yes; else echo no; fi; }

pct() {  # name -> "99.9% (n/N)"
  local c n
  c=$(val "$1" complete); n=$(val "$1" n)
  [[ $c == - ]] && { echo "-"; return; }
  echo "$(val "$1" complete_pct)% ($c/$n)"
}
exit_ms() {  # name -> exit time, or what happened instead
  local e
  e=$(val "$1" exit_ms)
  if [[ $(val "$1" server_killed) == 1 ]]; then echo "no exit: killed"; else echo "$e"; fi
}
per_stream() { echo "$(val "$1" exit_per_stream_us) / $(val "$1" drain_cpu_per_stream_us)"; }
rss_thr() { echo "$(val "$1" peak_rss_mib) / $(val "$1" peak_threads)"; }
done_times() { echo "$(val "$1" done_p50_ms) / $(val "$1" done_p99_ms) / $(val "$1" done_max_ms)"; }
t503() { echo "$(val "$1" t503_p50_ms) / $(val "$1" t503_p99_ms) / $(val "$1" t503_max_ms)"; }

rows=()
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

for n in $S1_N; do
  a=s1-as-$n b=s1-bl-$n
  [[ " $S1_BASE_N " == *" $n "* ]] || b=none
  nb() { if [[ $b == none ]]; then echo "not run"; else "$@"; fi; }
  t_held="" t_pct="100%" t_done="" t_exit="" t_rss=""
  c_held=yes c_pct=yes c_done=yes c_exit=yes c_rss=yes
  c_pct=$(held ok "$(val "$a" complete_pct)" == 100)
  if [[ $n == 1000 ]]; then
    t_done="max <= 50"; c_done=$(held ok "$(val "$a" done_max_ms)" "<=" 50)
    t_exit="<= 250"; c_exit=$(held ok "$(val "$a" exit_ms)" "<=" 250)
  fi
  if [[ $n == 10000 ]]; then
    t_held="10000"; c_held=$(held ok "$(val "$a" held)" == 10000)
    t_done="max <= 1000"; c_done=$(held ok "$(val "$a" done_max_ms)" "<=" 1000)
    t_rss="<= 1024"; c_rss=$(held ok "$(val "$a" peak_rss_mib)" "<=" 1024)
  fi
  row "1 shutdown under load" "$n" "streams held at the signal" "$(mark "$(val "$a" held)" "$c_held")" "$(nb val "$b" held)" "$t_held"
  row "" "" "got error, done, final chunk" "$(mark "$(pct "$a")" "$c_pct")" "$(nb pct "$b")" "$t_pct"
  row "" "" "signal to done p50 / p99 / max (ms)" "$(mark "$(done_times "$a")" "$c_done")" "$(nb done_times "$b")" "$t_done"
  row "" "" "signal to process exit (ms)" "$(mark "$(exit_ms "$a")" "$c_exit")" "$(nb exit_ms "$b")" "$t_exit"
  row "" "" "peak RSS (MiB) / peak threads" "$(mark "$(rss_thr "$a")" "$c_rss")" "$(nb rss_thr "$b")" "$t_rss"
  row "" "" "shutdown per stream: wall / server CPU (us)" "$(per_stream "$a")" "$(nb per_stream "$b")" "grows at most linearly"
  row "" "" "ramp-up to all streaming (s)" "$(val "$a" ramp_s)" "$(nb val "$b" ramp_s)" ""
done

row "2 idle keep-alive" "100" "/health answered, idle at the signal" "$(val s2-as idle_open_at_signal)" "$(val s2-bl idle_open_at_signal)" ""
row "" "" "signal to process exit (ms)" "$(mark "$(exit_ms s2-as)" "$(held ok "$(val s2-as exit_ms)" "<=" 100)")" "$(exit_ms s2-bl)" "<= 100"

row "3 throughput" "100 x $TP_TOKENS" "events/s" "$(mark "$(val s3-as events_per_s)" "$(held ok "$(val s3-as events_per_s)" ">=" 200000)")" "$(val s3-bl events_per_s)" ">= 200000"
row "" "" "MB/s" "$(val s3-as mb_per_s)" "$(val s3-bl mb_per_s)" ""
row "" "" "server CPU s per million events" "$(val s3-as cpu_s_per_million_events)" "$(val s3-bl cpu_s_per_million_events)" ""
row "" "" "streams complete / seconds" "$(val s3-as streams_complete) / $(val s3-as seconds)" "$(val s3-bl streams_complete) / $(val s3-bl seconds)" ""

c4=$(held ok "$(val s4-as status_503)" == 100)
row "4 capacity (max 1000)" "1100" "streaming / 503 (with Retry-After)" "$(mark "$(val s4-as streaming) / $(val s4-as status_503) ($(val s4-as status_503_retry_after))" "$c4")" "not run" "1000 / 100"
row "" "" "time to 503 p50 / p99 / max (ms)" "$(mark "$(t503 s4-as)" "$(held ok "$(val s4-as t503_p99_ms)" "<=" 100)")" "not run" "p99 <= 100"
row "" "" "streams complete at the shutdown" "$(val s4-as streams_complete_at_shutdown)" "not run" ""

{
  echo "agentsmithy benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $((T_END - T_START)) s$([[ $QUICK == 1 ]] && echo ", BENCH_QUICK=1")"
  echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r); CPU busy with other work: ${BUSY_BEFORE}% before the run, ${BUSY_AFTER}% after"
  echo "server: $SERVER_INFO"
  echo "baseline: bench/baseline.cpp on cpp-httplib $(pkg-config --modversion cpp-httplib), Server::stop() on SIGTERM"
  echo
  echo "| scenario | N | metric | agentsmithy | baseline | target |"
  echo "|---|---:|---|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
  echo
  noisy=""
  for f in "$OUT"/s[1-4]-*.txt; do
    o=$(val "$(basename "$f" .txt)" other_busy_pct)
    [[ $o != - ]] && (( o > 10 )) && noisy+=" $(basename "$f" .txt) ${o}%,"
  done
  [[ -n $noisy ]] && echo "Other processes took a share of the CPUs during:${noisy%,} (figures there are pessimistic)."
  echo "Times from the signal, as the load client saw them. (miss): target missed."
  echo "Raw results: $OUT/*.txt; per-client CSVs: $OUT/*.csv; server logs: $OUT/*.log."
} | tee "$OUT/table.md"
