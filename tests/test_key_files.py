"""CurveZMQ key files are private from the moment they exist, and nobody loads one that is not
(issue 10, finding 7; DESIGN §5: "worker secrets are mounted where only the worker can read them")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.keys import create_key_directory, load_broker_keys
from worker.curve import load_peer_keys, secret_file_problem

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
