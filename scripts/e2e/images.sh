#!/usr/bin/env bash
# Makes the e2e node's images without any registry, as archives in $E2E_CACHE/images/ that the node
# imports into containerd at start:
#   pause      upstream's pause.c (from the pinned k8s.io/kubernetes module), static, alone in the image
#   app        Debian's busybox-static (httpd, nc, wget, sha256sum ...)
#   meshaccel  deploy/Dockerfile, built by Debian's buildah on a Debian base made here by debootstrap
# pause and app are rebuilt when versions.env or this script change; meshaccel when its build context
# does (buildah's layer cache keeps the apt and pip layers while only the sources change).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
E2E_CACHE=${E2E_CACHE:-/var/cache/meshaccel/e2e}
log() { printf 'e2e images: %s\n' "$*" >&2; }
images="$E2E_CACHE/images"
mkdir -p "$images"
# buildah keeps its storage in the cache too: nothing of it lands in /var/lib/containers.
BUILDAH=(buildah --root "$E2E_CACHE/buildah/root" --runroot "$E2E_CACHE/buildah/run" --storage-driver overlay)
export BUILDAH_ISOLATION=chroot  # RUN steps in a chroot: no runtime, cgroup or network namespace needed
# Pod images are named as the manifests name them; `localhost/` keeps ours apart from registry names.
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
APP_IMAGE=localhost/meshaccel-e2e-app:1
MESHACCEL_IMAGE=docker.io/library/meshaccel:0.1.0
BASE_IMAGE=docker.io/library/debian:bookworm-slim
export PAUSE_IMAGE APP_IMAGE MESHACCEL_IMAGE

# Whatever happens, leave no working container and no mount behind: containers/storage bind-mounts
# its overlay folder onto itself while in use, and a failed step leaves its container mounted.
release_storage() {
  "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
  local overlay="$E2E_CACHE/buildah/root/overlay"
  grep -F " $overlay/" /proc/self/mountinfo | awk '{print $5}' | xargs -r -n1 umount 2>/dev/null || true
  if grep -qF " $overlay " /proc/self/mountinfo; then umount "$overlay" 2>/dev/null || true; fi
}
trap release_storage EXIT

stamp_ok() { [ -f "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3" ]; }

# archive NAME IMAGE: docker-archive tar that `ctr images import` reads with the image's name.
archive() {
  rm -f "$images/$1.tar"
  "${BUILDAH[@]}" push -q "$2" "docker-archive:$images/$1.tar:$2" >/dev/null
}

script_key=$( (cat "$here/versions.env" "$here/images.sh") | sha256sum | cut -c1-16)

# --- pause -------------------------------------------------------------------------------------
if ! stamp_ok "$images/pause.tar" "$images/pause.key" "$script_key"; then
  log "pause from upstream pause.c ($KUBE_VERSION)"
  src=$(GOMODCACHE="$E2E_CACHE/go/mod" GOTOOLCHAIN=local GOFLAGS=-mod=mod \
        go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  tag=$(sed -n 's/^TAG ?= //p' "$src/build/pause/Makefile")
  work=$(mktemp -d)
  # Upstream's flags (build/pause/Makefile); the version names this build.
  gcc -Os -Wall -Werror -static -DVERSION="v$tag-meshaccel-e2e" -o "$work/pause" "$src/build/pause/linux/pause.c"
  c=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy -q "$c" "$work/pause" /pause >/dev/null
  "${BUILDAH[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  "${BUILDAH[@]}" commit -q --rm "$c" "$PAUSE_IMAGE" >/dev/null
  archive pause "$PAUSE_IMAGE"
  rm -rf "$work"
  echo "$script_key" > "$images/pause.key"
fi

# --- app (busybox) -----------------------------------------------------------------------------
if ! stamp_ok "$images/app.tar" "$images/app.key" "$script_key"; then
  log "app image from Debian's busybox-static"
  c=$("${BUILDAH[@]}" from scratch)
  root=$("${BUILDAH[@]}" mount "$c")
  mkdir -p "$root/bin" "$root/tmp" "$root/www" "$root/etc"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  "${BUILDAH[@]}" umount "$c" >/dev/null
  "${BUILDAH[@]}" config --env PATH=/bin --cmd '["sh"]' "$c"
  "${BUILDAH[@]}" commit -q --rm "$c" "$APP_IMAGE" >/dev/null
  archive app "$APP_IMAGE"
  echo "$script_key" > "$images/app.key"
fi

# --- the Debian base for deploy/Dockerfile ---------------------------------------------------------
if ! "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  log "Debian base ($BASE_IMAGE) by debootstrap"
  work=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$work/root" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; log "debootstrap failed (log above)"; exit 1; }
  # The base installs from the mirrors, with the apt and pip settings and the trusted CAs of this host,
  # like the host does (a registry behind a TLS proxy needs the proxy's CA).
  cp -a /etc/apt/sources.list.d/. "$work/root/etc/apt/sources.list.d/"
  [ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$work/root/etc/pip.conf"
  mkdir -p "$work/root/usr/local/share/ca-certificates"
  cp /etc/ssl/certs/ca-certificates.crt "$work/root/usr/local/share/ca-certificates/host-trusted.crt"
  [ ! -s /etc/apt/sources.list ] || cp /etc/apt/sources.list "$work/root/etc/apt/sources.list"
  find /etc/apt/apt.conf.d -maxdepth 1 -type f -name '99*' -exec cp {} "$work/root/etc/apt/apt.conf.d/" \;
  [ ! -f /etc/apt/sources.list.d/debian.sources ] || : > "$work/root/etc/apt/sources.list"
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  c=$("${BUILDAH[@]}" from scratch)
  root=$("${BUILDAH[@]}" mount "$c")
  cp -a "$work/root/." "$root/"
  "${BUILDAH[@]}" umount "$c" >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["bash"]' "$c"
  "${BUILDAH[@]}" commit -q --rm "$c" "$BASE_IMAGE" >/dev/null
  rm -rf "$work"
fi

# --- meshaccel, from deploy/Dockerfile ------------------------------------------------------------
context_key=$(cd "$repo" && { sha256sum deploy/Dockerfile pyproject.toml README.md;
  find accel sockops_bpf meshxds certs bench -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; } \
  | sha256sum | cut -c1-16)
if ! stamp_ok "$images/meshaccel.tar" "$images/meshaccel.key" "$context_key"; then
  log "meshaccel image from deploy/Dockerfile"
  (cd "$repo" && "${BUILDAH[@]}" bud --layers --force-rm --pull=false --network host -q -f deploy/Dockerfile \
      -t "$MESHACCEL_IMAGE" . ) >/dev/null
  archive meshaccel "$MESHACCEL_IMAGE"
  echo "$context_key" > "$images/meshaccel.key"
  # Keep the layer cache, drop dangling images of earlier builds.
  "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
fi
log "images ready in $images"
