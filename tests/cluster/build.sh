#!/usr/bin/env bash
# Cached build of everything the test cluster needs (see README.md here).
#   bash tests/cluster/build.sh            # deps + binaries + images
#   bash tests/cluster/build.sh deps       # Debian packages only (apt-get, needs root)
#   bash tests/cluster/build.sh binaries   # kube-apiserver, kube-controller-manager, kube-scheduler,
#                                          # kubelet, helm, pause -> $CACHE/bin
#   bash tests/cluster/build.sh images     # worker (Dockerfile, buildah) + pause OCI layouts -> $CACHE/images
# CACHE = ${RUNNABLE_K8S_CLUSTER_CACHE:-$HOME/.cache/runnable-k8s-cluster}; a second run reuses it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# buildah builds the worker image from the project's Dockerfile (worker-image.sh).
APT_PKGS=(etcd-server containerd runc containernetworking-plugins iptables debootstrap buildah openssl iproute2 tar)

deps() {
  local missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then log "debian packages: all present"; return; fi
  [[ $(id -u) == 0 ]] || die "need root to apt-get install: ${missing[*]}"
  log "debian packages: installing ${missing[*]}"
  local t0; t0=$(date +%s)
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  # policy-rc.d keeps the packages' own services (containerd, etcd) from being started.
  local prc=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' > $prc; chmod +x $prc; created=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || {
    ((created)) && rm -f $prc; die "apt-get install failed"; }
  ((created)) && rm -f $prc
  log "debian packages: installed in $(( $(date +%s) - t0 ))s"
}

binaries() { bash "$CLUSTER_DIR/build-binaries.sh" "$@"; }
images() { bash "$CLUSTER_DIR/build-images.sh"; }

what=("${@:-all}")
for w in "${what[@]}"; do
  case "$w" in
    deps) deps ;;
    binaries) binaries ;;
    images) images ;;
    all) deps; binaries; images ;;
    *) die "unknown build step: $w (deps|binaries|images|all)" ;;
  esac
done
