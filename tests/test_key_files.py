"""CurveZMQ key files are private from the moment they exist, and nobody loads one that is not:
no secret key others can read, and no key folder, allow-list or public key others can change
(whoever can write an allow-list lets themselves in; whoever can write a client's folder can put
their own broker's key where the client looks for the broker's). Secrets mounted by Kubernetes
(root's, behind ``..data`` symlinks, on a read-only mount) load as they are."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.broker.allow_list import AllowList
from pool.broker.server import Broker
from pool.keys import create_key_directory, load_broker_keys, read_allowed_keys
from tests.support.as_user import NOBODY, as_user
from worker.curve import changeable_problem, load_peer_keys, secret_file_problem

# Every file of a fresh key tree (one client, "default"), relative to its top.
SECRETS = ("broker/broker.key_secret", "clients/default/client.key_secret", "worker/worker.key_secret")
PUBLICS = ("broker/broker.key", "broker/clients/default.key", "broker/workers/worker.key",
           "clients/default/client.key", "clients/default/broker.key", "worker/worker.key", "worker/broker.key")
FOLDERS = ("broker", "broker/clients", "broker/workers", "worker", "clients", "clients/default")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask there is: whatever is private must be made so on purpose, not by luck."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_created_key_folders_are_0700_and_secret_files_0600_even_with_an_open_umask(tmp_path, open_umask):
    directory = create_key_directory(tmp_path / "nested" / "keys")
    assert mode(directory) == 0o700
    for name in FOLDERS:
        assert mode(directory / name) == 0o700, name
    for name in SECRETS:
        assert mode(directory / name) == 0o600, name
        assert (directory / name).stat().st_uid == os.geteuid()
    for name in PUBLICS:
        assert mode(directory / name) == 0o644, name
    # Nothing left of the private folder each pair was written in, nor of a staged public key.
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) == sorted(
        [*FOLDERS, *SECRETS, *PUBLICS])


def test_an_existing_folder_keeps_its_mode_but_the_secrets_in_it_are_0600(tmp_path, open_umask):
    directory = tmp_path / "mine"
    directory.mkdir(mode=0o750)
    create_key_directory(directory)
    assert mode(directory) == 0o750
    assert all(mode(directory / name) == 0o600 for name in SECRETS)
    assert all(mode(directory / name) == 0o700 for name in FOLDERS)


def test_the_keys_command_makes_private_files(tmp_path):
    directory = tmp_path / "keys"
    result = subprocess.run([sys.executable, "-m", "pool", "keys", str(directory)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert mode(directory) == 0o700
    assert all(mode(directory / name) == 0o600 for name in SECRETS)
    assert all(mode(directory / name) == 0o700 for name in FOLDERS)


@pytest.mark.parametrize(("name", "loader"), [
    ("clients/default/client.key_secret", lambda d: load_peer_keys(d / "clients" / "default", "client")),
    ("worker/worker.key_secret", lambda d: load_peer_keys(d / "worker", "worker")),
    ("broker/broker.key_secret", lambda d: load_broker_keys(d / "broker")),
    ("broker/broker.key_secret", load_broker_keys),  # the top of the tree is accepted for the broker
])
@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o620])
def test_a_secret_key_others_can_read_or_write_is_refused_with_the_chmod_to_run(tmp_path, name, loader, loose):
    directory = create_key_directory(tmp_path / "keys")
    secret = directory / name
    secret.chmod(loose)
    with pytest.raises(PermissionError) as info:
        loader(directory)
    message = str(info.value)
    assert f"chmod 600 {secret}" in message
    assert f"chmod 700 {secret.parent}" in message
    secret.chmod(0o600)
    loader(directory)  # the command it gave is the whole fix


def test_a_0600_secret_key_is_accepted_by_every_loader(tmp_path):
    directory = create_key_directory(tmp_path / "keys")
    assert load_peer_keys(directory / "clients" / "default", "client").secret
    assert load_peer_keys(directory / "worker", "worker").secret
    assert load_broker_keys(directory / "broker").secret


def test_a_0400_secret_key_is_accepted(tmp_path):
    directory = create_key_directory(tmp_path / "keys") / "worker"
    (directory / "worker.key_secret").chmod(0o400)
    assert load_peer_keys(directory, "worker").secret


# The rule itself, for owners a test cannot create: (mode, owner, our uid) -> refused?
FILE = stat.S_IFREG


@pytest.mark.parametrize(("file_mode", "owner", "euid", "refused"), [
    (0o600, 1000, 1000, False),  # ours, private
    (0o400, 1000, 1000, False),
    (0o640, 1000, 1000, True),   # ours, but the group can read it
    (0o644, 1000, 1000, True),
    (0o660, 1000, 1000, True),
    # Kubernetes mounts a Secret for a non-root container root-owned, group = the Pod's fsGroup,
    # with at least 0440 whatever defaultMode says: allowed, as PostgreSQL allows its TLS key.
    (0o440, 0, 10001, False),
    (0o640, 0, 10001, False),
    (0o400, 0, 10001, False),
    (0o460, 0, 10001, True),     # root-owned but group-writable
    (0o444, 0, 10001, True),     # root-owned but world-readable
    (0o600, 2000, 1000, True),   # another user's file: they can read it
])
def test_the_secret_file_rule(file_mode, owner, euid, refused):
    assert (secret_file_problem(FILE | file_mode, owner, euid) is not None) is refused


@pytest.mark.timeout(30)
def test_a_worker_given_a_world_readable_secret_exits_with_the_chmod_to_run(tmp_path):
    directory = create_key_directory(tmp_path / "keys") / "worker"
    (directory / "worker.key_secret").chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--connect", f"ipc://{tmp_path}/nobody.sock", "--keys", str(directory)],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert f"chmod 600 {directory / 'worker.key_secret'}" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- folders and allow-lists

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")

# (what to loosen, relative to the top of a fresh tree; the loader that must refuse it)
CHANGEABLE = [
    ("clients/default", lambda d: load_peer_keys(d / "clients" / "default", "client")),
    ("clients/default/broker.key", lambda d: load_peer_keys(d / "clients" / "default", "client")),
    ("worker", lambda d: load_peer_keys(d / "worker", "worker")),
    ("worker/broker.key", lambda d: load_peer_keys(d / "worker", "worker")),
    ("broker", lambda d: load_broker_keys(d / "broker")),
    ("broker/clients", lambda d: read_allowed_keys(d / "broker" / "clients")),
    ("broker/clients/default.key", lambda d: read_allowed_keys(d / "broker" / "clients")),
    ("broker/workers", lambda d: read_allowed_keys(d / "broker" / "workers")),
    ("broker/workers/worker.key", lambda d: read_allowed_keys(d / "broker" / "workers")),
]


@pytest.mark.parametrize(("name", "loader"), CHANGEABLE, ids=[name for name, _ in CHANGEABLE])
@pytest.mark.parametrize("write_bits", [0o002, 0o020])
def test_a_key_folder_or_allow_list_others_can_change_is_refused_with_the_chmod_to_run(tmp_path, name, loader,
                                                                                       write_bits):
    directory = create_key_directory(tmp_path / "keys")
    path = directory / name
    path.chmod(mode(path) | write_bits)
    with pytest.raises(PermissionError) as info:
        loader(directory)
    message = str(info.value)
    assert "refusing to use the " in message and f" {path}: " in message
    assert "its group or others may change it" in message
    assert f"chmod go-w {path}" in message
    path.chmod(mode(path) & ~0o022)
    loader(directory)  # the command it gave is the whole fix


@AS_ROOT
@pytest.mark.parametrize(("name", "loader"), CHANGEABLE, ids=[name for name, _ in CHANGEABLE])
def test_a_key_folder_or_allow_list_owned_by_another_user_is_refused_with_the_chown_to_run(tmp_path, name, loader):
    directory = create_key_directory(tmp_path / "keys")
    path = directory / name
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(PermissionError) as info:
        loader(directory)
    message = str(info.value)
    assert f" {path}: it is owned by another user (uid {NOBODY})" in message
    assert f"chown root {path}" in message
    os.chown(path, 0, 0)
    loader(directory)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["broker/clients", "broker/workers/worker.key"])
def test_a_broker_with_an_allow_list_others_can_change_does_not_start(tmp_path, name):
    directory = create_key_directory(tmp_path / "keys")
    path = directory / name
    path.chmod(mode(path) | 0o002)
    with pytest.raises(PermissionError):
        Broker(f"ipc://{tmp_path}/b.sock", keys=load_broker_keys(directory / "broker"))
    result = subprocess.run([sys.executable, "-m", "pool", "broker", "--bind", f"ipc://{tmp_path}/c.sock",
                             "--keys", str(directory / "broker"), "--announce"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "READY" not in result.stdout
    assert f"chmod go-w {path}" in result.stderr and "Traceback" not in result.stderr


def test_an_allow_list_made_changeable_while_the_broker_runs_keeps_the_previous_keys(tmp_path):
    directory = create_key_directory(tmp_path / "keys")
    allow = AllowList(load_broker_keys(directory / "broker"))
    before = allow.current
    assert len(before.clients) == 1
    clients = directory / "broker" / "clients"
    clients.chmod(0o777)
    # A stranger's key appears in the now world-writable folder: it must not be taken.
    other = create_key_directory(tmp_path / "other")
    (clients / "stranger.key").write_bytes((other / "clients" / "default" / "client.key").read_bytes())
    assert allow.refresh() is False
    assert allow.current == before
    clients.chmod(0o700)
    assert allow.refresh() is True and len(allow.current.clients) == 2  # a safe folder is read again


CHANGEABLE_RULE = [
    (stat.S_IFDIR | 0o700, 1000, 1000, False, False),  # ours, private
    (stat.S_IFDIR | 0o755, 1000, 1000, False, False),  # ours, readable: public keys may be read
    (stat.S_IFREG | 0o644, 1000, 1000, False, False),
    (stat.S_IFDIR | 0o775, 1000, 1000, False, True),   # group may change it
    (stat.S_IFDIR | 0o757, 1000, 1000, False, True),   # others may
    (stat.S_IFREG | 0o664, 1000, 1000, False, True),
    (stat.S_IFDIR | 0o755, 0, 1000, False, False),     # root's, not writable by others
    (stat.S_IFDIR | 0o1777, 0, 1000, False, True),     # /tmp-like
    (stat.S_IFDIR | 0o700, 2000, 1000, False, True),   # another user's: they can change it
    (stat.S_IFDIR | 0o700, 2000, 0, False, True),      # even when we are root
    # A Kubernetes Secret volume: root's, 1777 (3777 with an fsGroup), on a read-only mount
    (stat.S_IFDIR | 0o1777, 0, 10001, True, False),
    (stat.S_IFDIR | 0o3777, 0, 10001, True, False),
    (stat.S_IFREG | 0o440, 0, 10001, True, False),
]


@pytest.mark.parametrize(("file_mode", "owner", "euid", "read_only", "refused"), CHANGEABLE_RULE)
def test_the_changeable_rule(file_mode, owner, euid, read_only, refused):
    assert (changeable_problem(file_mode, owner, euid, read_only) is not None) is refused


# ---------------------------------------------------------------------------- a Secret as Kubernetes mounts it


def _secret_volume(mount: Path, files: dict[str, bytes], gid: int, read_only: bool, made: list[Path]) -> None:
    """What the kubelet makes of a Secret with defaultMode 0440 for a Pod with fsGroup ``gid``: a
    tmpfs, root's, 3777; the files in a timestamped folder, root:gid 0440; a ``..data`` symlink to
    it and one symlink per file; then (as every Secret volume since Kubernetes 1.10) read-only."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True, capture_output=True)
    made.append(mount)
    os.chown(mount, 0, gid)
    os.chmod(mount, 0o3777)
    data = mount / "..2026_12_07_14_00_00.000000001"
    data.mkdir()
    os.chown(data, 0, gid)
    os.chmod(data, 0o2755)
    for name, content in files.items():
        (data / name).write_bytes(content)
        os.chown(data / name, 0, gid)
        os.chmod(data / name, 0o440)
    (mount / "..data").symlink_to(data.name)
    for name in files:
        (mount / name).symlink_to(f"..data/{name}")
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True, capture_output=True)


@pytest.fixture
def volumes() -> Iterator[tuple[Path, list[Path]]]:
    """A folder any user may enter (as /etc is in a container), and the mounts made in it: all
    unmounted and removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="rk8s-volumes-"))
    base.chmod(0o755)
    made: list[Path] = []
    try:
        yield base, made
    finally:
        for mount in reversed(made):
            subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@AS_ROOT
@pytest.mark.timeout(60)
@pytest.mark.parametrize("read_only", [True, False])
def test_secrets_mounted_as_kubernetes_mounts_them_load_only_when_read_only(tmp_path, volumes, read_only):
    base, made = volumes
    tree = create_key_directory(tmp_path / "keys")
    worker, clients, broker = base / "worker", base / "clients", base / "broker"
    for mount, folder in ((worker, tree / "worker"), (clients, tree / "broker" / "clients"),
                          (broker, tree / "broker")):
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        try:
            _secret_volume(mount, files, NOBODY, read_only, made)
        except subprocess.CalledProcessError:
            pytest.skip("this machine cannot mount a tmpfs")

    def allow_list() -> None:
        assert len(read_allowed_keys(clients)) == 1

    # The Pod's user (runAsUser, and fsGroup as its group) loads what each role loads.
    outcomes = {
        "worker": as_user(NOBODY, lambda: load_peer_keys(worker, "worker")),
        "broker": as_user(NOBODY, lambda: load_broker_keys(broker, client_keys_dir=clients)),
        "allow-list": as_user(NOBODY, allow_list),
    }
    if read_only:
        assert outcomes == {"worker": "ok", "broker": "ok", "allow-list": "ok"}
    else:  # the same layout, writable: its 3777 folder is refused
        for what, outcome in outcomes.items():
            assert outcome.startswith("PermissionError") and "its group or others may change it" in outcome, (
                what, outcome)
