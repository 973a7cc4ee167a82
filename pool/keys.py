"""CurveZMQ key files: how ``runnable-k8s keys`` lays them out and how each role loads them.

Layout of a key directory (``runnable-k8s keys DIR``)::

    DIR/broker.key  DIR/broker.key_secret     the broker's pair (clients and workers need broker.key)
    DIR/client.key  DIR/client.key_secret     a client's pair
    DIR/worker.key  DIR/worker.key_secret     a worker's pair
    DIR/authorized/client.key                 public keys the broker accepts; files named
    DIR/authorized/worker.key                 worker*.key may also register as workers

More clients are allowed by dropping their public ``.key`` files into ``authorized/``.

The directory and ``authorized/`` are 0700 and every ``*.key_secret`` is 0600 from the moment it
exists: each pair is written into a fresh 0700 folder inside DIR and moved into place. Every
loader refuses a secret key that other users could read (``worker.curve.check_secret_file``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from worker.curve import PeerKeys, check_secret_file, load_peer_keys, require

__all__ = ["AUTHORIZED_DIR", "BrokerKeys", "PeerKeys", "check_secret_file", "create_key_directory",
           "load_broker_keys", "load_peer_keys"]

AUTHORIZED_DIR = "authorized"
WORKER_KEY_PREFIX = "worker"


@dataclass(frozen=True)
class BrokerKeys:
    public: bytes
    secret: bytes
    authorized_dir: Path
    worker_keys: frozenset[bytes]


def load_broker_keys(directory: str | Path) -> BrokerKeys:
    directory = Path(directory)
    secret_file = check_secret_file(require(directory / "broker.key_secret", "the broker secret key"))
    public, secret = zmq.auth.load_certificate(secret_file)
    authorized = require(directory / AUTHORIZED_DIR, "the authorized-keys directory")
    worker_keys = frozenset(
        zmq.auth.load_certificate(path)[0]
        for path in authorized.glob(f"{WORKER_KEY_PREFIX}*.key")
    )
    if secret is None:
        raise ValueError(f"{directory / 'broker.key_secret'} holds no secret key")
    return BrokerKeys(public=public, secret=secret, authorized_dir=authorized, worker_keys=worker_keys)


def create_key_directory(directory: str | Path) -> Path:
    """Write broker, client and worker key pairs and the broker's allow-list; refuse to overwrite.

    A directory this creates is 0700 (an existing one keeps its mode: the secrets in it are 0600
    either way); ``authorized/`` is 0700."""
    directory = Path(directory)
    if (directory / "broker.key_secret").exists():
        raise FileExistsError(f"{directory} already holds keys; remove it or pick another directory")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask, which could add nothing
    authorized = directory / AUTHORIZED_DIR
    authorized.mkdir(mode=0o700, exist_ok=True)
    authorized.chmod(0o700)
    for role in ("broker", "client", "worker"):
        public_file = _create_pair(directory, role)
        if role != "broker":
            shutil.copy(public_file, authorized / f"{role}.key")
    return directory


def _create_pair(directory: Path, role: str) -> Path:
    """``role``'s pair in ``directory``: zmq.auth writes its files with the umask's mode, so it
    writes them into a fresh 0700 folder (mkdtemp's) where nobody else can open them, and they
    are moved out only once the secret is 0600 (a rename within one file system)."""
    staging = tempfile.mkdtemp(prefix=".keys-", dir=directory)
    try:
        public_file, secret_file = zmq.auth.create_certificates(staging, role)
        os.chmod(secret_file, 0o600)
        os.chmod(public_file, 0o644)
        os.replace(secret_file, directory / f"{role}.key_secret")
        os.replace(public_file, directory / f"{role}.key")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / f"{role}.key"


def key_secret_manifest(directory: str | Path, name: str) -> dict:
    """A Kubernetes Secret holding the directory's top-level key files, the layout the chart
    mounts (``curve.existingSecret``); the chart rebuilds ``authorized/`` from it."""
    import base64

    directory = Path(directory)
    data = {
        path.name: base64.b64encode(path.read_bytes()).decode()
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name.endswith((".key", ".key_secret"))
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "runnable-k8s"}},
        "type": "Opaque",
        "data": data,
    }
