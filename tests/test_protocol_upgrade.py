"""Upgrading from RK8S/1: a client and a pool of different releases say so, and what to upgrade.

The old release is the real one, not a stub: the commit before the protocol became RK8S/2 is
unpacked from this repository's history (``git archive``) into a temporary folder, and its broker,
worker and client run from there (``PYTHONPATH`` and the working directory point at that tree, with
this venv's Python). Either way round, calls fail with ``IncompatibleWorker`` naming both protocol
versions (never a silent fallback in mode "auto", never a wait for a connect timeout), and the
message says what to upgrade: the pool first, then the clients.

Skipped, saying why, only when the git history is not available.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableLambda

from pool import IncompatibleWorker, LocalPool, RunnableK8s
from pool.client.connection import Connection
from tests.support.processes import stop_process
from worker import protocol as P

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
# The commit that made the protocol RK8S/2; the release before it speaks RK8S/1.
RK8S_2_COMMIT = "586bd88"
START_TIMEOUT = 60.0


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, timeout=60).stdout


@pytest.fixture(scope="module")
def old_release() -> Iterator[Path]:
    """The previous release's source tree, unpacked from git history into a temporary folder."""
    try:
        commit = _git("rev-parse", "--verify", f"{RK8S_2_COMMIT}^{{commit}}^").decode().strip()
        archive = _git("archive", "--format=tar", commit)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the previous release (the parent of {RK8S_2_COMMIT}) cannot be read from git history "
                    f"here ({exc}); these tests need a clone with its history")
    folder = Path(tempfile.mkdtemp(prefix="rk8s-old-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        assert b'PROTOCOL_VERSION = 1' in (folder / "worker" / "protocol.py").read_bytes()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _old_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "RUNNABLE_K8S_LOG_LEVEL": "WARNING"}


def _start_old(tree: Path, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    """A program of the old release (``python -m ...`` from its tree, with this venv's Python)."""
    return subprocess.Popen([sys.executable, *args], cwd=tree, env=_old_env(tree), stdin=subprocess.DEVNULL,
                            **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def old_pool(old_release: Path) -> Iterator[str]:
    """The old release's broker (on ipc://, in a private temporary folder) and one of its workers."""
    folder = tempfile.mkdtemp(prefix="rk8s-oldpool-")
    address = f"ipc://{folder}/broker.sock"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        broker = _start_old(old_release, "-m", "pool", "broker", "--bind", address, "--announce",
                            "--exit-with-parent", str(os.getpid()), stdout=subprocess.PIPE)
        procs.append(broker)
        assert broker.stdout is not None
        line = broker.stdout.readline().decode()  # the old broker says "READY <address>" once bound
        assert line.startswith("READY "), f"the old broker did not start (it said {line!r})"
        procs.append(_start_old(old_release, "-m", "worker", "--connect", address, "--concurrency", "4",
                                "--exit-with-parent", str(os.getpid())))
        yield address
    finally:
        Connection.close_all(address)
        for proc in reversed(procs):
            stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


def double(x: int) -> int:
    return 2 * x


def _assert_names_versions_and_upgrade(error: BaseException) -> None:
    message = str(error)
    assert "RK8S/1" in message and "RK8S/2" in message, message
    assert "helm upgrade" in message and "runnable-k8s broker" in message, message  # the pool first
    assert "pip install -U runnable-k8s" in message, message  # then the clients
    assert message.index("helm upgrade") < message.index("pip install"), message


def test_a_new_client_reaching_an_old_broker_fails_with_incompatible_worker_saying_what_to_upgrade(old_pool):
    """Before: the old broker's answer (in RK8S/1) was dropped as malformed and the call waited
    for the connect timeout, then failed with PoolUnavailable saying no broker answered."""
    runnable = RunnableK8s(bound=RunnableLambda(double), pool=old_pool, mode="warm", timeout=30,
                           connect_timeout=60)
    with pytest.raises(IncompatibleWorker) as info:
        runnable.invoke(1)
    _assert_names_versions_and_upgrade(info.value)

    with pytest.raises(IncompatibleWorker):
        asyncio.run(runnable.ainvoke(1))
    outcomes = runnable.batch([1, 2, 3], return_exceptions=True)
    assert all(isinstance(o, IncompatibleWorker) for o in outcomes), outcomes


def test_auto_mode_does_not_fall_back_from_an_old_broker(old_pool):
    """A local ephemeral worker would run the call fine: falling back to it would hide that the
    pool needs upgrading. Before: auto mode took the old pool for an unreachable one and ran the
    call in a fresh local process."""
    runnable = RunnableK8s(bound=RunnableLambda(double), pool=old_pool, mode="auto", launcher="local",
                           timeout=60, connect_timeout=60)
    with pytest.raises(IncompatibleWorker) as info:
        runnable.invoke(1)
    _assert_names_versions_and_upgrade(info.value)


OLD_CLIENT = textwrap.dedent("""
    import sys

    import pool
    from langchain_core.runnables import RunnableLambda
    from pool import IncompatibleWorker, RunnableK8s
    from worker import protocol

    print("OLD", protocol.PROTOCOL.decode(), pool.__file__, flush=True)
    runnable = RunnableK8s(bound=RunnableLambda(lambda x: x), pool=sys.argv[1], mode="warm", timeout=30,
                           connect_timeout=20)
    try:
        runnable.invoke(1)
    except IncompatibleWorker as exc:
        print("INCOMPATIBLE", str(exc).replace("\\n", " "), flush=True)
        sys.exit(0)
    except Exception as exc:
        print("OTHER", type(exc).__name__, str(exc).replace("\\n", " "), flush=True)
        sys.exit(1)
    print("RAN", flush=True)
    sys.exit(2)
""")


def test_an_old_client_reaching_a_new_broker_fails_with_incompatible_worker_saying_what_to_upgrade(old_release):
    """The old client's own code, unchanged, must get an answer it understands: an ``incompatible``
    error in its own protocol version, naming both versions and telling it to upgrade."""
    with LocalPool(workers=1) as pool:
        client = _start_old(old_release, "-c", OLD_CLIENT, pool.address, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        try:
            out, err = client.communicate(timeout=120)
        finally:
            stop_process(client)
        lines = out.decode().splitlines()
        assert lines and lines[0].startswith("OLD RK8S/1 " + str(old_release)), (lines, err.decode()[-2000:])
        assert len(lines) > 1 and lines[1].startswith("INCOMPATIBLE "), (lines, err.decode()[-2000:])
        message = lines[1]
        assert "RK8S/1" in message and P.PROTOCOL.decode() in message, message
        assert "pip install -U runnable-k8s" in message, message
        # The new pool is unharmed: a client of its own release runs as usual.
        assert RunnableK8s(bound=RunnableLambda(double), pool=pool.address, mode="warm", timeout=30).invoke(4) == 8
