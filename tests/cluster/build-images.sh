#!/usr/bin/env bash
# Builds (cached) the test cluster's images:
#   worker: the project's own Dockerfile, built with buildah from a local python:3.11-slim
#           stand-in (worker-image.sh)  -> $CACHE/images/worker-dockerfile.oci,
#           imported as runnable-k8s-worker:latest
#   pause:  one static Go binary (built by build-binaries.sh), written without any container
#           engine by oci.py  -> $CACHE/images/pause.oci, imported as runnable-k8s-pause:test
# The pause image stays engine-free on purpose: it is one file and no Dockerfile, containerd
# needs it before any Pod runs, and building it with buildah would only add a step.
# cluster.py streams the OCI layouts into `ctr images import`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
IMG="$CACHE/images"; mkdir -p "$IMG"
PY="${PYTHON:-python3}"

# ---- worker image: the Dockerfile, built with buildah ------------------------------------
bash "$CLUSTER_DIR/worker-image.sh"

# ---- pause image ---------------------------------------------------------------------------
[[ -x "$BIN/pause" ]] || bash "$CLUSTER_DIR/build-binaries.sh" pause
pause_id="$(sha256sum "$BIN/pause" | cut -c1-16)"
if [[ "$(cat "$IMG/pause.id" 2>/dev/null)" != "$pause_id" || ! -f "$IMG/pause.oci/index.json" ]]; then
  p="$IMG/pause.tmp"; rm -rf "$p"; mkdir -p "$p/root"
  install -m 0755 "$BIN/pause" "$p/root/pause"
  tar --numeric-owner -C "$p/root" -cf "$p/layer.tar" .
  "$PY" "$CLUSTER_DIR/oci.py" "$IMG/pause.oci" "docker.io/library/runnable-k8s-pause:test" \
    '{"Entrypoint":["/pause"],"WorkingDir":"/"}' "$p/layer.tar" >/dev/null
  rm -rf "$p"; echo "$pause_id" > "$IMG/pause.id"
  log "pause image: OCI layout written"
fi
log "images ready in $IMG"
