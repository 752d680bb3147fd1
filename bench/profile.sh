#!/usr/bin/env bash
# bench/profile.sh - where the CPU goes in one benchmark scenario, by thread.
#
# Runs one scenario of bench/run.sh under `perf record -a -g` (Debian's
# linux-perf, installed when missing) and prints, for a time window (the
# streaming phase or the drain), the CPU share of every thread name on the
# machine (the server's threads are named as-worker, as-hub, as-demo,
# as-upstream, ...; the main thread, which runs the drain, keeps the
# program's name), and for chosen threads where their samples are: in which
# system call (send, recv, close, epoll, futex, ...) or in which part of the
# user code (JSON, malloc, libcurl). bench/RESULTS.md quotes its output.
#
#   bash bench/profile.sh handler 10000 stream     # 10,000 paced streams, while streaming
#   bash bench/profile.sh handler 1000 drain       # the same at 1,000, signal to exit
#   bash bench/profile.sh upstream 1000 stream     # 1,000 proxied streams
#   bash bench/profile.sh upstream 1000 drain
#
# Needs the binaries bench/run.sh builds (build/bench/loadclient and, for
# upstream, build/bench/upstream): run bench/run.sh (or BENCH_QUICK=1) once
# first. PROFILE_THREADS="as-demo agentsmithy-ser" chooses the threads
# broken down (default: the busiest three of the server).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/build/bench}
SCENARIO=${1:?usage: profile.sh handler|upstream N stream|drain}
N=${2:?usage: profile.sh handler|upstream N stream|drain}
WINDOW=${3:-stream}
SERVER=${AGENTSMITHY_SERVER:-$ROOT/build/agentsmithy-server}
LC=$OUT/loadclient
UPB=$OUT/upstream
DATA=$OUT/profile-$SCENARIO-$N.data
WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"; [[ -n ${UP_PID:-} ]] && kill "$UP_PID" 2>/dev/null; true' EXIT

if ! command -v perf >/dev/null 2>&1; then
  apt-get install -y linux-perf >&2
fi
[[ -x $LC ]] || { echo "profile: $LC is missing: run bench/run.sh first" >&2; exit 1; }

PACE=(--connect-rate 20000 --connect-inflight 256 --inflight 256)
case $SCENARIO in
  handler)
    INTERVAL=50
    CMD=("$SERVER" --workdir "$WORKDIR" --port "{PORT}" --generator handler --max-streams "$N"
      --grace-period 10)
    ;;
  upstream)
    INTERVAL=20
    [[ -x $UPB ]] || { echo "profile: $UPB is missing: run bench/run.sh first" >&2; exit 1; }
    coproc UPC { exec "$UPB" --interval-ms 20 --stamps "$WORKDIR/stamps" 2>/dev/null; }
    UP_PID=$UPC_PID
    read -r -t 10 -u "${UPC[0]}" line
    CMD=("$SERVER" --workdir "$WORKDIR" --port "{PORT}" --upstream "http://127.0.0.1:${line#port=}/v1"
      --max-streams $((N + 200)) --grace-period 10)
    ;;
  *) echo "profile: scenario handler or upstream" >&2; exit 2 ;;
esac

# The load client prints the signal's CLOCK_MONOTONIC time; perf's sample
# times are on the same clock (-k CLOCK_MONOTONIC).
perf record -q -k CLOCK_MONOTONIC -F 4000 -a -g -o "$DATA" -- \
  "$LC" shutdown --n "$N" --interval-ms "$INTERVAL" --tokens 100000 --settle 2 \
  --ready-timeout 60 --drain-timeout 15 "${PACE[@]}" -- "${CMD[@]}" >"$WORKDIR/lc.txt" 2>/dev/null
grep -E '^(pace_pct|settle_server_cores|settle_cpu_us_per_chat|done_max_ms|exit_ms|peak_threads)=' \
  "$WORKDIR/lc.txt"
SIG=$(grep -m1 '^signal_mono_ns=' "$WORKDIR/lc.txt" | cut -d= -f2)
EXIT_MS=$(grep -m1 '^exit_ms=' "$WORKDIR/lc.txt" | cut -d= -f2)
sec() { awk -v ns="$1" -v ms="$2" 'BEGIN { printf "%.6f", ns / 1e9 + ms / 1e3 }'; }
if [[ $WINDOW == drain ]]; then
  RANGE="$(sec "$SIG" 0),$(sec "$SIG" "${EXIT_MS%.*}")"
else
  RANGE="$(sec "$SIG" -1500),$(sec "$SIG" -100)"  # 1.4 s of streaming before the signal
fi
echo "window ($WINDOW): $RANGE s (CLOCK_MONOTONIC)"
echo "--- CPU share by thread name (all CPUs = 100%)"
perf report -i "$DATA" --time "$RANGE" --sort comm --stdio -g none 2>/dev/null |
  grep -v '^#' | grep -v '^$' | head -12

THREADS=${PROFILE_THREADS:-$(perf report -i "$DATA" --time "$RANGE" --sort comm --stdio -g none 2>/dev/null |
  grep -v '^#' | awk 'NF >= 3 && ($3 ~ /^as-/ || $3 == "agentsmithy-ser") { print $3 }' | head -3)}
for t in $THREADS; do
  echo "--- $t: samples by where they are (innermost match of the call chain)"
  perf script -i "$DATA" --time "$RANGE" --comms "$t" 2>/dev/null | awk 'BEGIN { RS = "" } {
    n = split($0, l, "\n"); cat = "user: other"
    for (i = 2; i <= n; i++) {
      if (l[i] ~ /sendto|sendmsg/) { cat = "kernel: send (TCP, incl. loopback receive)"; break }
      if (l[i] ~ /recvfrom|recvmsg|sys_read/) { cat = "kernel: recv/read"; break }
      if (l[i] ~ /sys_close|__fput/) { cat = "kernel: close"; break }
      if (l[i] ~ /epoll_wait|sys_poll|do_sys_poll/) { cat = "kernel: epoll_wait/poll"; break }
      if (l[i] ~ /epoll_ctl/) { cat = "kernel: epoll_ctl"; break }
      if (l[i] ~ /futex/) { cat = "kernel: futex"; break }
      if (l[i] ~ /entry_SYSCALL/) { cat = "kernel: other system calls"; break }
      if (l[i] ~ /kallsyms/) continue
      if (l[i] ~ /nlohmann.*(parser|lexer)/) { cat = "user: JSON parse"; break }
      if (l[i] ~ /nlohmann.*(serializer|dump)/) { cat = "user: JSON dump"; break }
      if (l[i] ~ /malloc|free|_int_/) { cat = "user: malloc/free"; break }
      if (l[i] ~ /libcurl/) { cat = "user: libcurl"; break }
    }
    count[cat]++; total++
  } END { for (c in count) printf "%6.1f%%  %s\n", 100 * count[c] / total, c }' | sort -rn
done
echo "perf data: $DATA (perf report -i $DATA --time $RANGE)"
