#!/usr/bin/env bash
# tests/ide/run.sh - the IDE integration tests: build/agentsmithy-server (or
# $AGENTSMITHY_SERVER) launched, watched and streamed from as the AgentSmithy
# VS Code extension does it (tests/ide/ide.test.mjs, Node's fetch).
#
#   bash tests/ide/run.sh [test-name-substring...]
#
# Installs Debian's nodejs with apt-get (sudo when not root) if node is
# missing, builds the status.json write tracer (tests/ide/status_trace.c) into
# a temporary directory, runs the tests, and ends with exactly one line:
#   ide: N passed, M failed
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export AGENTSMITHY_SERVER=${AGENTSMITHY_SERVER:-$repo/build/agentsmithy-server}

summary() {
  echo "ide: $1 passed, $2 failed"
  [ "$2" -eq 0 ]
  exit
}

if ! command -v node >/dev/null 2>&1; then
  sudo=
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "Installing nodejs"
  { $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends nodejs; } >&2 ||
    { echo "error: could not install nodejs" >&2; summary 0 1; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc=$(command -v cc || command -v gcc || true)
if [ -n "$cc" ] && "$cc" -shared -fPIC -O2 -Wall -Wextra -Werror -o "$work/status_trace.so" \
     "$here/status_trace.c" -ldl; then
  export STATUS_TRACE_SO="$work/status_trace.so"
else
  echo "warning: could not build tests/ide/status_trace.c; the tests that trace status.json writes will fail" >&2
fi

log="$work/ide.log"
timeout --foreground -k 10 "${IDE_TIMEOUT:-600}" node "$here/ide.test.mjs" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -c '^ok ' "$log")
failed=$(grep -c '^not ok ' "$log")
if ! grep -q '^# summary: ' "$log"; then
  echo "ide.test.mjs did not finish (status $status)"
  failed=$((failed + 1))
elif [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "ide.test.mjs exited with status $status"
  failed=1
fi
summary "$passed" "$failed"
