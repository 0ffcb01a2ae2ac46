#!/usr/bin/env bash
# Prepares this machine for `make e2e`, idempotently and once: the Debian packages of the node
# (containerd, runc, CNI plugins) and of the image builds (buildah, debootstrap, busybox-static), then the
# Go binaries (build.sh, cached per pinned versions) and the images (images.sh). Runs after
# scripts/setup.sh, which installs everything `make test` needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { printf 'e2e setup: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "run as root: the e2e node is a real kubelet"; exit 1; }
APT_PACKAGES=(containerd runc containernetworking-plugins buildah debootstrap busybox-static libc6-dev gcc
              iptables nftables iproute2 bpftool ca-certificates)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # policy-rc.d: the packages' own services (containerd) are not started; the e2e node starts its own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.meshaccel-e2e
  chmod +x /usr/sbin/policy-rc.d.meshaccel-e2e
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ "$had_policy" = 1 ] || cp /usr/sbin/policy-rc.d.meshaccel-e2e /usr/sbin/policy-rc.d
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  [ "$had_policy" = 1 ] || rm -f /usr/sbin/policy-rc.d
  rm -f /usr/sbin/policy-rc.d.meshaccel-e2e
fi
# The Go toolchain comes with the machine (Debian's is too old for Kubernetes).
command -v go >/dev/null || { log "no Go toolchain on PATH: Kubernetes is built from the Go module proxy"; exit 1; }

t0=$(date +%s)
scripts/e2e/build.sh
t1=$(date +%s)
scripts/e2e/images.sh
t2=$(date +%s)
log "binaries ready in $((t1 - t0))s, images in $((t2 - t1))s"
