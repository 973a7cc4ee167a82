"""CurveZMQ key files: how ``runnable-k8s keys`` lays them out and how each role loads them.

One folder per role (``runnable-k8s keys DIR [--client NAME ...]``), so that each program is
given only what it needs and no client can read a worker's or another client's secret::

    DIR/broker/      broker.key broker.key_secret      the broker's pair
    DIR/broker/clients/NAME.key                        allow-list: public keys that may be clients
    DIR/broker/workers/worker.key                      allow-list: public keys that may be workers
    DIR/worker/      worker.key worker.key_secret broker.key
    DIR/clients/NAME/  client.key client.key_secret broker.key   (one folder per client)

The broker gets ``DIR/broker`` (``--keys``), a worker ``DIR/worker``, a client ``DIR/clients/NAME``
(``keys=`` / ``RUNNABLE_K8S_KEYS``). ``runnable-k8s keys DIR --client NAME`` on an existing tree adds
a client, ``--revoke NAME`` removes one; the running broker re-reads its allow-list folders when
they change (``pool.broker.allow_list``), so neither needs a restart.

Every folder is 0700 and every ``*.key_secret`` 0600 from the moment it exists: each pair is written
into a fresh 0700 folder and moved into place. Every loader refuses a secret key that other users
could read (``worker.curve.check_secret_file``), and a key folder, allow-list folder or public key
file that other users could change (``worker.curve.check_not_changeable``; a read-only mount, as
Kubernetes mounts a Secret, is accepted whatever its modes).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq.auth

from worker.curve import PeerKeys, check_not_changeable, check_secret_file, load_peer_keys, require

__all__ = ["BrokerKeys", "PeerKeys", "add_client", "check_not_changeable", "check_secret_file", "client_names",
           "create_key_directory",
           "is_allow_list", "is_key_tree", "key_secret_manifests", "load_broker_keys", "load_peer_keys",
           "read_allowed_keys", "revoke_client", "validate_client_name"]

BROKER_DIR = "broker"  # DIR/broker: the broker's pair and its two allow-lists
WORKER_DIR = "worker"  # DIR/worker: the workers' pair and the broker's public key
CLIENTS_DIR = "clients"  # DIR/clients/NAME: one client each; in DIR/broker: public keys that may be clients
WORKERS_DIR = "workers"  # in DIR/broker: public keys that may register as workers
DEFAULT_CLIENT = "default"
CLIENT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
CLIENT_NAME_MAX = 40

# Labels of the Secrets `--k8s-secret` makes; the allow-lists are replaced on a re-run, pairs never.
SECRET_ROLE_LABEL = "runnable-k8s.io/keys"
ALLOW_LIST_ROLES = ("clients", "workers")


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
    if (directory / BROKER_DIR).is_dir() and not (directory / "broker.key_secret").exists():
        directory = directory / BROKER_DIR
    if (directory / "authorized").is_dir() and not (directory / CLIENTS_DIR).exists() and client_keys_dir is None:
        raise FileNotFoundError(
            f"{directory} holds keys in the old one-folder layout (authorized/), where every role "
            "could read every secret. Make keys per role with `runnable-k8s keys NEWDIR` and give "
            "each program its own folder (docs/security.md)."
        )
    check_not_changeable(require(directory, "the broker key folder"), "the broker key folder")
    secret_file = check_secret_file(require(directory / "broker.key_secret", "the broker secret key"))
    check_not_changeable(secret_file, "the broker secret key")
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
    """The Z85 public keys of the ``*.key`` files in ``directory`` (none if it does not exist).

    Hidden files are skipped: a file being written (``.NAME.key.tmp``) and a Kubernetes Secret
    volume's own ``..data`` entries are not keys. The folder and every key file in it must be
    unchangeable by other users (``check_not_changeable``): whoever can write either can allow
    themselves in. A ``PermissionError`` says which path and the chmod or chown that fixes it."""
    if not directory.is_dir():
        return frozenset()
    check_not_changeable(directory, "the allow-list folder")
    paths = [path for path in sorted(directory.glob("*.key")) if not path.name.startswith(".")]
    return frozenset(zmq.auth.load_certificate(check_not_changeable(path, "the allow-list key"))[0] for path in paths)


# ---------------------------------------------------------------------------- making keys


def validate_client_name(name: str) -> str:
    """``name`` if it can name a client (a file, a folder and a Kubernetes Secret), else ValueError."""
    if len(name) > CLIENT_NAME_MAX or not CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"invalid client name {name!r}: use lowercase letters, digits and '-', starting and ending "
            f"with a letter or digit, at most {CLIENT_NAME_MAX} characters (e.g. 'web', 'batch-jobs'): "
            "it names a folder, an allow-list file and a Kubernetes Secret"
        )
    return name


def is_key_tree(directory: str | Path) -> bool:
    """Whether ``directory`` is the top of a tree made by ``create_key_directory``."""
    return (Path(directory) / BROKER_DIR / "broker.key_secret").exists()


def client_names(directory: str | Path) -> list[str]:
    """The clients of a key tree: those on the broker's allow-list."""
    allowed = Path(directory) / BROKER_DIR / CLIENTS_DIR
    return sorted(p.name[:-len(".key")] for p in allowed.glob("*.key") if not p.name.startswith("."))


def create_key_directory(directory: str | Path, clients: Sequence[str] = (DEFAULT_CLIENT,)) -> Path:
    """Write a key tree for a broker, its workers and ``clients``; refuse to overwrite one.

    A directory this creates is 0700 (an existing one keeps its mode: every folder inside it is
    0700 and every secret 0600 either way)."""
    directory = Path(directory)
    for name in clients:
        validate_client_name(name)
    if len(set(clients)) != len(clients):
        raise ValueError(f"a client name is given twice: {list(clients)}")
    if is_key_tree(directory):
        raise FileExistsError(f"{directory} already holds keys; add a client with `runnable-k8s keys "
                              f"{directory} --client NAME`, or remove it or pick another directory")
    if (directory / "broker.key_secret").exists() or (directory / "authorized").exists():
        raise FileExistsError(f"{directory} holds keys in the old one-folder layout; pick another directory")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask, which could add nothing
    broker = _private_dir(directory / BROKER_DIR)
    broker_public = _create_pair(broker, "broker")
    _private_dir(broker / CLIENTS_DIR)
    workers_allowed = _private_dir(broker / WORKERS_DIR)
    worker = _private_dir(directory / WORKER_DIR)
    _install_public(_create_pair(worker, "worker"), workers_allowed / "worker.key")
    _install_public(broker_public, worker / "broker.key")
    _private_dir(directory / CLIENTS_DIR)
    for name in clients:
        add_client(directory, name)
    return directory


def add_client(directory: str | Path, name: str) -> Path:
    """Make client ``name``'s folder (its pair and the broker's public key), then allow its key.

    The allow-list entry is written last and renamed into place, so a running broker that re-reads
    the folder never sees a half-written key, and never allows a key whose folder is not complete."""
    directory = Path(directory)
    validate_client_name(name)
    if not is_key_tree(directory):
        raise FileNotFoundError(f"{directory} is not a key folder made by `runnable-k8s keys DIR` (no "
                                f"{BROKER_DIR}/broker.key_secret in it)")
    folder = directory / CLIENTS_DIR / name
    allowed = directory / BROKER_DIR / CLIENTS_DIR / f"{name}.key"
    if folder.exists() or allowed.exists():
        raise FileExistsError(f"client {name!r} already exists in {directory}; revoke it first "
                              f"(`runnable-k8s keys {directory} --revoke {name}`) or pick another name")
    _private_dir(directory / CLIENTS_DIR)
    _private_dir(directory / BROKER_DIR / CLIENTS_DIR)
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    try:
        public = _create_pair(folder, "client")
        _install_public(directory / BROKER_DIR / "broker.key", folder / "broker.key")
        _install_public(public, allowed)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def revoke_client(directory: str | Path, name: str) -> None:
    """Take client ``name`` off the broker's allow-list and remove its folder (its pair is then
    useless: a fresh ``--client NAME`` makes a new one)."""
    directory = Path(directory)
    validate_client_name(name)
    if not is_key_tree(directory):
        raise FileNotFoundError(f"{directory} is not a key folder made by `runnable-k8s keys DIR`")
    allowed = directory / BROKER_DIR / CLIENTS_DIR / f"{name}.key"
    folder = directory / CLIENTS_DIR / name
    if not allowed.exists() and not folder.exists():
        known = ", ".join(client_names(directory)) or "none"
        raise FileNotFoundError(f"no client {name!r} in {directory} (clients: {known})")
    allowed.unlink(missing_ok=True)  # first: from here on the broker refuses the key
    shutil.rmtree(folder, ignore_errors=True)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def _install_public(source: Path, target: Path) -> None:
    """Copy a public key file to ``target`` (0644) through a hidden temporary name and a rename."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, staging)
    staging.chmod(0o644)
    os.replace(staging, target)


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


# ---------------------------------------------------------------------------- Kubernetes Secrets


def key_secret_manifests(directory: str | Path, prefix: str) -> list[dict[str, Any]]:
    """The Kubernetes Secrets the chart mounts (``curve.existingSecret: PREFIX``), one per role:

    * ``PREFIX-broker``: broker.key, broker.key_secret (the broker's ``--keys``)
    * ``PREFIX-clients``: ``NAME.key`` of every client (its ``--client-keys`` allow-list)
    * ``PREFIX-workers``: worker.key (its ``--worker-keys`` allow-list)
    * ``PREFIX-worker``: worker.key, worker.key_secret, broker.key (the workers' ``--keys``)
    * ``PREFIX-client-NAME``: client.key, client.key_secret, broker.key (one per client)

    Each carries the label ``runnable-k8s.io/keys`` (broker, clients, workers, worker, client):
    the two allow-lists are the ones to replace when a client is added or revoked."""
    directory = Path(directory)
    if not is_key_tree(directory):
        raise FileNotFoundError(f"{directory} is not a key folder made by `runnable-k8s keys DIR`")
    broker = directory / BROKER_DIR
    secrets = [
        _secret(f"{prefix}-broker", "broker", {n: broker / n for n in ("broker.key", "broker.key_secret")}),
        _secret(f"{prefix}-clients", "clients", _key_files(broker / CLIENTS_DIR)),
        _secret(f"{prefix}-workers", "workers", _key_files(broker / WORKERS_DIR)),
        _secret(f"{prefix}-worker", "worker",
                {n: directory / WORKER_DIR / n for n in ("worker.key", "worker.key_secret", "broker.key")}),
    ]
    for name in client_names(directory):
        folder = directory / CLIENTS_DIR / name
        secrets.append(_secret(f"{prefix}-client-{name}", "client",
                               {n: folder / n for n in ("client.key", "client.key_secret", "broker.key")},
                               client=name))
    return secrets


def _key_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("*.key")) if not p.name.startswith(".")}


def _secret(name: str, role: str, files: dict[str, Path], client: str | None = None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": "runnable-k8s", SECRET_ROLE_LABEL: role}
    if client is not None:
        labels["runnable-k8s.io/client"] = client
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels},
        "type": "Opaque",
        "data": {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()},
    }


def is_allow_list(manifest: dict[str, Any]) -> bool:
    """Whether a Secret of ``key_secret_manifests`` is an allow-list (replaced on a re-run)."""
    return manifest["metadata"]["labels"].get(SECRET_ROLE_LABEL) in ALLOW_LIST_ROLES
