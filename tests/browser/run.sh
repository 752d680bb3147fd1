#!/usr/bin/env bash
# Runs the browser tests: headless Debian Chromium, driven by puppeteer-core (pinned in
# package-lock.json), against build/agentsmithy-server (AGENTSMITHY_SERVER overrides the path).
#
#   bash tests/browser/run.sh            from the repository root (or anywhere)
#
# Installs what is missing first: the Debian packages chromium, nodejs and npm (apt-get, with
# sudo when not root; SKIP_DEPS=1 skips), then `npm ci` in tests/browser unless node_modules
# already matches package-lock.json (so a machine with no registry can rerun). Each test starts
# its own server on a free port (--port 0) with a temporary --workdir, since several send it a
# signal. Screenshots go to build/browser/ (BROWSER_ARTIFACTS overrides). The last line reads
# "browser: N passed, M failed".
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

summary() { echo "browser: $1 passed, $2 failed"; }
die() { echo "browser tests: $*" >&2; summary 0 1; exit 1; }

export CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"
export AGENTSMITHY_SERVER="${AGENTSMITHY_SERVER:-build/agentsmithy-server}"
export PUPPETEER_SKIP_DOWNLOAD=1 PUPPETEER_SKIP_CHROME_DOWNLOAD=1
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

# ---- Debian packages ---------------------------------------------------------------------
if [[ "${SKIP_DEPS:-0}" != 1 ]]; then
  missing=()
  [[ -x "$CHROMIUM_BIN" ]] || missing+=(chromium)
  # A node from elsewhere (e.g. nodesource, which bundles npm) is fine when it is >= 18.
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "browser tests: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Waits for another apt-get holding the lock instead of failing at once.
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 ||
      die "apt-get update failed"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
      die "apt-get install ${missing[*]} failed"
  fi
fi
[[ -x "$CHROMIUM_BIN" ]] || die "no Chromium at $CHROMIUM_BIN (apt-get install chromium)"
command -v node >/dev/null || die "node is missing (apt-get install nodejs)"
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 18)) || die "node $(node --version) is too old; the tests need 18 or newer"

# ---- npm packages --------------------------------------------------------------------------
lock_sum=$(sha256sum "$HERE/package-lock.json" | cut -d' ' -f1)
stamp="$HERE/node_modules/.agentsmithy-lock.sha256"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$lock_sum" ]] &&
   (cd "$HERE" && node -e 'require("puppeteer-core")') 2>/dev/null; then
  echo "browser tests: node_modules matches package-lock.json; skipping npm ci" >&2
else
  command -v npm >/dev/null || die "npm is missing (apt-get install npm)"
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci failed"
  echo "$lock_sum" >"$stamp"
fi

# ---- the server ----------------------------------------------------------------------------
if [[ ! -x "$AGENTSMITHY_SERVER" ]]; then
  if [[ "$AGENTSMITHY_SERVER" == build/agentsmithy-server ]]; then
    make build/agentsmithy-server >&2 || die "make build/agentsmithy-server failed"
  else
    die "$AGENTSMITHY_SERVER is missing"
  fi
fi

# ---- the tests -----------------------------------------------------------------------------
mkdir -p "${BROWSER_ARTIFACTS:-build/browser}"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# One file: its tests run one after another (each starts and signals its own server).
timeout --kill-after=10 "${BROWSER_TIMEOUT:-600}" \
  node --test --test-reporter=tap "$HERE/browser.test.js" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
passed=$(sed -n 's/^# pass \([0-9][0-9]*\)$/\1/p' "$out" | tail -1)
failed=$(sed -n 's/^# fail \([0-9][0-9]*\)$/\1/p' "$out" | tail -1)
cancelled=$(sed -n 's/^# cancelled \([0-9][0-9]*\)$/\1/p' "$out" | tail -1)
passed=${passed:-0}
failed=$(( ${failed:-0} + ${cancelled:-0} ))
if [[ $rc -ne 0 && $failed -eq 0 ]]; then
  echo "browser tests: node --test exited $rc" >&2
  failed=1
fi
echo "screenshots: ${BROWSER_ARTIFACTS:-build/browser}/" >&2
summary "$passed" "$failed"
[[ $failed -eq 0 ]]
