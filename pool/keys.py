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

AUTHORIZED_DIR = "authorized"  # the old one-folder layout (refused with a message)
CLIENTS_DIR = "clients"  # in the broker's folder: public keys that may be clients
WORKERS_DIR = "workers"  # ... and those that may register as workers


@dataclass(frozen=True)
class BrokerKeys:
    """The broker's pair and where its two allow-lists live (folders of public ``*.key`` files,
    re-read by the running broker when they change: see ``pool.broker.allow_list``)."""

    public: bytes
    secret: bytes
    client_keys_dir: Path
    worker_keys_dir: Path


def load_broker_keys(
    directory: str | Path,
    *,
    client_keys_dir: str | Path | None = None,
    worker_keys_dir: str | Path | None = None,
) -> BrokerKeys:
    """The broker's keys from ``DIR/broker`` (or ``DIR`` itself when it holds ``broker.key_secret``);
    the allow-lists default to its ``clients/`` and ``workers/`` folders. A Kubernetes Secret
    cannot hold folders, so the chart mounts each allow-list on its own and passes both paths."""
    directory = Path(directory)
    if (directory / "broker").is_dir() and not (directory / "broker.key_secret").exists():
        directory = directory / "broker"
    if (directory / "authorized").is_dir() and not (directory / "clients").exists() and client_keys_dir is None:
        raise FileNotFoundError(
            f"{directory} holds keys in the old one-folder layout (authorized/), where every role "
            "could read every secret. Make keys per role with `runnable-k8s keys NEWDIR` and give "
            "each program its own folder (README: Security model)."
        )
    secret_file = check_secret_file(require(directory / "broker.key_secret", "the broker secret key"))
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    return BrokerKeys(
        public=public,
        secret=secret,
        client_keys_dir=Path(client_keys_dir) if client_keys_dir is not None else directory / CLIENTS_DIR,
        worker_keys_dir=Path(worker_keys_dir) if worker_keys_dir is not None else directory / WORKERS_DIR,
    )


def read_allowed_keys(directory: Path) -> frozenset[bytes]:
    """The Z85 public keys of the ``*.key`` files in ``directory`` (none if it does not exist)."""
    if not directory.is_dir():
        return frozenset()
    return frozenset(zmq.auth.load_certificate(path)[0] for path in sorted(directory.glob("*.key")))


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
