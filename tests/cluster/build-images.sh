#!/usr/bin/env bash
# Builds (cached) the test cluster's images without any container engine:
#   worker: Debian bookworm minbase (debootstrap) + python3 + a venv at /opt/venv holding the
#           project's wheel and its dependencies from PyPI  -> runnable-k8s-worker:latest
#   pause:  one static Go binary (built by build-binaries.sh)  -> runnable-k8s-pause:test
# Output: OCI image layout folders $CACHE/images/{worker,pause}.oci (+ .id files naming the
# content they were built from); cluster.py streams them into `ctr images import`.
# The Debian base layer is cached by recipe; the app layer is rebuilt only when the wheel's
# content (or the dependency set pip resolves) changes.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
IMG="$CACHE/images"; mkdir -p "$IMG"
PY="${PYTHON:-python3}"
MIRROR="${RUNNABLE_K8S_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PKGS="python3,python3-venv,ca-certificates"
# Run a command inside the image's root filesystem with a clean environment (the host's PIP_*
# settings and the like must not leak into the image).
in_root() { local r="$1"; shift; env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$r" "$@"; }

# ---- base layer: debootstrap, cached by recipe ------------------------------------------
base_id="$(printf '%s|%s|%s|%s' "$DEBIAN_SUITE" "$BASE_PKGS" "$IMAGE_RECIPE" "$MIRROR" | sha256sum | cut -c1-16)"
base="$IMG/base-$base_id"
if [[ -f "$base/layer.tar" ]]; then
  log "worker image: base layer cached ($base)"
else
  command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
  log "worker image: debootstrap --variant=minbase $DEBIAN_SUITE (+$BASE_PKGS)"
  t0=$(date +%s)
  rm -rf "$IMG"/base-*.tmp "$base"; mkdir -p "$base.tmp"
  debootstrap --variant=minbase --include="$BASE_PKGS" "$DEBIAN_SUITE" "$base.tmp/rootfs" "$MIRROR" \
    > "$base.tmp/debootstrap.log" 2>&1 || { tail -20 "$base.tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  r="$base.tmp/rootfs"
  in_root "$r" /usr/bin/python3 -m venv /opt/venv
  in_root "$r" /opt/venv/bin/python -m pip --version >/dev/null
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/var/log/*.log "$r"/tmp/*
  # A container runtime mounts /dev, /proc, /sys, /etc/resolv.conf and /etc/hosts itself.
  printf '# runnable-k8s test image: no DNS\n' > "$r/etc/resolv.conf"
  tar --numeric-owner -C "$r" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$base.tmp/layer.tar" .
  mv "$base.tmp" "$base"
  find "$IMG" -maxdepth 1 -name 'base-*' ! -name "base-$base_id" -exec rm -rf {} +
  log "worker image: base layer built in $(( $(date +%s) - t0 ))s ($(du -sh "$base/layer.tar" | cut -f1))"
fi

# ---- app layer: the project's wheel + dependencies in /opt/venv ---------------------------
t0=$(date +%s)
wh="$IMG/wheelhouse"; mkdir -p "$wh"
proj="$IMG/project-wheel"; rm -rf "$proj"; mkdir -p "$proj"
log "worker image: building the project wheel from $REPO_ROOT"
if ! "$PY" -m pip wheel --quiet --no-deps "$REPO_ROOT" -w "$proj" >"$IMG/wheel.log" 2>&1; then
  # The project is being written while this runs; a missing README (or the like) must not
  # keep the image from holding whatever packages exist.  Build from a copy with placeholders.
  log "worker image: wheel build of the tree failed (see $IMG/wheel.log); retrying from a copy with placeholder files"
  src="$IMG/project-src"; rm -rf "$src"; mkdir -p "$src"
  (cd "$REPO_ROOT" && cp -r pyproject.toml worker pool "$src/" 2>/dev/null || true)
  [[ -f "$REPO_ROOT/README.md" ]] && cp "$REPO_ROOT/README.md" "$src/" || echo "runnable-k8s" > "$src/README.md"
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  "$PY" -m pip wheel --quiet --no-deps "$src" -w "$proj" >&2
fi
whl="$(ls "$proj"/*.whl | head -1)"
# The image carries the project's optional "openai" extra too (langchain-openai), as a user's
# image extended with `pip install langchain-openai` would: the seed's ChatOpenAI chain runs in it.
extras="${RUNNABLE_K8S_IMAGE_EXTRAS:-openai}"
spec="$whl${extras:+[$extras]}"
# Dependencies as wheels: offline from the wheelhouse when it already has them, else from PyPI.
"$PY" -m pip wheel --quiet --no-index --find-links "$wh" -w "$wh" "$spec" >/dev/null 2>&1 \
  || "$PY" -m pip wheel --quiet --find-links "$wh" -w "$wh" "$spec" >&2
rm -f "$wh"/runnable_k8s-*.whl
app_id="$("$PY" "$CLUSTER_DIR/wheelhash.py" "$whl" "$wh" "$base_id")"
app="$IMG/app-$app_id"
if [[ -f "$app/layer.tar" ]]; then
  log "worker image: app layer cached (wheel content unchanged: $app_id)"
else
  log "worker image: installing $(basename "$whl") + dependencies into /opt/venv"
  rm -rf "$IMG"/app-*.tmp; mkdir -p "$app.tmp"
  r="$app.tmp/rootfs"; mkdir -p "$r"
  tar -C "$r" -xf "$base/layer.tar"
  mkdir -p "$r/tmp/wheels"; cp "$wh"/*.whl "$r/tmp/wheels/" 2>/dev/null || true; cp "$whl" "$r/tmp/wheels/"
  in_root "$r" /opt/venv/bin/python -m pip install --quiet --no-index --find-links /tmp/wheels \
    --disable-pip-version-check --no-warn-script-location "/tmp/wheels/$(basename "$whl")${extras:+[$extras]}" >&2
  rm -rf "$r/tmp/wheels" "$r/root/.cache"
  in_root "$r" /opt/venv/bin/python -c 'import importlib.util as u; print("worker package:", "present" if u.find_spec("worker") else "MISSING")' >&2
  tar --numeric-owner -C "$r" -cf "$app.tmp/layer.tar" ./opt/venv
  rm -rf "$r"; mv "$app.tmp" "$app"
  find "$IMG" -maxdepth 1 -name 'app-*' ! -name "app-$app_id" -exec rm -rf {} +
  log "worker image: app layer built in $(( $(date +%s) - t0 ))s ($(du -sh "$app/layer.tar" | cut -f1))"
fi
worker_id="$base_id-$app_id"
if [[ "$(cat "$IMG/worker.id" 2>/dev/null)" != "$worker_id" || ! -f "$IMG/worker.oci/index.json" ]]; then
  "$PY" "$CLUSTER_DIR/oci.py" "$IMG/worker.oci" \
    "docker.io/library/runnable-k8s-worker:latest" \
    '{"Env":["PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8","PYTHONUNBUFFERED=1","VIRTUAL_ENV=/opt/venv"],"Cmd":["python","-m","worker"],"WorkingDir":"/"}' \
    "$base/layer.tar" "$app/layer.tar" >/dev/null
  echo "$worker_id" > "$IMG/worker.id"
  log "worker image: OCI layout written ($worker_id)"
fi

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
