"""Keys per role (docs/design.md#trust-one-pool-is-one-trust-domain): `runnable-k8s keys DIR` writes one folder per
role, a client's folder holds no secret but its own, clients are added and revoked on a running
broker without a restart, and a program handed the wrong folder is told which one to pass.

Real files, real processes and real sockets (127.0.0.1 / ipc) only.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableLambda

from pool import AuthenticationFailed, ConfigurationError, LocalPool, PoolUnavailable, RunnableK8s
from pool.client.connection import Connection
from pool.keys import (
    add_client,
    create_key_directory,
    key_secret_manifests,
    load_broker_keys,
    read_allowed_keys,
    revoke_client,
)
from tests.support.waiting import wait_for
from worker.curve import load_peer_keys


def add_one(x: int) -> int:
    return x + 1


def run_keys(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pool", "keys", *argv], capture_output=True, text=True, timeout=30)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def secret_of(path: Path) -> bytes:
    """The Z85 secret key in a ``*.key_secret`` file (the line a thief would copy)."""
    line = next(line for line in path.read_text().splitlines() if "secret-key" in line)
    return line.split('"')[1].encode()


def contents_under(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return create_key_directory(tmp_path / "keys", ["default", "web"])


# ---------------------------------------------------------------------------- what each folder holds


def test_a_client_folder_holds_only_its_own_pair_and_the_brokers_public_key(tree):
    broker_secret = secret_of(tree / "broker" / "broker.key_secret")
    worker_secret = secret_of(tree / "worker" / "worker.key_secret")
    web_secret = secret_of(tree / "clients" / "web" / "client.key_secret")
    folder = tree / "clients" / "default"
    assert files_under(folder) == {"client.key", "client.key_secret", "broker.key"}
    assert not any(p.is_symlink() for p in folder.rglob("*"))  # nothing that leads out of it
    held = contents_under(folder)
    for other in (broker_secret, worker_secret, web_secret):
        assert other not in held
    assert secret_of(folder / "client.key_secret") in held
    # broker.key is the broker's public key, no more.
    assert (folder / "broker.key").read_bytes() == (tree / "broker" / "broker.key").read_bytes()
    assert b"secret-key" not in (folder / "broker.key").read_bytes()
    keys = load_peer_keys(folder, "client")
    assert keys.server_public == load_broker_keys(tree).public


def test_the_worker_folder_holds_no_client_or_broker_secret(tree):
    folder = tree / "worker"
    assert files_under(folder) == {"worker.key", "worker.key_secret", "broker.key"}
    held = contents_under(folder)
    assert secret_of(tree / "broker" / "broker.key_secret") not in held
    for client in ("default", "web"):
        assert secret_of(tree / "clients" / client / "client.key_secret") not in held


def test_the_broker_folder_holds_its_own_secret_and_public_keys_only(tree):
    folder = tree / "broker"
    assert files_under(folder) == {"broker.key", "broker.key_secret", "clients", "clients/default.key",
                                   "clients/web.key", "workers", "workers/worker.key"}
    held = contents_under(folder)
    assert held.count(b"secret-key") == 1  # broker.key_secret's own
    keys = load_broker_keys(folder)
    assert read_allowed_keys(keys.client_keys_dir) == {load_peer_keys(tree / "clients" / c, "client").public
                                                       for c in ("default", "web")}
    assert read_allowed_keys(keys.worker_keys_dir) == {load_peer_keys(tree / "worker", "worker").public}


# ---------------------------------------------------------------------------- adding and revoking


def test_keys_client_adds_a_private_client_folder_and_its_allow_list_entry(tree):
    previous = os.umask(0)  # the loosest umask: the new files must be private on purpose
    try:
        result = run_keys(str(tree), "--client", "batch-jobs")
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    folder = tree / "clients" / "batch-jobs"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "client.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tree / "broker/clients/batch-jobs.key").stat().st_mode) == 0o644
    assert (tree / "broker/clients/batch-jobs.key").read_bytes() == (folder / "client.key").read_bytes()
    assert str(folder) in result.stdout and "no restart" in result.stdout
    assert files_under(tree / "broker" / "clients") == {"default.key", "web.key", "batch-jobs.key"}


def test_keys_client_refuses_an_existing_client_and_changes_nothing(tree):
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    result = run_keys(str(tree), "--client", "web")
    assert result.returncode != 0
    assert "already exists" in result.stderr and "--revoke web" in result.stderr
    assert {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()} == before


def test_keys_revoke_removes_the_allow_list_entry_and_the_folder(tree):
    result = run_keys(str(tree), "--revoke", "web")
    assert result.returncode == 0, result.stderr
    assert not (tree / "broker/clients/web.key").exists()
    assert not (tree / "clients/web").exists()
    assert (tree / "clients/default/client.key_secret").exists()
    assert "within a second or two" in result.stdout
    unknown = run_keys(str(tree), "--revoke", "web")
    assert unknown.returncode != 0 and "no client 'web'" in unknown.stderr and "default" in unknown.stderr


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 41, "we b", "../broker", ""])
def test_bad_client_names_are_refused_with_the_rule(tmp_path, name):
    directory = tmp_path / "keys"
    result = run_keys(str(directory), f"--client={name}")
    assert result.returncode != 0
    assert "invalid client name" in result.stderr and "at most 40" in result.stderr
    assert not directory.exists()  # nothing written
    tree = create_key_directory(tmp_path / "tree")
    with pytest.raises(ValueError, match="invalid client name"):
        add_client(tree, name)


def test_several_clients_at_once_and_a_40_character_name(tmp_path):
    name = "a" + "-b" * 19 + "c"
    assert len(name) == 40
    directory = tmp_path / "keys"
    result = run_keys(str(directory), "--client", "web", "--client", name)
    assert result.returncode == 0, result.stderr
    assert files_under(directory / "clients") >= {"web", name}
    assert not (directory / "clients" / "default").exists()  # "default" only when no client is named


def test_revoking_before_any_tree_exists_is_refused(tmp_path):
    result = run_keys(str(tmp_path / "none"), "--revoke", "web")
    assert result.returncode != 0 and "nothing to revoke" in result.stderr


# ---------------------------------------------------------------------------- the wrong folder


@pytest.mark.parametrize(("role", "hint"), [("client", "clients/NAME"), ("worker", "worker")])
def test_the_top_of_the_tree_given_to_a_loader_says_which_folder_to_pass(tree, role, hint):
    with pytest.raises(FileNotFoundError) as info:
        load_peer_keys(tree, role)
    message = str(info.value)
    assert "top of a key tree" in message and f"pass {tree}/{hint} to a {role}" in message
    if role == "client":
        assert "default, web" in message


def test_other_roles_folders_given_to_a_loader_are_named(tree):
    with pytest.raises(FileNotFoundError, match="broker's key folder"):
        load_peer_keys(tree / "broker", "client")
    with pytest.raises(FileNotFoundError, match="worker's key folder"):
        load_peer_keys(tree / "worker", "client")
    with pytest.raises(FileNotFoundError, match="client's key folder"):
        load_peer_keys(tree / "clients" / "web", "worker")
    with pytest.raises(FileNotFoundError, match=f"pass one of them, e.g. {tree / 'clients' / 'default'}"):
        load_peer_keys(tree / "clients", "client")


@pytest.mark.timeout(30)
def test_a_worker_given_the_top_of_the_tree_exits_with_the_folder_to_pass(tree, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--connect", f"ipc://{tmp_path}/nobody.sock", "--keys", str(tree)],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert f"pass {tree / 'worker'} to a worker" in result.stderr and "Traceback" not in result.stderr


def test_a_client_given_the_top_of_the_tree_is_told_the_folder_to_pass(tree):
    """Refused where it is written, at construction, not at the first call of a chain."""
    with pytest.raises(ConfigurationError, match="clients/NAME"):
        RunnableK8s(bound=RunnableLambda(add_one), pool="ipc:///nonexistent/broker.sock", keys=str(tree),
                    mode="warm", timeout=5, connect_timeout=1)


# ---------------------------------------------------------------------------- on a running broker


@pytest.fixture
def keyed_pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=2, secure=True) as pool:
        yield pool


def call(pool: LocalPool, keys: Path) -> int:
    Connection.close_all(pool.address)
    runnable = RunnableK8s(bound=RunnableLambda(add_one), pool=pool.address, keys=str(keys), mode="warm",
                           timeout=20, connect_timeout=1.5)
    return runnable.invoke(41)


def refused(pool: LocalPool, keys: Path) -> bool:
    try:
        call(pool, keys)
    except AuthenticationFailed:
        return True
    except PoolUnavailable:
        return False
    return False


@pytest.mark.timeout(90)
def test_a_client_added_and_revoked_on_a_running_broker_without_a_restart(keyed_pool):
    pool = keyed_pool
    client_folder = Path(pool.keys_dir)
    assert client_folder.name == "default" and client_folder.parent.name == "clients"
    tree = client_folder.parent.parent
    broker_pid = pool.pids[0]
    assert call(pool, client_folder) == 42

    result = run_keys(str(tree), "--client", "web")
    assert result.returncode == 0, result.stderr
    web = tree / "clients" / "web"
    assert wait_for(lambda: not refused(pool, web), 15, "the running broker to allow the added client")
    assert call(pool, web) == 42

    # The client keeps its own copy of its folder (as a deployed client would): revoking must shut
    # that copy out, with the broker still running.
    kept = tree.parent / "web-copy"
    shutil.copytree(web, kept)
    assert run_keys(str(tree), "--revoke", "web").returncode == 0
    wait_for(lambda: refused(pool, kept), 15, "the running broker to refuse the revoked client")
    assert call(pool, client_folder) == 42  # the other client is untouched
    assert pool.pids[0] == broker_pid  # the same broker process throughout


def test_revoke_and_add_through_the_library_keep_the_secrets_out_of_the_allow_list(tree):
    add_client(tree, "extra")
    revoke_client(tree, "default")
    secrets = {m["metadata"]["name"]: set(m["data"]) for m in key_secret_manifests(tree, "p")}
    assert secrets["p-clients"] == {"web.key", "extra.key"}
    assert "p-client-default" not in secrets and "p-client-extra" in secrets


def test_a_client_named_twice_is_refused_before_anything_is_written(tmp_path):
    result = run_keys(str(tmp_path / "keys"), "--client", "web", "--client", "web")
    assert result.returncode != 0 and "named twice" in result.stderr
    assert not (tmp_path / "keys").exists()
