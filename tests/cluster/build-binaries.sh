#!/usr/bin/env bash
# Builds (once, cached) the pinned Kubernetes components, the helm CLI, CoreDNS and the pause binary.
# Output: $CACHE/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy,
# coredns,helm,pause,external-metrics-adapter} plus a stamp file per group naming the version
# (or source hash) it was built from.
# Usage: build-binaries.sh [pause] [helm] [k8s] [kube-proxy] [coredns] [adapter] [keda]   (no argument: all)
# "k8s" means everything the cluster runs from Go: the four components, kube-proxy, CoreDNS, the
# external metrics adapter (metrics-adapter/: what an HPA on an external metric reads) and KEDA's
# operator (keda-operator, from KEDA's Go module).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"

parts=" ${*:-pause helm k8s} "
[[ "$parts" == *" k8s "* ]] && parts+="kube-proxy coredns adapter keda "
want() { [[ "$parts" == *" $1 "* ]]; }

k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s' "$ld"
}

# go build of k8s.io/kubernetes/cmd/NAME... (one invocation, shared compile) into $BIN.
go_build_k8s() {
  local tmp="$BIN/.k8s-build" pkgs=() b
  rm -rf "$tmp"; mkdir -p "$tmp"
  for b in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (cd "$CLUSTER_DIR/gobuild" && go build -trimpath -ldflags="$(k8s_ldflags)" -o "$tmp/" "${pkgs[@]}")
  for b in "$@"; do mv -f "$tmp/$b" "$BIN/$b"; done
  rm -rf "$tmp"
}

all_built() { local b; for b in "$@"; do [[ -x "$BIN/$b" ]] || return 1; done; }

build_k8s() {
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
k8s_stamp="$BIN/.k8s-$K8S_VERSION"
# kube-proxy has a stamp of its own (it came later): adding it does not rebuild the other four.
proxy_stamp="$BIN/.kube-proxy-$K8S_VERSION"
want_proxy=0; want kube-proxy && { [[ -f "$proxy_stamp" && -x "$BIN/kube-proxy" ]] || want_proxy=1; }
if want k8s && ! { [[ -f "$k8s_stamp" ]] && all_built "${K8S_BINS[@]}"; }; then
  bins=("${K8S_BINS[@]}"); ((want_proxy)) && bins+=(kube-proxy)
  log "kubernetes $K8S_VERSION: building ${bins[*]} (cold build takes a while on 2 cores)"
  t0=$(date +%s)
  go_build_k8s "${bins[@]}"
  rm -f "$BIN"/.k8s-v*; touch "$k8s_stamp"
  if ((want_proxy)); then rm -f "$BIN"/.kube-proxy-v*; touch "$proxy_stamp"; want_proxy=0; fi
  log "kubernetes $K8S_VERSION: built in $(( $(date +%s) - t0 ))s"
elif want k8s; then
  log "kubernetes $K8S_VERSION: cached in $BIN"
fi
if ((want_proxy)); then
  log "kube-proxy $K8S_VERSION: building (shares the Go build cache with the other components)"
  t0=$(date +%s)
  go_build_k8s kube-proxy
  rm -f "$BIN"/.kube-proxy-v*; touch "$proxy_stamp"
  log "kube-proxy $K8S_VERSION: built in $(( $(date +%s) - t0 ))s"
elif want kube-proxy; then
  log "kube-proxy $K8S_VERSION: cached"
fi
}

# CoreDNS from its own Go module, with the plugins it ships (plugin.cfg of that release); the
# cluster's Corefile uses only kubernetes, template, bind, ready, errors and log.
build_coredns() {
coredns_stamp="$BIN/.coredns-$COREDNS_VERSION"
if [[ -f "$coredns_stamp" && -x "$BIN/coredns" ]]; then
  log "coredns $COREDNS_VERSION: cached"
  return
fi
log "coredns $COREDNS_VERSION: building"
t0=$(date +%s)
GOBIN="$BIN" GOFLAGS="-buildvcs=false" go install -trimpath \
  -ldflags="-s -w -X $COREDNS_MODULE/coremain.GitCommit=$COREDNS_VERSION" \
  "$COREDNS_MODULE@$COREDNS_VERSION"
# `coredns -plugins` prints one name a line (older releases: "  dns.NAME" under "Server types").
plugins="$("$BIN/coredns" -plugins | sed -n 's/^ *\(dns\.\)\{0,1\}\([a-z0-9_]*\)$/\2/p')"
grep -qx kubernetes <<<"$plugins" || die "coredns $COREDNS_VERSION has no kubernetes plugin compiled in: $(echo $plugins)"
rm -f "$BIN"/.coredns-v*; touch "$coredns_stamp"
log "coredns $COREDNS_VERSION: built in $(( $(date +%s) - t0 ))s ($(wc -l <<<"$plugins") plugins, kubernetes among them)"
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

# The external metrics adapter (metrics-adapter/main.go): rebuilt when its source or go.sum changes.
build_adapter() {
local src="$CLUSTER_DIR/metrics-adapter" stamp
stamp="$BIN/.external-metrics-adapter-$(cat "$src/main.go" "$src/main_test.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && -x "$BIN/external-metrics-adapter" ]]; then
  log "external-metrics-adapter: cached"
  return
fi
log "external-metrics-adapter: building (sigs.k8s.io/custom-metrics-apiserver; shares the Go build cache)"
t0=$(date +%s)
# Its unit tests (the rule subset, selector -> PromQL, Prometheus answers) run first: -trimpath
# like the build, so they share its compiled packages.
(cd "$src" && go test -trimpath -count=1 . && go build -trimpath -ldflags="-s -w" -o "$BIN/external-metrics-adapter" .)
rm -f "$BIN"/.external-metrics-adapter-*; touch "$stamp"
log "external-metrics-adapter: built in $(( $(date +%s) - t0 ))s"
}

# KEDA's operator from its own Go module (its go.mod has replace directives, so it is built as the
# main module, from a writable copy of the downloaded source). Only the operator: it scales a
# ScaledObject's workload between zero and its minimum itself; the HPA it makes for the rest needs
# KEDA's metrics server, whose own metrics listener binds every interface (no address flag).
build_keda() {
local stamp="$BIN/.keda-operator-$KEDA_VERSION"
if [[ -f "$stamp" && -x "$BIN/keda-operator" ]]; then
  log "keda-operator $KEDA_VERSION: cached"
  return
fi
log "keda-operator $KEDA_VERSION: building (KEDA compiles every scaler it ships: several minutes cold on 2 cores)"
t0=$(date +%s)
local dir src="$BIN/.keda-src"
dir="$(go mod download -json "$KEDA_MODULE@$KEDA_VERSION" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
rm -rf "$src"; cp -r "$dir" "$src"; chmod -R u+w "$src"
(cd "$src" && go build -trimpath -ldflags="-s -w" -o "$BIN/keda-operator" ./cmd/operator)
rm -rf "$src" "$BIN"/.keda-operator-v*; touch "$stamp"
log "keda-operator $KEDA_VERSION: built in $(( $(date +%s) - t0 ))s"
}

if want pause; then build_pause; fi
if want helm; then build_helm; fi
if want k8s || want kube-proxy; then build_k8s; fi
if want coredns; then build_coredns; fi
if want adapter; then build_adapter; fi
if want keda; then build_keda; fi
