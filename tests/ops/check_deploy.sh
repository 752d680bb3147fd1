#!/usr/bin/env bash
# tests/ops/check_deploy.sh - static checks of examples/deploy/ (no cluster here).
#
# kubernetes.yaml: parses as YAML (Debian's python3-yaml) into a Deployment and
# a Service; the container's readiness probe is an httpGet of /health; its
# args have --lame-duck and --grace-period; terminationGracePeriodSeconds is
# at least lame duck + grace period + 5 s; the liveness probe (if any) is not
# /health (it answers 503 while stopping); the Service targets the container
# port. nginx.conf: `nginx -t` accepts it (with the example upstreams file)
# and it has the directives the rolling restart relies on.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/ops/lib.sh
source "$HERE/lib.sh"
DEPLOY=$OPS_ROOT/examples/deploy
OPS_FAILED=0

if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
  [[ -n ${SKIP_DEPS:-} ]] && { echo "FAIL: python3-yaml missing"; exit 1; }
  sudo=; [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends python3-yaml >&2 || exit 1
fi
ops_need nginx nginx || exit 1

if /usr/bin/python3 - "$DEPLOY/kubernetes.yaml" <<'EOF'; then
import re, sys, yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
failed = []
def check(cond, what):
    print(("ok: " if cond else "FAIL: ") + what)
    if not cond:
        failed.append(what)

kinds = {d.get("kind"): d for d in docs}
check(set(kinds) >= {"Deployment", "Service"}, "kubernetes.yaml: a Deployment and a Service (%s)" % sorted(kinds))
dep = kinds.get("Deployment", {})
pod = dep.get("spec", {}).get("template", {}).get("spec", {})
containers = pod.get("containers", [])
check(len(containers) == 1, "one container")
c = containers[0] if containers else {}
args = [str(a) for a in c.get("command", []) + c.get("args", [])]

def flag(name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None

lame, grace = flag("--lame-duck"), flag("--grace-period")
check(lame is not None and float(lame) > 0, "args: --lame-duck %s" % lame)
check(grace is not None and float(grace) > 0, "args: --grace-period %s" % grace)
check(flag("--workdir") is not None, "args: --workdir")
host = flag("--host")
check(host is not None and not host.startswith("127."), "args: --host %s (reachable from outside the pod)" % host)
port = flag("--port")
ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
check(port is not None and int(port) in ports.values(), "containerPort matches --port %s" % port)
ready = c.get("readinessProbe", {}).get("httpGet", {})
check(ready.get("path") == "/health", "readinessProbe: httpGet /health")
rp = c.get("readinessProbe", {})
period = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3)
check(lame is not None and float(lame) > period,
      "lame duck %s s > readiness period x failureThreshold (%s s)" % (lame, period))
live = c.get("livenessProbe", {}).get("httpGet", {})
check(live.get("path") != "/health", "livenessProbe is not /health")
tgps = pod.get("terminationGracePeriodSeconds", 30)
need = (float(lame or 0) + float(grace or 0) + 5)
check(tgps >= need, "terminationGracePeriodSeconds %s >= lame duck + grace period + 5 s (%s)" % (tgps, need))
svc = kinds.get("Service", {}).get("spec", {})
sel = svc.get("selector", {})
labels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
check(sel and all(labels.get(k) == v for k, v in sel.items()), "Service selector matches the pod labels")
tp = [p.get("targetPort") for p in svc.get("ports", [])]
check(all(t in ports or t in ports.values() for t in tp) and tp, "Service targetPort %s is a container port" % tp)
sys.exit(1 if failed else 0)
EOF
  :
else
  OPS_FAILED=$((OPS_FAILED + 1))
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/agentsmithy-deploy.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/logs"
cp "$DEPLOY/nginx.conf" "$DEPLOY/agentsmithy-upstreams.conf" "$TMP/"
sed -i "s|/var/log/nginx/|$TMP/logs/|" "$TMP/nginx.conf"
if nginx -t -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/logs/startup.log" -g "pid $TMP/nginx.pid;" \
  >"$TMP/t.txt" 2>&1; then
  ops_pass "nginx -t accepts examples/deploy/nginx.conf"
else
  ops_fail "nginx -t: $(cat "$TMP/t.txt")"
fi
for d in 'proxy_http_version 1.1;' 'proxy_set_header Connection "";' 'proxy_buffering off;' \
  'proxy_next_upstream error timeout http_503 non_idempotent;' 'proxy_next_upstream_tries' \
  'proxy_read_timeout' 'include agentsmithy-upstreams.conf;'; do
  if grep -v '^\s*#' "$DEPLOY/nginx.conf" | grep -qF -- "$d"; then
    ops_pass "nginx.conf: $d"
  else
    ops_fail "nginx.conf lacks: $d"
  fi
done
# proxy_read_timeout must exceed the server's 15 s heartbeat.
rt=$(grep -v '^\s*#' "$DEPLOY/nginx.conf" | grep -o 'proxy_read_timeout [0-9]*[smh]*' | awk '{print $2}')
secs=$(awk -v t="$rt" 'BEGIN { n = t + 0; if (t ~ /m$/) n *= 60; if (t ~ /h$/) n *= 3600; print n }')
if ((secs > 15)); then ops_pass "proxy_read_timeout $rt > 15 s heartbeat"; else ops_fail "proxy_read_timeout $rt <= 15 s"; fi

if ((OPS_FAILED == 0)); then echo "deploy files: PASS"; exit 0; fi
echo "deploy files: FAIL ($OPS_FAILED)"
exit 1
