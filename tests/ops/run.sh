#!/usr/bin/env bash
# tests/ops/run.sh - the operations tests: examples/deploy/ checked, a rolling
# restart behind Debian's nginx, the metrics read by Debian's Prometheus.
#
#   bash tests/ops/run.sh              # 200 clients; about a minute
#   OPS_CLIENTS=1000 bash tests/ops/run.sh rolling   # the bench size, one test
#
# Builds tests/ops/rolling_client.cpp into build/ops/ (g++, -Werror), installs
# nginx, prometheus and python3-yaml with apt-get if missing (SKIP_DEPS=1:
# don't), runs each test under `timeout`, and ends with one line
# "ops: N passed, M failed". Arguments select tests: deploy, rolling, prometheus.
# AGENTSMITHY_SERVER overrides build/agentsmithy-server.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OPS_OUT:-$ROOT/build/ops}
CXX=${CXX:-g++}
mkdir -p "$OUT"

selected=("$@")
((${#selected[@]})) || selected=(deploy rolling prometheus)

passed=0
failed=0
CLIENT=$OUT/rolling_client
if [[ ! -x $CLIENT || $HERE/rolling_client.cpp -nt $CLIENT ]]; then
  echo "--- building $CLIENT"
  if ! "$CXX" -std=c++17 -O2 -Wall -Wextra -Wpedantic -Werror -o "$CLIENT" \
    "$HERE/rolling_client.cpp"; then
    echo "ops: 0 passed, 1 failed"
    exit 1
  fi
fi
export ROLLING_CLIENT=$CLIENT

run() {  # NAME SECONDS COMMAND...
  local name=$1 secs=$2
  shift 2
  echo "--- $name"
  local t0=$SECONDS status=0
  timeout --foreground -k 10 "$secs" "$@" || status=$?
  if ((status == 0)); then
    passed=$((passed + 1))
    echo "--- $name: passed ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    echo "--- $name: FAILED (status $status, $((SECONDS - t0)) s)"
  fi
}

for t in "${selected[@]}"; do
  case $t in
    deploy) run deploy 120 bash "$HERE/check_deploy.sh" ;;
    rolling) run "rolling restart, ${OPS_CLIENTS:-200} clients" 240 bash "$HERE/rolling.sh" "${OPS_CLIENTS:-200}" ;;
    prometheus) run prometheus 180 bash "$HERE/prometheus.sh" ;;
    *) echo "unknown test '$t' (deploy, rolling, prometheus)"; failed=$((failed + 1)) ;;
  esac
done
echo "ops: $passed passed, $failed failed"
((failed == 0))
