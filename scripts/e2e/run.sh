#!/usr/bin/env bash
# `make e2e`: prepare (cached), bring the node up, run tests/e2e against it, bring it down, and say how
# long each part took. The node is stopped whatever happens (also on Ctrl-C), and a packet from the pod
# range headed off the machine, or anything left behind, fails the run.
set -uo pipefail
cd "$(dirname "$0")/../.."
log() { printf 'e2e: %s\n' "$*" >&2; }
PY=.venv/bin/python
NODE=(nice -n 5 "$PY" scripts/e2e/node.py)

t0=$(date +%s)
scripts/e2e/setup.sh || { log "preparing the e2e node failed"; exit 1; }
t1=$(date +%s)

down() {
  local rc=$?
  trap - EXIT INT TERM
  t4=$(date +%s)
  "${NODE[@]}" down || rc=1
  t5=$(date +%s)
  log "times: prepare $((t1 - t0))s, node up $((${t2:-$t4} - t1))s, suite $(( ${t3:-$t4} - ${t2:-$t4} ))s, node down $((t5 - t4))s, total $((t5 - t0))s"
  exit "$rc"
}
trap down EXIT
trap 'exit 130' INT TERM

"${NODE[@]}" up || exit 1
t2=$(date +%s)
eval "$("$PY" scripts/e2e/node.py env)"
export MESHACCEL_E2E_KUBECONFIG="$KUBECONFIG" MESHACCEL_E2E_BIN=/var/cache/meshaccel/e2e/bin
"$PY" -m pytest -v -p no:cacheprovider tests/e2e --timeout=900 ${PYTEST_ARGS:-}
rc=$?
t3=$(date +%s)
exit $rc
