#!/usr/bin/env bash
# `make e2e`: prepare the node's binaries and images (cached), then run tests/e2e, which brings the node
# up (after a failure drill), installs meshaccel from deploy/, judges it, uninstalls it and brings the
# node down, checking that nothing is left and no packet from the pod range headed off the machine.
# Prints how long preparing and the suite took.
set -uo pipefail
cd "$(dirname "$0")/../.."
log() { printf 'e2e: %s\n' "$*" >&2; }
PY=.venv/bin/python

t0=$(date +%s)
scripts/e2e/setup.sh || { log "preparing the e2e node failed"; exit 1; }
t1=$(date +%s)
# Whatever happens to pytest (a crash, Ctrl-C), the node is stopped (a no-op if the suite stopped it).
trap '"$PY" scripts/e2e/node.py down >/dev/null 2>&1 || true' EXIT
MESHACCEL_E2E=1 nice -n 5 "$PY" -m pytest -v -p no:cacheprovider tests/e2e --timeout=900 --durations=5 ${PYTEST_ARGS:-}
rc=$?
t2=$(date +%s)
log "times: prepare (build, images; cached after the first run) $((t1 - t0))s, suite (node up, tests, node down) $((t2 - t1))s"
exit $rc
