"""Print a short content hash of a container build's inputs, so the worker image is rebuilt
exactly when what the Dockerfile would see changes (file content and relative paths, never
mtimes, which a fresh clone or checkout resets).

    python image_key.py ROOT SALT PATH [PATH ...]

PATHs are files or folders relative to ROOT (the build context); folders are walked, skipping
what the project's .dockerignore keeps out of the context (__pycache__, *.pyc/*.pyo/*.pyd).
SALT carries everything else that shapes the image (build arguments, the base image's recipe).
Stdlib only: runs under any Python 3.
"""
from __future__ import annotations

import hashlib
import os
import sys

SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".pyd")


def _files(root: str, rel: str) -> list[str]:
    """Every context file under ROOT/REL, as sorted relative paths."""
    path = os.path.join(root, rel)
    if not os.path.isdir(path):
        return [rel]
    found = []
    for top, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += [os.path.relpath(os.path.join(top, n), root) for n in names
                  if not n.endswith(SKIP_SUFFIXES)]
    return sorted(found)


def key(root: str, salt: str, paths: list[str]) -> str:
    h = hashlib.sha256(salt.encode() + b"\0")
    for rel in paths:
        for f in _files(root, rel):
            full = os.path.join(root, f)
            if not os.path.exists(full):
                raise SystemExit(f"image_key: {full} missing (the Dockerfile COPYs it)")
            with open(full, "rb") as fh:
                digest = hashlib.sha256(fh.read()).digest()
            # The executable bit is copied into the image too.
            mode = b"x" if os.access(full, os.X_OK) else b"-"
            h.update(f.encode() + b"\0" + mode + digest)
    return h.hexdigest()[:16]


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    print(key(sys.argv[1], sys.argv[2], sys.argv[3:]))
