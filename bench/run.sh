#!/usr/bin/env bash
# bench/run.sh - agentsmithy's benchmark, side by side with a Go net/http peer.
#
# Builds the load client (bench/loadclient.cpp), the Go peer (bench/goserver,
# Debian's golang-go, standard library only), the on_cancel bench server
# (bench/cancelbench.cpp) and the fast OpenAI-compatible upstream
# (bench/upstream.cpp), runs every scenario of issues 3 and 8 against
# build/agentsmithy-server and the Go peer in the same run, BENCH_RUNS times
# each (agentsmithy and Go alternating), the upstream scenario of issue 9
# (agentsmithy alone: the Go peer has no upstream client) BENCH_RUNS times,
# and the rolling restart behind nginx of issue 11 (tests/ops/rolling.sh)
# once, and prints one table: the median of each figure for both, their
# ratio, and the target.
#
#   bash bench/run.sh                 # the full run (about 13 minutes on 2 idle cores)
#   BENCH_QUICK=1 bash bench/run.sh   # smaller N, one run each (about two minutes)
#   BENCH_ONLY=upstream bash bench/run.sh   # one group (here issue 9's upstream)
#
# Environment:
#   BENCH_RUNS=R        runs of every scenario (default 3; BENCH_QUICK: 1); the
#                       rolling restart runs once whatever R is
#   BENCH_QUICK=1       N = 100 and 1,000 only, 2,000 chunks per throughput
#                       stream, 200 rolling-restart clients
#   BENCH_ONLY=LIST     only these scenario groups (space separated):
#                       handler thread idle throughput capacity cancel
#                       upstream store rolling
#   BENCH_HANDLER_N="N.." streams of the handler scenarios (default
#                       "1000 5000 10000"; BENCH_QUICK: "100 1000")
#   BENCH_UPSTREAM_N=N  streams of the upstream scenario (default 1000)
#   BENCH_ROLLING_CLIENTS=N  clients of the rolling restart (default 1000;
#                       BENCH_QUICK: 200)
#   BENCH_WAIT_IDLE=S   before each run, wait up to S s for other work on the
#                       machine to fall under 10% of the CPUs
#   BENCH_GENERATOR=G   --generator of agentsmithy-server for the handler
#                       scenarios (default handler)
#   BENCH_OUT=DIR       default build/bench: binaries, raw key=value results
#                       (NAME.rK.txt), server logs, per-client CSVs, table.md
#   AGENTSMITHY_SERVER=PATH   default build/agentsmithy-server
#   BENCH_REF_COMMIT=C  the reference for "no regression" of threaded
#                       generators: examples/server.cpp and agentsmithy.hpp of
#                       commit C (default bac1cfc, the run in bench/RESULTS.md),
#                       built once into $OUT and run beside the current server
#                       (--generator thread in both); empty: no reference runs
#   SKIP_DEPS=1         do not install golang-go when `go` is missing (nor
#                       nginx: tests/ops/rolling.sh installs it otherwise)
#
# Every run is bounded twice: by the load client's own timeouts (it SIGKILLs
# a server that outlives them, and the server dies with it through
# PR_SET_PDEATHSIG) and by `timeout` around the load client.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/build/bench}
QUICK=${BENCH_QUICK:-0}
RUNS=${BENCH_RUNS:-$([[ $QUICK == 1 ]] && echo 1 || echo 3)}
ONLY=${BENCH_ONLY:-handler thread idle throughput capacity cancel upstream store rolling}
GEN=${BENCH_GENERATOR:-handler}
SERVER=${AGENTSMITHY_SERVER:-$ROOT/build/agentsmithy-server}
CXX=${CXX:-g++}
CXXFLAGS=(-std=c++17 -O2 -Wall -Wextra -Wpedantic)

mkdir -p "$OUT"
rm -f "$OUT"/*.r[0-9]*.txt "$OUT"/*.r[0-9]*.err "$OUT"/*.r[0-9]*.stamps
LC=$OUT/loadclient
GOPEER=$OUT/goserver
CB=$OUT/cancelbench
UPB=$OUT/upstream
SB=$OUT/storebench
want() { [[ " $ONLY " == *" $1 "* ]]; }
# The Go peer serves the scenarios of issues 3 and 8 only.
NEED_GO=0
for g in handler thread idle throughput capacity cancel; do want "$g" && NEED_GO=1; done

# --- build ------------------------------------------------------------------
if ! pkg-config --exists cpp-httplib libcurl 2>/dev/null; then
  make -C "$ROOT" deps >&2
fi
if ((NEED_GO)) && ! command -v go >/dev/null 2>&1; then
  if [[ -n ${SKIP_DEPS:-} ]]; then
    echo "bench: go is missing (SKIP_DEPS is set; apt-get install golang-go)" >&2
    exit 1
  fi
  echo "bench: installing golang-go" >&2
  sudo=; [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends golang-go >&2
fi
if [[ ! -x $LC || $ROOT/bench/loadclient.cpp -nt $LC ]]; then
  echo "bench: building loadclient" >&2
  "$CXX" "${CXXFLAGS[@]}" -o "$LC" "$ROOT/bench/loadclient.cpp"
fi
if want upstream && [[ ! -x $UPB || $ROOT/bench/upstream.cpp -nt $UPB ]]; then
  echo "bench: building upstream" >&2
  "$CXX" "${CXXFLAGS[@]}" -o "$UPB" "$ROOT/bench/upstream.cpp"
fi
if ((NEED_GO)) && [[ ! -x $GOPEER || -n $(find "$ROOT/bench/goserver" -newer "$GOPEER" -type f 2>/dev/null) ]]; then
  echo "bench: building goserver ($(go version))" >&2
  # Standard library only: no module download, no proxy, a private cache.
  (cd "$ROOT/bench/goserver" &&
    GOFLAGS='' GOPROXY=off GOSUMDB=off GOPATH=$OUT/gopath GOCACHE=$OUT/gocache CGO_ENABLED=0 \
      go build -trimpath -o "$GOPEER" .)
fi
read -ra HTTPLIB <<<"$(pkg-config --cflags --libs cpp-httplib libcurl)"
# What a program that includes agentsmithy.hpp compiles and links with: the
# Makefile's own flags, read from make itself (COMPILE's preprocessor flags,
# without its compiler, standard, optimisation and warning flags; LINK, the
# server's libraries: cpp-httplib, libcurl, -pthread, whatever the header
# needs next); pkg-config's cpp-httplib flags as a fallback.
make_var() {  # EXPR -> make's expansion of EXPR
  make -s --no-print-directory -C "$ROOT" --eval "bench-print-var: ; @echo $1" bench-print-var 2>/dev/null
}
HDR_CFLAGS=() HDR_LIBS=()
if want cancel || want store; then
  if hdr_libs=$(make_var '$(LINK)') && [[ -n ${hdr_libs// /} ]]; then
    read -ra HDR_CFLAGS <<<"$(make_var '$(filter-out $(CXX) $(STD) $(CXXFLAGS) $(WARNINGS) -I. -MMD -MP,$(COMPILE))')"
    read -ra HDR_LIBS <<<"$hdr_libs"
  else
    HDR_LIBS=("${HTTPLIB[@]}" -pthread)
  fi
fi
if want cancel &&
  [[ ! -x $CB || $ROOT/bench/cancelbench.cpp -nt $CB || $ROOT/agentsmithy.hpp -nt $CB ]]; then
  echo "bench: building cancelbench" >&2
  # Against the working tree's header; when that does not build (an edit in
  # progress), against the committed one.
  if ! "$CXX" "${CXXFLAGS[@]}" "${HDR_CFLAGS[@]}" -I"$ROOT" -o "$CB" "$ROOT/bench/cancelbench.cpp" \
    "${HDR_LIBS[@]}" 2>"$OUT/cancelbench.build.log"; then
    hdr=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-hdr.XXXXXX")
    if git -C "$ROOT" show HEAD:agentsmithy.hpp >"$hdr/agentsmithy.hpp" 2>/dev/null &&
      "$CXX" "${CXXFLAGS[@]}" "${HDR_CFLAGS[@]}" -I"$hdr" -o "$CB" "$ROOT/bench/cancelbench.cpp" \
        "${HDR_LIBS[@]}" 2>>"$OUT/cancelbench.build.log"; then
      echo "bench: cancelbench built against the committed agentsmithy.hpp (the working tree's does not build)" >&2
      echo "HEAD" >"$CB.header"
    else
      echo "bench: warning: cancelbench does not build (see $OUT/cancelbench.build.log); the on_cancel scenario is skipped" >&2
      rm -f "$CB"
      ONLY=${ONLY//cancel/}
    fi
    rm -rf "$hdr"
  else
    echo "working tree" >"$CB.header"
  fi
fi
if want store && [[ ! -x $SB || $ROOT/bench/storebench.cpp -nt $SB || $ROOT/agentsmithy.hpp -nt $SB ]]; then
  echo "bench: building storebench" >&2
  "$CXX" "${CXXFLAGS[@]}" "${HDR_CFLAGS[@]}" -I"$ROOT" -o "$SB" "$ROOT/bench/storebench.cpp" "${HDR_LIBS[@]}"
fi
if [[ ! -x $SERVER ]]; then
  echo "bench: building $SERVER" >&2
  make -C "$ROOT" build/agentsmithy-server >&2
fi
# The reference server of the threaded-generator scenario, from git.
REF_COMMIT=${BENCH_REF_COMMIT-bac1cfc}
REF=""
if [[ -n $REF_COMMIT && " $ONLY " == *" thread "* ]]; then
  ref_sha=$(git -C "$ROOT" rev-parse --short=12 "$REF_COMMIT^{commit}" 2>/dev/null) || ref_sha=""
  if [[ -z $ref_sha ]]; then
    echo "bench: warning: no commit $REF_COMMIT; the threaded scenario runs without a reference" >&2
  else
    REF=$OUT/agentsmithy-server.ref-$ref_sha
    if [[ ! -x $REF ]]; then
      echo "bench: building the reference server of $REF_COMMIT ($ref_sha)" >&2
      ref_src=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-ref.XXXXXX")
      git -C "$ROOT" archive "$ref_sha" agentsmithy.hpp examples/server.cpp | tar -x -C "$ref_src"
      "$CXX" -std=c++17 -O2 -I"$ref_src" -o "$REF.tmp" "$ref_src/examples/server.cpp" "${HTTPLIB[@]}" -pthread
      mv "$REF.tmp" "$REF"
      rm -rf "$ref_src"
    fi
  fi
fi

# A snapshot of the server binary: others may rebuild build/ during the run,
# and every scenario must run the same build.
SERVER_SRC=$SERVER
SERVER_INFO="$SERVER_SRC ($(date -u -r "$SERVER_SRC" '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$SERVER_SRC" | cut -c1-12)), tree at $(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo 'no commit')$(if git -C "$ROOT" status --porcelain -- agentsmithy.hpp examples 2>/dev/null | grep -q .; then echo ', with uncommitted changes in agentsmithy.hpp or examples/'; fi)"
cp "$SERVER_SRC" "$OUT/agentsmithy-server.snapshot"
SERVER=$OUT/agentsmithy-server.snapshot

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-bench.XXXXXX")
UP_PID=""  # the upstream of the run in progress, stopped by its id on exit
trap '[[ -n $UP_PID ]] && kill "$UP_PID" 2>/dev/null; rm -rf "$WORKDIR"' EXIT

# --- a shared machine -----------------------------------------------------------
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
  while ((waited < limit)); do
    b=$(busy_pct)
    ((b < 10)) && return 0
    ((waited == 0)) && echo "bench: the CPUs are ${b}% busy with other work; waiting up to ${limit} s" >&2
    waited=$((waited + 1))
  done
}

# --- running one scenario -----------------------------------------------------
# run NAME OUTER_TIMEOUT_S SCENARIO LOADCLIENT_OPTIONS... -- SERVER_COMMAND...
# Writes $OUT/NAME.r$RUN.txt (key=value), $OUT/NAME.log (server, all runs),
# $OUT/NAME.csv (the last run's clients).
RUN=1
run() {
  local name=$1 bound=$2 scenario=$3
  shift 3
  wait_idle
  echo "bench: run $RUN/$RUNS: $name" >&2
  local rc=0 txt=$OUT/$name.r$RUN.txt
  rm -rf "$WORKDIR/.agentsmithy"  # each run starts with an empty default store
  echo "=== run $RUN" >>"$OUT/$name.log"
  timeout --kill-after=5 "$bound" "$LC" "$scenario" --server-log "$OUT/$name.log" \
    --dump "$OUT/$name.csv" "$@" >"$txt" 2>"$OUT/$name.r$RUN.err" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "bench: $name: load client exit status $rc (see $OUT/$name.r$RUN.err)" >&2
    echo "loadclient_status=$rc" >>"$txt"
  fi
}

# The agentsmithy server and the Go peer take the same command line.
AS=("$SERVER" --workdir "$WORKDIR" --port "{PORT}")
GO=("$GOPEER" --workdir "$WORKDIR" --port "{PORT}")
CBS=("$CB" --workdir "$WORKDIR" --port "{PORT}")
# Up to 256 connection attempts (connect() to the status line) in flight, at
# up to 20,000 new connections per second: the burst that issue 8 asks the
# server to absorb without growing its thread count.
PACE=(--connect-rate 20000 --connect-inflight 256 --inflight 256)

if [[ $QUICK == 1 ]]; then
  H_N="100 1000"
  T_N="1000"
  TP_TOKENS=2000
  CANCEL_N=200
else
  H_N="1000 5000 10000"
  T_N="1000 3000"
  TP_TOKENS=10000
  CANCEL_N=1000
fi
H_N=${BENCH_HANDLER_N:-$H_N}
S_N=$([[ $QUICK == 1 ]] && echo "1000" || echo "1000 10000")
UP_N=${BENCH_UPSTREAM_N:-1000}
ROLL_N=${BENCH_ROLLING_CLIENTS:-$([[ $QUICK == 1 ]] && echo 200 || echo 1000)}

shutdown_run() {  # NAME N -- SERVER...
  local name=$1 n=$2
  shift 3
  run "$name" 150 shutdown --n "$n" --interval-ms 50 --tokens 100000 \
    --ready-timeout 60 --drain-timeout 15 "${PACE[@]}" -- "$@" --max-streams "$n" --grace-period 10
}

# upstream_run N: issue 9. Starts bench/upstream (one epoll thread, a token
# every 20 ms per stream) on a free port, runs the shutdown scenario against
# agentsmithy-server --upstream pointing at it, then stops it with SIGTERM
# (it writes one stamp line per connection and exits) and adds the upstream's
# view to the run's results: when it saw each stream's connection closed,
# from the load client's SIGTERM to the server (signal_mono_ns; both stamp
# CLOCK_MONOTONIC, one clock for every process on the machine).
upstream_run() {
  local n=$1 name=up-as-$1 stamps=$OUT/up-as-$1.r$RUN.stamps line="" port="" pid
  rm -f "$stamps" "$WORKDIR/up-deltas"
  # The upstream's stdout is a pipe: its first line is "port=P". `timeout`
  # bounds it if this script dies before stopping it.
  coproc UPC { exec timeout --kill-after=5 600 "$UPB" --interval-ms 20 --stamps "$stamps" 2>>"$OUT/$name.upstream.log"; }
  pid=${UPC_PID:-} UP_PID=${UPC_PID:-}
  if [[ -n ${UPC[0]:-} ]]; then read -r -t 10 -u "${UPC[0]}" line || true; fi
  port=${line#port=}
  if [[ ! $port =~ ^[0-9]+$ ]]; then
    echo "bench: $name: the upstream did not print its port (see $OUT/$name.upstream.log)" >&2
    if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    UP_PID=""
    echo "upstream_error=no port" >"$OUT/$name.r$RUN.txt"
    return
  fi
  run "$name" 150 shutdown --n "$n" --interval-ms 20 --tokens 100000 \
    --ready-timeout 60 --drain-timeout 15 "${PACE[@]}" -- \
    "${AS[@]}" --upstream "http://127.0.0.1:$port/v1" --max-streams 1200 --grace-period 10
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true  # bounded by the timeout around it
  UP_PID=""
  local txt=$OUT/$name.r$RUN.txt sig got
  sig=$(grep -m1 '^signal_mono_ns=' "$txt" | cut -d= -f2) || true
  got=$(grep -m1 '^chat_at_signal=' "$txt" | cut -d= -f2) || true
  if [[ ! $sig =~ ^[0-9]+$ || ! -s $stamps ]]; then
    echo "upstream_error=$([[ -s $stamps ]] && echo 'no signal time' || echo 'no stamp file')" >>"$txt"
    return
  fi
  # Per stream (a connection whose request arrived): closed after the
  # signal (ms from it), before it, or never seen closed. The pace: the chat
  # events the clients had received by the signal over the tokens the
  # upstream had due by then, one per 20 ms from the request's arrival, over
  # the streams still open at the signal.
  awk -v sig="$sig" -v got="${got:-0}" -v deltas="$WORKDIR/up-deltas" '
    /^# upstream / { for (i = 3; i <= NF; i++) if ($i ~ /^sched=/) sched = substr($i, 7) }
    !/^#/ && $3 > 0 {
      streams++; chunks += $6
      if ($7 / 1000 > late) late = $7 / 1000
      if ($4 == 0 || $4 >= sig) due += int((sig - $3) / 20e6)
      if ($4 == 0) open++
      else if ($4 < sig) before++
      else { d = ($4 - sig) / 1e6; print d > deltas; after++; if (d <= 100) within++ }
    }
    END {
      printf "up_sched=%s\nup_late_max_ms=%.2f\n", (sched == "" ? "-" : sched), late
      printf "up_streams=%d\nup_chunks=%d\nup_tokens_due_at_signal=%d\n", streams, chunks, due
      if (due > 0) printf "up_pace_pct=%.1f\n", 100 * got / due; else print "up_pace_pct=-"
      printf "up_closed_after_signal=%d\nup_closed_within_100ms=%d\n", after, within
      printf "up_closed_before_signal=%d\nup_never_closed=%d\n", before, open
    }' "$stamps" >>"$txt"
  sort -g "$WORKDIR/up-deltas" | awk '
    { v[NR] = $1 }
    function pct(p,  r) { r = int(p * NR); if (r < p * NR) r++; if (r < 1) r = 1; return v[r] }
    END {
      if (NR == 0) { print "up_close_p50_ms=-\nup_close_p99_ms=-\nup_close_max_ms=-"; exit }
      printf "up_close_p50_ms=%.2f\nup_close_p99_ms=%.2f\nup_close_max_ms=%.2f\n", pct(0.5), pct(0.99), v[NR]
    }' >>"$txt"
}

# store_count NAME: what the run of NAME left in the example server's default
# store (SQLite, $WORKDIR/.agentsmithy/agentsmithy.sqlite3), added to its
# results: every turn, its outcome, every chat event, to compare with what
# the clients received.
store_count() {
  local txt=$OUT/$1.r$RUN.txt file=$WORKDIR/.agentsmithy/agentsmithy.sqlite3
  if [[ -x $SB && -f $file ]]; then
    "$SB" count "$file" >>"$txt" 2>>"$OUT/$1.r$RUN.err" || echo "store_count_error=1" >>"$txt"
  fi
}

# rolling_run: issue 11, once. tests/ops/rolling.sh CLIENTS (two instances of
# the server snapshot behind Debian's nginx, restarted one after the other
# under continuous streaming; it installs nginx when missing), bounded by
# `timeout`; its rolling_client summary line becomes $OUT/rolling.r1.txt.
rolling_run() {
  local txt=$OUT/rolling.r1.txt log=$OUT/rolling.log rc=0 line kv
  wait_idle
  echo "bench: rolling restart behind nginx, $ROLL_N clients (once)" >&2
  AGENTSMITHY_SERVER=$SERVER ROLLING_CLIENT=$OUT/rolling_client \
    timeout --foreground -k 10 "${BENCH_ROLLING_TIMEOUT:-400}" \
    bash "$ROOT/tests/ops/rolling.sh" "$ROLL_N" >"$log" 2>&1 || rc=$?
  {
    echo "rolling_status=$rc"
    line=$(grep -m1 '^rolling_client: clients=' "$log") || true
    # "key=value" fields of the summary; "(post=P get=G)" loses its brackets.
    for kv in $(tr -d '()' <<<"${line#rolling_client: }"); do
      [[ $kv == *=* ]] && echo "$kv"
    done
    if grep -q '^rolling restart .*: PASS' "$log"; then echo "rolling_result=PASS"; else echo "rolling_result=FAIL"; fi
    echo "rolling_failures=$(grep -c '^FAIL: ' "$log" || true)"
  } >"$txt"
  if [[ $rc -ne 0 ]]; then
    echo "bench: rolling restart: exit status $rc (see $log)" >&2
  fi
}

BUSY_BEFORE=$(busy_pct)
if ((BUSY_BEFORE > 10)); then
  echo "bench: warning: the machine is ${BUSY_BEFORE}% busy before the run; figures will be low" >&2
fi
T_START=$(date +%s)

for ((RUN = 1; RUN <= RUNS; RUN++)); do
  if want handler; then  # 1: paced streams through set_stream_handler
    for n in $H_N; do
      shutdown_run "h-as-$n" "$n" -- "${AS[@]}" --generator "$GEN"
      want store && store_count "h-as-$n"
      shutdown_run "h-go-$n" "$n" -- "${GO[@]}"
    done
  fi
  if want thread; then  # 2: the same streams, one generator thread each
    for n in $T_N; do
      shutdown_run "t-as-$n" "$n" -- "${AS[@]}" --generator thread
      [[ -n $REF ]] && shutdown_run "t-ref-$n" "$n" -- "$REF" --workdir "$WORKDIR" --port "{PORT}" --generator thread
      # Go's figure at this N: the handler group's run when it has one.
      if ! want handler || [[ " $H_N " != *" $n "* ]]; then
        shutdown_run "h-go-$n" "$n" -- "${GO[@]}"
      fi
    done
  fi
  if want idle; then  # 3: idle keep-alive connections
    for s in as go; do
      [[ $s == as ]] && cmd=("${AS[@]}") || cmd=("${GO[@]}")
      run "idle-$s" 60 idle --n 100 --ready-timeout 10 --drain-timeout 10 "${PACE[@]}" -- "${cmd[@]}"
    done
  fi
  if want throughput; then  # 4: unpaced streams
    for s in as go; do
      [[ $s == as ]] && cmd=("${AS[@]}" --generator "$GEN") || cmd=("${GO[@]}")
      run "tp-$s" 120 throughput --n 100 --tokens "$TP_TOKENS" --interval-ms 0 \
        --run-timeout 60 --drain-timeout 10 "${PACE[@]}" -- "${cmd[@]}"
    done
  fi
  if want capacity; then  # 5: over max_streams
    for s in as go; do
      [[ $s == as ]] && cmd=("${AS[@]}" --generator "$GEN") || cmd=("${GO[@]}")
      run "cap-$s" 90 capacity --n 1100 --interval-ms 50 --tokens 100000 \
        --ready-timeout 30 --drain-timeout 15 "${PACE[@]}" -- "${cmd[@]}" --max-streams 1000 --grace-period 10
    done
  fi
  if want cancel; then  # 6: on_cancel latency, producers blocked in recv()
    for mode in signal disconnect; do
      for s in as go; do
        stamps=$WORKDIR/stamps-$mode-$s
        if [[ $s == as ]]; then cmd=("${CBS[@]}" --stamps "$stamps"); else cmd=("${GO[@]}" --cancel-stamps "$stamps"); fi
        run "c$mode-$s" 90 cancel --n "$CANCEL_N" --stamps "$stamps" \
          --disconnect "$([[ $mode == disconnect ]] && echo 1 || echo 0)" \
          --ready-timeout 30 --drain-timeout 15 "${PACE[@]}" -- "${cmd[@]}" --max-streams "$((CANCEL_N + 100))" --grace-period 10
      done
    done
  fi
  if want upstream; then  # 7: streams proxied from bench/upstream.cpp (issue 9)
    upstream_run "$UP_N"
  fi
  if want store; then  # 9: the SQLite store (the default) against --store memory (issue 17)
    for n in $S_N; do
      if ! want handler || [[ " $H_N " != *" $n "* ]]; then
        shutdown_run "h-as-$n" "$n" -- "${AS[@]}" --generator "$GEN"
        store_count "h-as-$n"
      fi
      shutdown_run "h-mem-$n" "$n" -- "${AS[@]}" --generator "$GEN" --store memory
    done
    if ! want throughput; then
      run tp-as 120 throughput --n 100 --tokens "$TP_TOKENS" --interval-ms 0 \
        --run-timeout 60 --drain-timeout 10 "${PACE[@]}" -- "${AS[@]}" --generator "$GEN"
    fi
    run tp-mem 120 throughput --n 100 --tokens "$TP_TOKENS" --interval-ms 0 \
      --run-timeout 60 --drain-timeout 10 "${PACE[@]}" -- "${AS[@]}" --generator "$GEN" --store memory
    wait_idle
    echo "bench: run $RUN/$RUNS: store (10,000 dialogs, history of 1,000 turns)" >&2
    timeout --kill-after=5 300 "$SB" serve "$SERVER" >"$OUT/store.r$RUN.txt" 2>"$OUT/store.r$RUN.err" ||
      echo "storebench_status=$?" >>"$OUT/store.r$RUN.txt"
  fi
done
if want rolling; then  # 8: rolling restart behind nginx (issue 11), once
  rolling_run
fi

T_END=$(date +%s)
BUSY_AFTER=$(busy_pct)

# --- the table ----------------------------------------------------------------
# med NAME KEY -> the median of KEY over the runs of NAME (numbers only; "-"
# when none has it). With an even count, the mean of the middle two.
med() {
  local f vals
  vals=$(for f in "$OUT/$1".r[0-9]*.txt; do
    [[ -f $f ]] && grep -m1 "^$2=" "$f" | cut -d= -f2-
  done | grep -E '^-?[0-9]+(\.[0-9]+)?$' | sort -g) || true
  [[ -z $vals ]] && { echo "-"; return; }
  awk '{ v[NR] = $1 } END { if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2;
    if (m == int(m)) printf "%d\n", m; else printf "%.*f\n", (m < 10 ? 2 : 1), m }' <<<"$vals"
}
# runs NAME KEY -> every run's value, "a, b, c"
runs() {
  local f out=""
  for f in "$OUT/$1".r[0-9]*.txt; do
    [[ -f $f ]] || continue
    out+="$(grep -m1 "^$2=" "$f" | cut -d= -f2- || echo -), "
  done
  echo "${out%, }"
}
# ratio A B -> "A/B x", or "-"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {
  if (a !~ /^-?[0-9.]+$/ || b !~ /^-?[0-9.]+$/ || b + 0 == 0) { print "-"; exit }
  printf "%.2fx\n", a / b }'; }
# ok A OP B -> exit 0 when A OP B holds (A a number)
ok() { awk -v a="$1" -v b="$3" -v op="$2" 'BEGIN {
  if (a !~ /^-?[0-9.]+$/) exit 1
  if (op == "<=") exit !(a + 0 <= b + 0); if (op == ">=") exit !(a + 0 >= b + 0)
  if (op == "==") exit !(a + 0 == b + 0); exit 1 }'; }
# ratio_ok A B OP LIMIT: the ratio A/B holds OP LIMIT
ratio_ok() { awk -v a="$1" -v b="$2" -v op="$3" -v l="$4" 'BEGIN {
  if (a !~ /^-?[0-9.]+$/ || b !~ /^-?[0-9.]+$/ || b + 0 == 0) exit 1
  r = a / b; if (op == "<=") exit !(r <= l); exit !(r >= l) }'; }
# mark VALUE yes|no|"" -> VALUE, with " (miss)" when a target is missed
mark() { if [[ $2 == no ]]; then echo "$1 (miss)"; else echo "$1"; fi; }
held() { if "$@"; then echo yes; else echo no; fi; }
exit_ms() {  # NAME -> median exit time, or "killed" when any run had to be killed
  if [[ $(runs "$1" server_killed) == *1* ]]; then echo "killed ($(runs "$1" server_killed))"; else med "$1" exit_ms; fi
}

rows=()
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"); }

# Rows of one paced shutdown comparison: A (agentsmithy) against G (Go).
# Targets by N come from issue 8 (handler) or from bench/RESULTS.md (thread).
paced_rows() {
  local label=$1 n=$2 a=$3 g=$4 kind=$5
  local dm_t="" dm_c="" ex_t="" ex_c="" pace_t="" pace_c="" held_t="" held_c="" rss_t="" rss_c="" thr_t="" thr_c=""
  local am gm
  am=$(med "$a" done_max_ms) gm=$(med "$g" done_max_ms)
  if [[ $kind == handler ]]; then
    if [[ $n == 10000 ]]; then
      dm_t="<= 0.5x Go"; dm_c=$(held ratio_ok "$am" "$gm" "<=" 0.5)
      ex_t="<= 1000"; ex_c=$(held ok "$(med "$a" exit_ms)" "<=" 1000)
      pace_t=">= 99"; pace_c=$(held ok "$(med "$a" pace_pct)" ">=" 99)
      held_t="$n"; held_c=$(held ok "$(med "$a" held)" == "$n")
      rss_t="<= 1024"; rss_c=$(held ok "$(med "$a" peak_rss_mib)" "<=" 1024)
      thr_t="<= 64"; thr_c=$(held ok "$(med "$a" peak_threads)" "<=" 64)
    elif [[ $n == 1000 || $n == 5000 ]]; then
      dm_t="<= 0.8x Go"; dm_c=$(held ratio_ok "$am" "$gm" "<=" 0.8)
    fi
  else  # thread: no regression against the reference build, same run (+10% for noise)
    local r=t-ref-$n rd re
    rd=$(med "$r" done_max_ms) re=$(med "$r" exit_ms)
    if [[ $(runs "$r" server_killed) == *1* ]]; then
      # The reference did not exit within the drain bound: an exit at all,
      # with every client complete, is no regression.
      dm_t="ref $rd, killed"; ex_t="ref killed after 15 s"
      ex_c=$(held ok "$(med "$a" complete_pct)" == 100)
      [[ $(runs "$a" server_killed) == *1* ]] && ex_c=no
    elif [[ $rd != - ]]; then
      dm_t="<= ref $rd +10%"; dm_c=$(held ratio_ok "$am" "$rd" "<=" 1.1)
      ex_t="<= ref $re +10%"; ex_c=$(held ratio_ok "$(med "$a" exit_ms)" "$re" "<=" 1.1)
    fi
    if [[ $rd != - ]]; then
      pace_t=">= ref $(med "$r" pace_pct) - 1"
      pace_c=$(held ok "$(med "$a" pace_pct)" ">=" "$(awk -v p="$(med "$r" pace_pct)" 'BEGIN { print p - 1 }')")
    fi
  fi
  local c_pct
  c_pct=$(held ok "$(med "$a" complete_pct)" == 100)
  row "$label" "$n" "streams held at the signal" "$(mark "$(med "$a" held)" "$held_c")" "$(med "$g" held)" "" "$held_t"
  row "" "" "asked pace delivered before the signal (%)" "$(mark "$(med "$a" pace_pct)" "$pace_c")" "$(med "$g" pace_pct)" "" "$pace_t"
  row "" "" "got error, done, final chunk (%)" "$(mark "$(med "$a" complete_pct)" "$c_pct")" "$(med "$g" complete_pct)" "" "100"
  row "" "" "signal to done p50 / p99 (ms)" "$(med "$a" done_p50_ms) / $(med "$a" done_p99_ms)" "$(med "$g" done_p50_ms) / $(med "$g" done_p99_ms)" "$(ratio "$(med "$a" done_p99_ms)" "$(med "$g" done_p99_ms)") (p99)" ""
  row "" "" "signal to done max (ms)" "$(mark "$am" "$dm_c")" "$gm" "$(ratio "$am" "$gm")" "$dm_t"
  row "" "" "signal to exit (ms)" "$(mark "$(exit_ms "$a")" "$ex_c")" "$(exit_ms "$g")" "$(ratio "$(med "$a" exit_ms)" "$(med "$g" exit_ms)")" "$ex_t"
  row "" "" "peak RSS (MiB)" "$(mark "$(med "$a" peak_rss_mib)" "$rss_c")" "$(med "$g" peak_rss_mib)" "$(ratio "$(med "$a" peak_rss_mib)" "$(med "$g" peak_rss_mib)")" "$rss_t"
  row "" "" "peak threads" "$(mark "$(med "$a" peak_threads)" "$thr_c")" "$(med "$g" peak_threads)" "" "$thr_t"
  row "" "" "peak connection attempts in flight" "$(med "$a" peak_inflight)" "$(med "$g" peak_inflight)" "" "256"
  row "" "" "server cores while streaming" "$(med "$a" settle_server_cores)" "$(med "$g" settle_server_cores)" "$(ratio "$(med "$a" settle_server_cores)" "$(med "$g" settle_server_cores)")" ""
  row "" "" "drain CPU per stream (us)" "$(med "$a" drain_cpu_per_stream_us)" "$(med "$g" drain_cpu_per_stream_us)" "$(ratio "$(med "$a" drain_cpu_per_stream_us)" "$(med "$g" drain_cpu_per_stream_us)")" ""
}

if want handler; then
  for n in $H_N; do paced_rows "1 handler (--generator $GEN)" "$n" "h-as-$n" "h-go-$n" handler; done
fi
if want thread; then
  for n in $T_N; do paced_rows "2 --generator thread" "$n" "t-as-$n" "h-go-$n" thread; done
fi
if want idle; then
  a=$(med idle-as exit_ms) g=$(med idle-go exit_ms)
  row "3 idle keep-alive" 100 "/health answered, idle at the signal" "$(med idle-as idle_open_at_signal)" "$(med idle-go idle_open_at_signal)" "" ""
  row "" "" "signal to exit (ms)" "$(mark "$(exit_ms idle-as)" "$(held ratio_ok "$a" "$g" "<=" 1)")" "$(exit_ms idle-go)" "$(ratio "$a" "$g")" "<= 1x Go"
fi
if want throughput; then
  a=$(med tp-as events_per_s) g=$(med tp-go events_per_s)
  row "4 throughput" "100 x $TP_TOKENS" "events/s" "$(mark "$a" "$(held ratio_ok "$a" "$g" ">=" 1.2)")" "$g" "$(ratio "$a" "$g")" ">= 1.2x Go"
  row "" "" "MB/s" "$(med tp-as mb_per_s)" "$(med tp-go mb_per_s)" "$(ratio "$(med tp-as mb_per_s)" "$(med tp-go mb_per_s)")" ""
  row "" "" "server CPU s per million events" "$(med tp-as cpu_s_per_million_events)" "$(med tp-go cpu_s_per_million_events)" "$(ratio "$(med tp-as cpu_s_per_million_events)" "$(med tp-go cpu_s_per_million_events)")" ""
  row "" "" "streams complete / seconds" "$(med tp-as streams_complete) / $(med tp-as seconds)" "$(med tp-go streams_complete) / $(med tp-go seconds)" "" ""
fi
if want capacity; then
  row "5 capacity (max 1000)" 1100 "streaming / 503 (with Retry-After)" "$(mark "$(med cap-as streaming) / $(med cap-as status_503) ($(med cap-as status_503_retry_after))" "$(held ok "$(med cap-as status_503)" == 100)")" "$(med cap-go streaming) / $(med cap-go status_503) ($(med cap-go status_503_retry_after))" "" "1000 / 100"
  row "" "" "time to 503 p50 / p99 (ms)" "$(mark "$(med cap-as t503_p50_ms) / $(med cap-as t503_p99_ms)" "$(held ok "$(med cap-as t503_p99_ms)" "<=" 100)")" "$(med cap-go t503_p50_ms) / $(med cap-go t503_p99_ms)" "$(ratio "$(med cap-as t503_p99_ms)" "$(med cap-go t503_p99_ms)") (p99)" "p99 <= 100"
  row "" "" "streams complete at the shutdown" "$(med cap-as streams_complete_at_shutdown)" "$(med cap-go streams_complete_at_shutdown)" "" "1000"
fi
if want cancel; then
  a=csignal-as g=csignal-go
  row "6 on_cancel, producers in recv()" "$CANCEL_N" "callbacks run / producers released" "$(med $a callbacks) / $(med $a released)" "$(med $g callbacks) / $(med $g released)" "" "$CANCEL_N / $CANCEL_N"
  row "" "" "signal to callback p50 / p99 (ms)" "$(med $a cb_p50_ms) / $(med $a cb_p99_ms)" "$(med $g cb_p50_ms) / $(med $g cb_p99_ms)" "" ""
  row "" "" "signal to callback max (ms)" "$(mark "$(med $a cb_max_ms)" "$(held ok "$(med $a cb_max_ms)" "<=" 10)")" "$(med $g cb_max_ms)" "$(ratio "$(med $a cb_max_ms)" "$(med $g cb_max_ms)")" "<= 10"
  row "" "" "signal to all producers released (ms)" "$(mark "$(med $a release_max_ms)" "$(held ok "$(med $a release_max_ms)" "<=" 100)")" "$(med $g release_max_ms)" "$(ratio "$(med $a release_max_ms)" "$(med $g release_max_ms)")" "<= 100"
  row "" "" "got error, done, final chunk (%)" "$(mark "$(med $a complete_pct)" "$(held ok "$(med $a complete_pct)" == 100)")" "$(med $g complete_pct)" "" "100"
  row "" "" "signal to done max / exit (ms)" "$(med $a done_max_ms) / $(exit_ms $a)" "$(med $g done_max_ms) / $(exit_ms $g)" "$(ratio "$(med $a done_max_ms)" "$(med $g done_max_ms)") (done)" ""
  a=cdisconnect-as g=cdisconnect-go
  row "" "" "client disconnects: callbacks / released" "$(med $a callbacks) / $(med $a released)" "$(med $g callbacks) / $(med $g released)" "" "$CANCEL_N / $CANCEL_N"
  row "" "" "disconnect to callback p50 / p99 (ms)" "$(med $a cb_p50_ms) / $(med $a cb_p99_ms)" "$(med $g cb_p50_ms) / $(med $g cb_p99_ms)" "" ""
  row "" "" "disconnect to callback max (ms)" "$(mark "$(med $a cb_max_ms)" "$(held ok "$(med $a cb_max_ms)" "<=" 10)")" "$(med $g cb_max_ms)" "$(ratio "$(med $a cb_max_ms)" "$(med $g cb_max_ms)")" "<= 10"
  row "" "" "disconnect to producer released max (ms)" "$(med $a release_max_ms)" "$(med $g release_max_ms)" "$(ratio "$(med $a release_max_ms)" "$(med $g release_max_ms)")" ""
fi

if want upstream; then
  a=up-as-$UP_N
  na="no upstream client"
  up_all=$(med "$a" up_streams)
  row "7 upstream (--upstream; --generator n/a)" "$UP_N" "streams held at the signal" "$(mark "$(med "$a" held)" "$(held ok "$(med "$a" held)" == "$UP_N")")" "$na" "" "$UP_N"
  row "" "" "pace delivered: chat events by the signal / tokens due (%)" "$(mark "$(med "$a" up_pace_pct)" "$(held ok "$(med "$a" up_pace_pct)" ">=" 99)")" "-" "" ">= 99"
  row "" "" "pace delivered while streaming, last second (%)" "$(med "$a" settle_paced_pct)" "-" "" ""
  row "" "" "got error, done, final chunk (%)" "$(mark "$(med "$a" complete_pct)" "$(held ok "$(med "$a" complete_pct)" == 100)")" "-" "" "100"
  row "" "" "server cores while streaming" "$(mark "$(med "$a" settle_server_cores)" "$(held ok "$(med "$a" settle_server_cores)" "<=" 1)")" "-" "" "<= 1"
  row "" "" "server CPU per proxied event (us)" "$(med "$a" settle_cpu_us_per_chat)" "-" "" ""
  row "" "" "proxied events/s while streaming" "$(med "$a" settle_chat_per_s)" "-" "" "$((UP_N * 50))"
  row "" "" "signal to done p50 / p99 (ms)" "$(med "$a" done_p50_ms) / $(med "$a" done_p99_ms)" "-" "" ""
  row "" "" "signal to done max (ms)" "$(mark "$(med "$a" done_max_ms)" "$(held ok "$(med "$a" done_max_ms)" "<=" 50)")" "-" "" "<= 50"
  row "" "" "signal to upstream saw the close p50 / p99 (ms)" "$(med "$a" up_close_p50_ms) / $(med "$a" up_close_p99_ms)" "-" "" ""
  row "" "" "signal to upstream saw the close max (ms)" "$(mark "$(med "$a" up_close_max_ms)" "$(held ok "$(med "$a" up_close_max_ms)" "<=" 100)")" "-" "" "<= 100"
  row "" "" "upstream connections closed within 100 ms / streams" "$(mark "$(med "$a" up_closed_within_100ms) / $up_all" "$(held ok "$(med "$a" up_closed_within_100ms)" == "$up_all")")" "-" "" "all"
  row "" "" "closed before the signal / never closed" "$(med "$a" up_closed_before_signal) / $(med "$a" up_never_closed)" "-" "" "0 / 0"
  row "" "" "signal to exit (ms)" "$(exit_ms "$a")" "-" "" ""
  row "" "" "peak RSS (MiB) / threads" "$(med "$a" peak_rss_mib) / $(med "$a" peak_threads)" "-" "" ""
  row "" "" "the upstream's own lag: latest token after its due time (ms, $(runs "$a" up_sched))" "$(med "$a" up_late_max_ms)" "-" "" ""
fi
if want store; then
  for n in $S_N; do
    a=h-as-$n m=h-mem-$n
    dm_a=$(med "$a" done_max_ms) dm_m=$(med "$m" done_max_ms)
    rec="$(med "$a" store_turns) / $(med "$a" answered_200), $(med "$a" store_chat_events) / $(med "$a" chat_received)"
    rec_ok=$(held ok "$(med "$a" store_turns)" == "$(med "$a" answered_200)")
    [[ $rec_ok == yes ]] && rec_ok=$(held ok "$(med "$a" store_chat_events)" == "$(med "$a" chat_received)")
    [[ $rec_ok == yes ]] && rec_ok=$(held ok "$(med "$a" store_turns_running)" == 0)
    row "9 dialog store: SQLite (default) vs --store memory" "$n" "signal to done max (ms)" "$(mark "$dm_a" "$(held ratio_ok "$dm_a" "$dm_m" "<=" 1.1)")" "$dm_m (memory)" "$(ratio "$dm_a" "$dm_m")" "<= 1.1x memory"
    row "" "" "turns recorded / streams, chat events recorded / received" "$(mark "$rec" "$rec_ok")" "-" "" "all"
    row "" "" "turns recorded with outcome shutdown / still running" "$(med "$a" store_turns_shutdown) / $(med "$a" store_turns_running)" "-" "" "- / 0"
    row "" "" "asked pace delivered (%), peak RSS (MiB)" "$(med "$a" pace_pct), $(med "$a" peak_rss_mib)" "$(med "$m" pace_pct), $(med "$m" peak_rss_mib) (memory)" "" ""
  done
  a=$(med tp-as events_per_s) m=$(med tp-mem events_per_s)
  row "" "100 x $TP_TOKENS" "throughput, events/s" "$(mark "$a" "$(held ratio_ok "$a" "$m" ">=" 0.9)")" "$m (memory)" "$(ratio "$a" "$m")" ">= 0.9x memory"
  row "" "10,000 dialogs" "startup, exec to /health 200, median / max of 5 (ms)" "$(mark "$(med store startup_ms_median) / $(med store startup_ms_max)" "$(held ok "$(med store startup_ms_median)" "<=" 200)")" "-" "" "<= 200"
  row "" "1,000 turns" "history page p50 / p99 / max (ms)" "$(mark "$(med store history_p50_ms) / $(med store history_p99_ms) / $(med store history_max_ms)" "$(held ok "$(med store history_p99_ms)" "<=" 10)")" "-" "" "p99 <= 10"
fi
if want rolling; then
  a=rolling
  r_res=$(runs rolling rolling_result)
  row "8 rolling restart behind nginx (once)" "$ROLL_N" "requests served" "$(med $a requests_served)" "no peer" "" ""
  row "" "" "streams cut by shutdown" "$(mark "$(med $a cut_by_shutdown)" "$(held ok "$(med $a cut_by_shutdown)" ">=" 1)")" "-" "" "> 0"
  row "" "" "errors" "$(mark "$(med $a errors)" "$(held ok "$(med $a errors)" == 0)")" "-" "" "0"
  row "" "" "503 seen by a client" "$(mark "$(med $a client_503)" "$(held ok "$(med $a client_503)" == 0)")" "-" "" "0"
  row "" "" "wait between two streams p50 / p99 (ms)" "$(med $a wait_p50_ms) / $(med $a wait_p99_ms)" "-" "" ""
  row "" "" "longest wait between two streams (ms)" "$(med $a max_wait_ms)" "-" "" ""
  row "" "" "tests/ops/rolling.sh (exit status, checks failed)" "$(mark "$r_res ($(med $a rolling_status), $(med $a rolling_failures))" "$([[ $r_res == PASS ]] && echo yes || echo no)")" "-" "" "PASS"
fi

{
  echo "agentsmithy benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $((T_END - T_START)) s, median of $RUNS run(s) each$([[ $QUICK == 1 ]] && echo ", BENCH_QUICK=1")"
  echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r); CPU busy with other work: ${BUSY_BEFORE}% before the run, ${BUSY_AFTER}% after"
  echo "server: $SERVER_INFO"
  [[ -n $REF ]] && echo "reference (threaded generators, 'ref' in the targets): examples/server.cpp and agentsmithy.hpp of $REF_COMMIT ($(git -C "$ROOT" log -1 --format='%h %cd' --date=format:'%Y-%m-%d' "$REF_COMMIT"))"
  ((NEED_GO)) && echo "Go peer: bench/goserver, $(go version | awk '{print $3}') net/http, Server.Shutdown on SIGTERM; cancel bench: bench/cancelbench.cpp ($(cat "$CB.header" 2>/dev/null || echo '-') agentsmithy.hpp)"
  want upstream && echo "upstream: bench/upstream.cpp, one epoll thread (SCHED_RR when permitted), a token every 20 ms per stream, on the same 2 cores; the Go peer has no upstream client"
  want rolling && echo "rolling restart: tests/ops/rolling.sh $ROLL_N, $(nginx -v 2>&1 | sed 's/.*: //') in front of two instances, one run (log: $OUT/rolling.log)"
  echo
  echo "| scenario | N | metric | agentsmithy | Go net/http | ratio | target |"
  echo "|---|---:|---|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
  echo
  noisy=""
  for f in "$OUT"/*.r[0-9]*.txt; do
    [[ -f $f ]] || continue
    o=$(grep -m1 '^other_busy_pct=' "$f" | cut -d= -f2) || true
    [[ $o =~ ^[0-9]+$ ]] && ((o > 10)) && noisy+=" $(basename "$f" .txt) ${o}%,"
  done
  [[ -n $noisy ]] && echo "Other processes took a share of the CPUs during:${noisy%,} (figures there are pessimistic)."
  failed=$(grep -l '^loadclient_status=' "$OUT"/*.r[0-9]*.txt 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ') || true
  [[ -n $failed ]] && echo "Runs whose load client failed: $failed(see the .err files)."
  echo "Medians over the runs$(want rolling && echo ' (the rolling restart: its one run)'); ratio = agentsmithy / Go; times from the cause (signal or disconnect) as the load client saw them$(want upstream && echo ", the upstream's closes on the same CLOCK_MONOTONIC"). (miss): target missed."
  echo "Per-run values: $OUT/runs.txt; raw results: $OUT/*.rK.txt; last run's clients: $OUT/*.csv; server logs: $OUT/*.log."
} | tee "$OUT/table.md"

# Every run's value of the headline figures, to see the spread behind a median.
{
  for f in "$OUT"/*.r1.txt; do
    [[ -f $f ]] || continue
    name=$(basename "$f" .r1.txt)
    for key in held pace_pct complete_pct done_max_ms exit_ms peak_rss_mib peak_threads events_per_s t503_p99_ms cb_max_ms release_max_ms \
      settle_server_cores settle_cpu_us_per_chat up_pace_pct up_close_max_ms up_closed_within_100ms requests_served cut_by_shutdown errors max_wait_ms other_busy_pct \
      store_turns chat_received store_chat_events startup_ms_median history_p99_ms history_max_ms; do
      if grep -q "^$key=" "$f"; then echo "$name $key: $(runs "$name" "$key")"; fi
    done
  done
} >"$OUT/runs.txt"
