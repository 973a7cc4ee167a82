"""Write an OCI image layout (the input of `ctr images import`) from layer tarballs.

Stdlib only, so it runs under any Python 3.  No container engine or registry is involved:
each layer is an uncompressed tar of a root filesystem (or a part of one); the config lists
their diff_ids, the manifest lists them as blobs, and index.json names the image with the
`io.containerd.image.name` annotation that `ctr images import` reads.

    python oci.py OUTDIR NAME[,NAME...] CONFIG_JSON LAYER.tar [LAYER.tar ...]
    python oci.py --name OUTDIR NAME      # name the one image of an existing layout

The second form names a layout written by another tool (`buildah push ... oci:DIR:REF`), which
sets only `org.opencontainers.image.ref.name`, for `ctr images import`.

Layers are hard-linked into OUTDIR/blobs (copied if that fails).  CONFIG_JSON is the
image's `config` section (Env, Cmd, Entrypoint, WorkingDir, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _put_blob(outdir: str, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(outdir, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def write_layout(outdir: str, names: list[str], config: dict, layers: list[str]) -> str:
    if os.path.exists(outdir):
        shutil.rmtree(outdir)
    os.makedirs(os.path.join(outdir, "blobs", "sha256"))
    layer_descs, diff_ids = [], []
    for layer in layers:
        digest = _sha256_file(layer)
        dest = os.path.join(outdir, "blobs", "sha256", digest)
        try:
            os.link(layer, dest)
        except OSError:
            shutil.copyfile(layer, dest)
        size = os.path.getsize(layer)
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": "sha256:" + digest, "size": size})
        diff_ids.append("sha256:" + digest)  # uncompressed: diff_id == digest
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/cluster/build-images.sh"}
                    for _ in layers],
    }
    cfg_digest, cfg_size = _put_blob(outdir, json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": cfg_size},
        "layers": layer_descs,
    }
    man_digest, man_size = _put_blob(outdir, json.dumps(manifest, sort_keys=True).encode())
    manifests: list[dict] = []
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    for name in names:
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man_digest, "size": man_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        })
    with open(os.path.join(outdir, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True)
    with open(os.path.join(outdir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return man_digest


def name_layout(outdir: str, name: str) -> None:
    """Annotate the single manifest of OUTDIR's index.json with the full image NAME."""
    path = os.path.join(outdir, "index.json")
    with open(path) as f:
        index = json.load(f)
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        raise SystemExit(f"oci.py: {path} holds {len(manifests)} manifests, expected exactly 1")
    manifests[0].setdefault("annotations", {})["io.containerd.image.name"] = name
    with open(path, "w") as f:
        json.dump(index, f, sort_keys=True)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--name":
        name_layout(argv[2], argv[3])
        return 0
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    outdir, names, config_json, *layers = argv[1:]
    digest = write_layout(outdir, names.split(","), json.loads(config_json), layers)
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
