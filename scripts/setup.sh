#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages, bpffs, the Python venv.
# Every command in the README goes through here first, so nothing has to be installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'setup: %s\n' "$*" >&2; }

# tcpdump: the mTLS tests look at the wire; graphviz: `dot` draws the map of `accel observe --map`.
APT_PACKAGES=(python3-bpfcc linux-headers-amd64 bpftool iproute2 iptables nftables iperf3 sockperf
              procps kmod openssl tcpdump graphviz)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { log "need root to install: ${missing[*]} (run as root or install them)"; exit 1; }
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# bpffs: pins live under /sys/fs/bpf/meshaccel.
if [ "$(id -u)" = 0 ] && ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.meshaccel-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c 'import accel, grpc, kubernetes' || { log "Python packages failed to install"; exit 1; }
  # bcc is a Debian package: expose only its module (not all of dist-packages) to the venv.
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$VENV/debian-bcc"
  ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/debian-bcc/bcc"
  echo "$(pwd)/$VENV/debian-bcc" > "$site/meshaccel-debian-bcc.pth"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || { log "bcc is not importable from $VENV (python3-bpfcc missing?)"; exit 1; }
