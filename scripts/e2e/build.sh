#!/usr/bin/env bash
# Builds the e2e node's Go binaries from the Go module proxy, once per machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl, crictl. Output: $E2E_CACHE/bin-<key>/,
# where <key> hashes versions.env, this script and the Go version; `current` points at the last good one.
# Each upstream module is built through a wrapper module that requires it and replaces every module the
# upstream go.mod points at a folder of its own repository (k8s.io/api => ./staging/src/k8s.io/api,
# go.etcd.io/etcd/api/v3 => ../api) with its published twin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
E2E_CACHE=${E2E_CACHE:-/var/cache/meshaccel/e2e}
log() { printf 'e2e build: %s\n' "$*" >&2; }

key=$( (cat "$here/versions.env" "$here/build.sh"; go version) | sha256sum | cut -c1-12)
out="$E2E_CACHE/bin-$key"
if [ -f "$out/.complete" ]; then
  ln -sfn "bin-$key" "$E2E_CACHE/bin"
  exit 0
fi

export GOMODCACHE="$E2E_CACHE/go/mod" GOCACHE="$E2E_CACHE/go/build" GOTOOLCHAIN=local GOFLAGS='-buildvcs=false -mod=mod'
export GOPROXY=${GOPROXY:-https://proxy.golang.org}
mkdir -p "$out" "$E2E_CACHE/src"
NICE=(nice -n 10)

# wrapper DIR MODULE VERSION TWIN_VERSION: a module in DIR that requires MODULE@VERSION with the upstream
# go.mod's godebug lines and a replace of each of its in-repository modules to MODULE'@TWIN_VERSION.
wrapper() {
  local dir=$1 mod=$2 ver=$3 twin=$4 gomod
  gomod=$(go mod download -json "$mod@$ver" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
  [ -n "$gomod" ] || { log "the Go module proxy did not serve $mod@$ver"; exit 1; }
  rm -rf "$dir" && mkdir -p "$dir"
  {
    echo "module meshaccel.e2e/wrapper"
    echo
    grep -E '^go [0-9.]+$' "$gomod"
    grep -E '^godebug ' "$gomod" || true
    echo
    echo "require $mod $ver"
    echo
    echo "replace ("
    # Lines like `k8s.io/api => ./staging/src/k8s.io/api` or `go.etcd.io/etcd/api/v3 => ../api`.
    awk -v twin="$twin" '$2 == "=>" && $3 ~ /^\.\.?\// && $3 !~ /FORBIDDEN/ {print "\t" $1 " => " $1 " " twin}
                         $1 == "replace" && $3 == "=>" && $4 ~ /^\.\.?\// && $4 !~ /FORBIDDEN/ {print "\t" $2 " => " $2 " " twin}' "$gomod"
    echo ")"
  } > "$dir/go.mod"
  # No package of its own: `go build -mod=mod` adds the requirements of what it builds (minimal versions
  # as the upstream module states them) and their go.sum lines.
}

# Versions in the binaries, as upstream's hack/lib/version.sh sets them when it knows no git commit (a
# module has none); the build date is the release's time from the module proxy, so builds are reproducible.
kube_ldflags() {
  local info time major minor
  info=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\t"Info": "\(.*\)",$/\1/p')
  time=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")
  major=${KUBE_VERSION#v}; major=${major%%.*}
  minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
  local f=""
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    f+=" -X '$pkg.buildDate=$time' -X '$pkg.gitVersion=$KUBE_VERSION'"
    f+=" -X '$pkg.gitMajor=$major' -X '$pkg.gitMinor=$minor'"
  done
  echo "all=$f -s -w"
}

t0=$(date +%s)
log "Kubernetes $KUBE_VERSION (staging modules $KUBE_STAGING_VERSION) into $out"
kw="$E2E_CACHE/src/kubernetes-$KUBE_VERSION"
wrapper "$kw" k8s.io/kubernetes "$KUBE_VERSION" "$KUBE_STAGING_VERSION"
ldf=$(kube_ldflags)
tags=selinux,notest,grpcnotrace
# Upstream builds these static (CGO_ENABLED=0) and the kubelet with cgo.
(cd "$kw" && CGO_ENABLED=0 "${NICE[@]}" go build -trimpath -tags "$tags" -ldflags "$ldf" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
log "control plane and kubectl built ($(( $(date +%s) - t0 ))s)"
(cd "$kw" && CGO_ENABLED=1 "${NICE[@]}" go build -trimpath -tags "$tags" -ldflags "$ldf" -o "$out/" \
    k8s.io/kubernetes/cmd/kubelet)
log "kubelet built ($(( $(date +%s) - t0 ))s)"

ew="$E2E_CACHE/src/etcd-$ETCD_VERSION"
wrapper "$ew" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
(cd "$ew" && CGO_ENABLED=0 "${NICE[@]}" go build -trimpath \
    -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" -o "$out/etcd" go.etcd.io/etcd/server/v3)
log "etcd built ($(( $(date +%s) - t0 ))s)"

cw="$E2E_CACHE/src/cri-tools-$CRICTL_VERSION"
wrapper "$cw" sigs.k8s.io/cri-tools "$CRICTL_VERSION" "$CRICTL_VERSION"
(cd "$cw" && CGO_ENABLED=0 "${NICE[@]}" go build -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION#v}" -o "$out/crictl" \
    sigs.k8s.io/cri-tools/cmd/crictl)
log "crictl built ($(( $(date +%s) - t0 ))s)"

"$out/kube-apiserver" --version >&2
"$out/etcd" --version | head -1 >&2
touch "$out/.complete"
ln -sfn "bin-$key" "$E2E_CACHE/bin"
log "done in $(( $(date +%s) - t0 ))s"
