# tests/ops/lib.sh - helpers shared by tests/ops/rolling.sh and
# tests/ops/prometheus.sh (sourced, not run). Every wait is a bounded poll of
# the condition itself (a port answering, a log line, a process gone).

OPS_ROOT=${OPS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

ops_log() { echo "[$(date -u +%H:%M:%S.%3N)] $*"; }
ops_fail() { echo "FAIL: $*"; OPS_FAILED=$((${OPS_FAILED:-0} + 1)); }
ops_pass() { echo "ok: $*"; }

# apt-get installs the Debian packages given whose command is missing:
# ops_need COMMAND PACKAGE ...
ops_need() {
  local missing=() cmd pkg
  while (($# >= 2)); do
    cmd=$1 pkg=$2
    shift 2
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ -n ${SKIP_DEPS:-} ]] && { echo "missing: ${missing[*]} (SKIP_DEPS is set)" >&2; return 1; }
  local sudo=
  [[ $(id -u) == 0 ]] || sudo=sudo
  echo "installing ${missing[*]}" >&2
  # policy-rc.d or not, the packages' own services are not used: each test
  # runs its binary directly.
  $sudo apt-get update -qq >&2 &&
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >&2
}

# A loopback TCP port nothing listens on (a random guess, checked).
ops_free_port() {
  local i p
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000))
    if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# ops_wait_http URL STATUS SECONDS [BODY_REGEX]: polls until URL answers
# STATUS (and its body matches BODY_REGEX).
ops_wait_http() {
  local url=$1 want=$2 secs=$3 re=${4:-} i code body
  for ((i = 0; i < secs * 20; i++)); do
    body=$(curl -s -m 2 -w '\n%{http_code}' "$url" 2>/dev/null) || body=$'\n000'
    code=${body##*$'\n'}
    body=${body%$'\n'*}
    if [[ $code == "$want" ]] && { [[ -z $re ]] || [[ $body =~ $re ]]; }; then
      return 0
    fi
    sleep 0.05
  done
  echo "timeout: $url did not answer $want${re:+ matching $re} within ${secs}s (last: $code $body)" >&2
  return 1
}

# ops_wait_exit PID SECONDS: waits for a child of this shell to exit and
# sets OPS_EXIT_STATUS (not in a $(...) subshell: only the parent can wait).
ops_wait_exit() {
  local pid=$1 secs=$2 i
  OPS_EXIT_STATUS=
  for ((i = 0; i < secs * 50; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      OPS_EXIT_STATUS=0
      wait "$pid" || OPS_EXIT_STATUS=$?
      return 0
    fi
    sleep 0.02
  done
  return 1
}

# ops_wait_grep FILE REGEX SECONDS [FROM_BYTE]: waits for a line matching
# REGEX (grep -E) in FILE, from byte FROM_BYTE on.
ops_wait_grep() {
  local file=$1 re=$2 secs=$3 from=${4:-0} i
  for ((i = 0; i < secs * 20; i++)); do
    if [[ -f $file ]] && tail -c +"$((from + 1))" "$file" | grep -Eq -- "$re"; then
      return 0
    fi
    sleep 0.05
  done
  echo "timeout: no line matching '$re' in $file within ${secs}s" >&2
  return 1
}

# Processes this test started, stopped by their own ids at exit.
OPS_PIDS=()
ops_track() { OPS_PIDS+=("$1"); }
ops_stop_all() {
  local pid
  for pid in "${OPS_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${OPS_PIDS[@]}"; do
    if ! ops_wait_exit "$pid" 10; then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  OPS_PIDS=()
}

# The server binary, copied once: others may rebuild build/ during the run.
ops_server_snapshot() {
  local src=${AGENTSMITHY_SERVER:-$OPS_ROOT/build/agentsmithy-server} dst=$1
  if [[ ! -x $src ]]; then
    echo "no server binary at $src (make build/agentsmithy-server, or set AGENTSMITHY_SERVER)" >&2
    return 1
  fi
  cp "$src" "$dst"
  echo "server: $src ($(date -u -r "$src" '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$src" | cut -c1-12))"
}
