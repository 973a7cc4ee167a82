#!/usr/bin/env bash
# Builds (cached) the test cluster's worker image from the project's own Dockerfile with buildah,
# so the cluster tests run exactly the image users build (`docker build .`):
#   1. base:   a stand-in for python:3.11-slim (no registry but the package ones is reachable):
#              debootstrap bookworm minbase + Debian's python3 (3.11), python3-venv, python3-pip,
#              python-is-python3, ca-certificates, no EXTERNALLY-MANAGED marker (python:slim has
#              none); imported into buildah's storage as $BASE_IMAGE.
#   2. build:  `buildah build --build-arg BASE_IMAGE=$BASE_IMAGE --build-arg EXTRAS=openai
#              --pull=never --isolation chroot --network host` of Dockerfile -> $IMAGE.
#   3. export: `buildah push` to an OCI layout ($OUT) that cluster.py's import_image streams into
#              `ctr images import`, named docker.io/library/runnable-k8s-worker:latest.
# buildah's storage lives under $CACHE/buildah (never /var/lib/containers). Each step is skipped
# when its key is unchanged: base by recipe; build and export by a content hash of the Dockerfile,
# what it COPYs, the build arguments and the base recipe (tests/cluster/image_key.py).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
IMG="$CACHE/images"; mkdir -p "$IMG"
PY="${PYTHON:-python3}"
MIRROR="${RUNNABLE_K8S_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PKGS="python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
BASE_IMAGE="localhost/rk8s-python:3.11-slim"
IMAGE="localhost/runnable-k8s-worker:latest"
NAME="docker.io/library/runnable-k8s-worker:latest"
# A name of its own: a cache from before the Dockerfile build holds an engine-free worker.oci.
OUT="$IMG/worker-dockerfile.oci"
EXTRAS="${RUNNABLE_K8S_IMAGE_EXTRAS:-openai}"
BH="$CACHE/buildah"
mkdir -p "$BH/storage" "$BH/run" "$BH/tmp"
# One build at a time per cache (buildah's storage is locked, but the layout's .tmp is not).
exec 8>"$BH/lock"
flock -w 1200 8 || die "another worker image build holds $BH/lock for 20 min"
command -v buildah >/dev/null || die "buildah missing (bash tests/cluster/build.sh deps, or apt-get install buildah)"
# The storage driver is fixed at the storage's first use: overlay where the kernel allows it
# (root, ext4/xfs), else vfs (works anywhere, copies every layer in full).
if [[ ! -s "$BH/driver" ]]; then
  if buildah --root "$BH/probe" --runroot "$BH/probe-run" --storage-driver overlay info >/dev/null 2>&1; then
    echo overlay > "$BH/driver"; else echo vfs > "$BH/driver"; fi
  rm -rf "$BH/probe" "$BH/probe-run"
fi
DRIVER="$(cat "$BH/driver")"
export TMPDIR="$BH/tmp"  # buildah's big temporary files (commit, push) stay in the cache too
# As root, containers/image keeps a blob-info cache in /var/lib/containers/cache and buildah has
# no flag to move it: each buildah call runs in a private mount namespace where /var/lib is an
# empty tmpfs and /var/lib/containers is $BH/varlib, so nothing of it lands on the machine.
mkdir -p "$BH/varlib"
in_ns() {
  unshare --mount --propagation private bash -c 'mount -t tmpfs -o size=1m,mode=0755 rk8s-varlib /var/lib \
    && mkdir /var/lib/containers && mount --bind "$0" /var/lib/containers && exec "$@"' "$BH/varlib" "$@"
}
BH_FLAGS=(--root "$BH/storage" --runroot "$BH/run" --storage-driver "$DRIVER")
bh() { in_ns buildah "${BH_FLAGS[@]}" "$@"; }
label_of() { bh inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

# ---- 1. base image: debootstrap root -> buildah storage, cached by recipe -------------------
base_id="$(printf '%s|%s|%s|%s|pybase-1' "$DEBIAN_SUITE" "$BASE_PKGS" "$IMAGE_RECIPE" "$MIRROR" | sha256sum | cut -c1-16)"
if [[ "$(label_of "$BASE_IMAGE" io.runnable-k8s.recipe)" == "$base_id" ]]; then
  log "worker image: base $BASE_IMAGE cached ($base_id)"
else
  command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
  log "worker image: base: debootstrap --variant=minbase $DEBIAN_SUITE (+$BASE_PKGS)"
  t0=$(date +%s)
  r="$IMG/pybase.tmp"; rm -rf "$r"; mkdir -p "$r"
  debootstrap --variant=minbase --include="$BASE_PKGS" "$DEBIAN_SUITE" "$r/rootfs" "$MIRROR" \
    > "$r/debootstrap.log" 2>&1 || { tail -20 "$r/debootstrap.log" >&2; die "debootstrap failed"; }
  root="$r/rootfs"
  # python:slim lets pip install into the system Python; Debian marks it externally managed.
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/*.log "$root"/tmp/* "$root"/root/.cache
  # A container runtime mounts /etc/resolv.conf and /etc/hosts itself.
  printf '# runnable-k8s test base image: the runtime provides DNS\n' > "$root/etc/resolv.conf"
  tar --numeric-owner -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$r/rootfs.tar" .
  log "worker image: base: root filesystem in $(( $(date +%s) - t0 ))s ($(du -sh "$r/rootfs.tar" | cut -f1)); importing"
  ctr_name="rk8s-pybase-$$"
  bh rm "$ctr_name" >/dev/null 2>&1 || true
  bh from --name "$ctr_name" scratch >/dev/null
  # The container's mount exists only in the namespace: mount, untar and unmount in the same one.
  in_ns bash -c 'set -e; mnt="$(buildah "${@:3}" mount "$1")"; tar --numeric-owner -xpf "$2" -C "$mnt"
    buildah "${@:3}" umount "$1" >/dev/null' sh "$ctr_name" "$r/rootfs.tar" "${BH_FLAGS[@]}"
  # The config python:3.11-slim has (PATH, LANG, CMD), plus the recipe to find it cached.
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' --os linux --arch amd64 \
    --label io.runnable-k8s.recipe="$base_id" "$ctr_name"
  bh commit --quiet --rm "$ctr_name" "$BASE_IMAGE" >/dev/null
  bh rmi --prune >/dev/null 2>&1 || true  # the previous base, now untagged
  rm -rf "$r"
  log "worker image: base $BASE_IMAGE built in $(( $(date +%s) - t0 ))s"
fi

# ---- 2. buildah build of the Dockerfile, cached by content -------------------------------
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXTRAS=$EXTRAS")
key="$("$PY" "$CLUSTER_DIR/image_key.py" "$REPO_ROOT" "${build_args[*]}|$base_id|$DRIVER" \
  Dockerfile .dockerignore pyproject.toml README.md worker pool)"
if [[ "$(cat "$OUT.id" 2>/dev/null)" == "$key" && -f "$OUT/index.json" ]]; then
  log "worker image: $OUT cached (Dockerfile and its inputs unchanged: $key)"
  exit 0
fi
if [[ "$(label_of "$IMAGE" io.runnable-k8s.key)" == "$key" ]]; then
  log "worker image: buildah build cached ($IMAGE, $key)"
else
  log "worker image: buildah build of $REPO_ROOT/Dockerfile (EXTRAS=$EXTRAS, base $BASE_IMAGE)"
  t0=$(date +%s)
  # pip in the build stage reaches PyPI through the host's network; the host's CA bundle is
  # bind-mounted for the RUN steps only (a TLS-inspecting proxy's CA, if any, never enters a layer).
  vol=()
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && \
    vol=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  bh build --pull=never --isolation chroot --network host "${vol[@]}" "${build_args[@]}" \
    --label io.runnable-k8s.key="$key" -f "$REPO_ROOT/Dockerfile" -t "$IMAGE" "$REPO_ROOT" \
    > "$IMG/worker-dockerfile.build.log" 2>&1 \
    || { tail -30 "$IMG/worker-dockerfile.build.log" >&2; die "buildah build failed (log: $IMG/worker-dockerfile.build.log)"; }
  bh rmi --prune >/dev/null 2>&1 || true  # the previous build, now untagged
  log "worker image: buildah build in $(( $(date +%s) - t0 ))s"
fi

# ---- 3. export: OCI layout for `ctr images import` ----------------------------------------
t0=$(date +%s)
rm -rf "$OUT.tmp" "$OUT"
# Layers stay gzip-compressed as buildah stored them (1.28 ignores --disable-compression here).
bh push --quiet --format oci "$IMAGE" "oci:$OUT.tmp:$NAME" >/dev/null 2>"$IMG/worker-dockerfile.push.log" \
  || { cat "$IMG/worker-dockerfile.push.log" >&2; die "buildah push to $OUT failed"; }
# ctr names an imported image by the io.containerd.image.name annotation (else by ref.name).
"$PY" "$CLUSTER_DIR/oci.py" --name "$OUT.tmp" "$NAME"
mv "$OUT.tmp" "$OUT"
echo "$key" > "$OUT.id"
log "worker image: exported to $OUT in $(( $(date +%s) - t0 ))s ($(du -sh "$OUT" | cut -f1))"
