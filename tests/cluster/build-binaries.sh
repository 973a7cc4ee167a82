#!/usr/bin/env bash
# Builds (once, cached) the pinned Kubernetes components, the helm CLI and the pause binary.
# Output: $CACHE/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,helm,pause}
# plus a stamp file per group naming the version it was built from.
# Usage: build-binaries.sh [pause] [helm] [k8s]     (no argument: all three)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"

parts=" ${*:-pause helm k8s} "
want() { [[ "$parts" == *" $1 "* ]]; }

build_k8s() {
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
k8s_stamp="$BIN/.k8s-$K8S_VERSION"
if [[ -f "$k8s_stamp" ]] && for b in "${K8S_BINS[@]}"; do [[ -x "$BIN/$b" ]] || exit 1; done; then
  log "kubernetes $K8S_VERSION: cached in $BIN"
else
  log "kubernetes $K8S_VERSION: building ${K8S_BINS[*]} (cold build takes a while on 2 cores)"
  t0=$(date +%s)
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  tmp="$BIN/.k8s-build"; rm -rf "$tmp"; mkdir -p "$tmp"
  pkgs=(); for b in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (cd "$CLUSTER_DIR/gobuild" && go build -trimpath -ldflags="$ld" -o "$tmp/" "${pkgs[@]}")
  for b in "${K8S_BINS[@]}"; do mv -f "$tmp/$b" "$BIN/$b"; done
  rm -rf "$tmp" "$BIN"/.k8s-v*; touch "$k8s_stamp"
  log "kubernetes $K8S_VERSION: built in $(( $(date +%s) - t0 ))s"
fi

}

build_helm() {
helm_stamp="$BIN/.helm-$HELM_VERSION"
if [[ -f "$helm_stamp" && -x "$BIN/helm" ]]; then
  log "helm $HELM_VERSION: cached"
else
  log "helm $HELM_VERSION: building"
  t0=$(date +%s)
  GOBIN="$BIN" GOFLAGS="-buildvcs=false" go install -trimpath \
    -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "$HELM_MODULE/cmd/helm@$HELM_VERSION"
  rm -f "$BIN"/.helm-v*; touch "$helm_stamp"
  log "helm $HELM_VERSION: built in $(( $(date +%s) - t0 ))s"
fi

}

build_pause() {
pause_src="$CLUSTER_DIR/pause/main.go"
pause_stamp="$BIN/.pause-$(sha256sum "$pause_src" | cut -c1-16)"
if [[ -f "$pause_stamp" && -x "$BIN/pause" ]]; then
  log "pause: cached"
else
  (cd "$CLUSTER_DIR/pause" && GOFLAGS=-buildvcs=false go build -trimpath -ldflags="-s -w" -o "$BIN/pause" .)
  rm -f "$BIN"/.pause-*; touch "$pause_stamp"
  log "pause: built"
fi
}

if want pause; then build_pause; fi
if want helm; then build_helm; fi
if want k8s; then build_k8s; fi
