#!/usr/bin/env bash
# CI entry point for the real-cluster tests (run after the fast suite, from the repo root):
#     bash tests/cluster/ci.sh
# 1. cached build (Debian packages, Kubernetes + helm + pause binaries, the external metrics adapter
#    and KEDA's operator, worker/pause images),
#    within a time budget (RUNNABLE_K8S_CLUSTER_BUILD_BUDGET seconds, default 3000 = 50 min);
# 2. brings the node tier up (falls back to the control plane alone if the node cannot start);
# 3. python -m pytest -m cluster tests/   (tiers that are not up make their tests skip, with the reason);
# 4. tears everything down and checks that nothing is left behind.
# Exits with pytest's status (5, "no tests collected", counts as success). On a machine where the
# tier can run (root, Go), a build or start-up failure FAILS CI with its reason after the tests
# ran (they skip and say why): the tier must not rot unseen. Skipping is a choice:
# RUNNABLE_K8S_SKIP_CLUSTER=1 skips the tier (the reason is printed); a machine that cannot run it
# (not root, no Go) skips with the reason too.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/cluster/lib.sh
T_START=$(date +%s)
if [[ -n "${VIRTUAL_ENV:-}" ]] && command -v python >/dev/null; then PY="$(command -v python)"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
export PYTHON="$PY"
BUDGET="${RUNNABLE_K8S_CLUSTER_BUILD_BUDGET:-3000}"
LOGDIR="$CACHE/ci-logs"; rm -rf "$LOGDIR"; mkdir -p "$LOGDIR"
unavailable=()
elapsed() { echo $(( $(date +%s) - T_START )); }
remaining() { local r=$(( BUDGET - $(elapsed) )); (( r > 0 )) && echo "$r" || echo 1; }

log "ci: cache $CACHE, build budget ${BUDGET}s, python $PY"
if [[ -n "${RUNNABLE_K8S_SKIP_CLUSTER:-}" && "${RUNNABLE_K8S_SKIP_CLUSTER}" != 0 ]]; then
  log "ci: SKIPPED: the real-cluster tier was skipped on purpose (RUNNABLE_K8S_SKIP_CLUSTER=$RUNNABLE_K8S_SKIP_CLUSTER)"
  exit 0
fi
# What makes this machine unable to run the tier at all (then its tests skip, saying why); any
# other reason the tier could not run is a failure.
unfit=()
if [[ $(id -u) != 0 ]]; then
  unfit+=("ci.sh is not running as root: the cluster needs root (mounts, cgroups, netns)")
fi
if ! command -v go >/dev/null; then
  unfit+=("no Go toolchain on PATH: the Kubernetes binaries are built from their Go modules")
fi
unavailable+=("${unfit[@]}")

# ---- build --------------------------------------------------------------------------------
build_ok=1
if ((${#unavailable[@]} == 0)); then
  if ! timeout "$(remaining)" bash tests/cluster/build.sh deps; then
    unavailable+=("Debian packages could not be installed (see the log above)"); build_ok=0
  fi
fi
if ((build_ok)) && ((${#unavailable[@]} == 0)); then
  timeout "$(remaining)" bash tests/cluster/build-binaries.sh pause || true
  # The image build (debootstrap, pip downloads: mostly network) overlaps the Go build (CPU).
  ( timeout "$(remaining)" bash tests/cluster/build-images.sh > "$LOGDIR/images.log" 2>&1 ) &
  img_pid=$!
  t0=$(date +%s)
  timeout "$(remaining)" bash tests/cluster/build-binaries.sh helm k8s; bin_rc=$?
  log "ci: binaries step finished (rc=$bin_rc) after $(( $(date +%s) - t0 ))s"
  wait "$img_pid"; img_rc=$?
  cat "$LOGDIR/images.log" >&2
  if ((bin_rc == 124)); then unavailable+=("cold build exceeded the ${BUDGET}s budget"); build_ok=0
  elif ((bin_rc != 0)); then unavailable+=("building the Kubernetes/helm binaries failed (rc=$bin_rc)"); build_ok=0; fi
  if ((img_rc != 0)); then
    log "ci: image build failed (rc=$img_rc): node-tier tests will skip"
    unavailable+=("building the worker/pause images failed (rc=$img_rc; see $LOGDIR/images.log)")
  fi
fi
log "ci: build phase done after $(elapsed)s"

# ---- up -----------------------------------------------------------------------------------
# One cluster per machine: hold its lock from here to the end (children inherit the right).
have_lock=1
exec 9>>"$LOCK_FILE"
if ! flock -n 9; then
  log "ci: waiting for the test cluster lock (held by: $(cat "$LOCK_FILE" 2>/dev/null || echo unknown))"
  if ! flock -w "${RUNNABLE_K8S_CLUSTER_LOCK_TIMEOUT:-1200}" 9; then
    have_lock=0
    unavailable+=("the test cluster stayed in use by another run: $(cat "$LOCK_FILE" 2>/dev/null)")
  fi
fi
if ((have_lock)); then
  : > "$LOCK_FILE"; echo "pid $$: tests/cluster/ci.sh" >> "$LOCK_FILE"
  export RUNNABLE_K8S_CLUSTER_LOCK_HELD=1
fi

cleanup() {
  ((have_lock)) || return 0
  log "ci: tearing the cluster down"
  "$PY" -m tests.cluster down --keep-logs "$LOGDIR/components" || true
  if left="$("$PY" -m tests.cluster leftovers 2>&1)"; then
    log "ci: teardown check: $left"
  else
    log "ci: TEARDOWN LEFT THINGS BEHIND: $left"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ((have_lock)) && { ((${#unavailable[@]} == 0)) || [[ -x "$BIN/kube-apiserver" ]]; }; then
  t0=$(date +%s)
  # A fresh cluster: one left up by hand would hold an older worker image.
  "$PY" -m tests.cluster down >/dev/null || true
  if ! "$PY" -m tests.cluster up --tier node > "$LOGDIR/up.json"; then
    log "ci: node tier did not come up; node-tier tests will skip. Trying the control plane alone."
    unavailable+=("the node tier failed to start (see 'up failed' in the CI log, $LOGDIR/components)")
    "$PY" -m tests.cluster up --tier control-plane > "$LOGDIR/up.json" \
      || unavailable+=("the control plane did not start (see the log above)")
  fi
  log "ci: cluster start took $(( $(date +%s) - t0 ))s"
fi

# ---- tests --------------------------------------------------------------------------------
if ((${#unavailable[@]})); then
  RUNNABLE_K8S_CLUSTER_UNAVAILABLE="$(printf '%s; ' "${unavailable[@]}")"
  RUNNABLE_K8S_CLUSTER_UNAVAILABLE="${RUNNABLE_K8S_CLUSTER_UNAVAILABLE%; }"
  export RUNNABLE_K8S_CLUSTER_UNAVAILABLE
  log "ci: unavailable: $RUNNABLE_K8S_CLUSTER_UNAVAILABLE"
fi
export RUNNABLE_K8S_CLUSTER_AUTOSTART=0
t0=$(date +%s)
# One rerun for a failed test: these drive a real API server, kubelet and containers on a shared
# 2-core machine, where a slow moment is not a bug. A test that fails twice fails CI; reruns are
# listed in the summary (-r R), so a flaky test stays visible.
log "ci: python -m pytest -m cluster tests/ --reruns 1"
"$PY" -m pytest -m cluster tests/ -rsR --reruns 1 --reruns-delay 2 --rerun-show-tracebacks
rc=$?
log "ci: cluster tests finished (rc=$rc) in $(( $(date +%s) - t0 ))s; total $(elapsed)s"
((rc == 5)) && rc=0
if ((${#unavailable[@]})); then
  if ((${#unfit[@]})); then
    log "ci: SKIPPED (this machine cannot run the tier): $(printf '%s; ' "${unfit[@]}")"
  else
    log "ci: FAILED: the real-cluster tier could not run here although this machine can run it:"
    log "ci:   $RUNNABLE_K8S_CLUSTER_UNAVAILABLE"
    log "ci:   (fix the cause, or set RUNNABLE_K8S_SKIP_CLUSTER=1 to skip the tier on purpose)"
    ((rc == 0)) && rc=1
  fi
fi
exit "$rc"
