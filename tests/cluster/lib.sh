# Shared shell helpers for the test cluster scripts (sourced, not run).
# shellcheck shell=bash
CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_DIR/../.." && pwd)"
# shellcheck source=versions.env
. "$CLUSTER_DIR/versions.env"
CACHE="${RUNNABLE_K8S_CLUSTER_CACHE:-$HOME/.cache/runnable-k8s-cluster}"
BIN="$CACHE/bin"
STATE_DIR="${RUNNABLE_K8S_CLUSTER_STATE:-/tmp/rk8s-cluster}"
LOCK_FILE="${RUNNABLE_K8S_CLUSTER_LOCK:-$STATE_DIR.lock}"
mkdir -p "$BIN"

log() { printf '%s [cluster] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
