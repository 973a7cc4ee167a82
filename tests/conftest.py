"""Fixtures that start real brokers and workers on 127.0.0.1 and guarantee they are gone after.

``local_pool`` is shared by the tests of a module (starting one costs about a second);
tests that kill or scale workers make their own ``LocalPool`` in a ``with`` block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pool import LocalPool
from pool.client.connection import Connection
from tests.support.fake_openai import FAKE_KEY, FakeOpenAI
from tests.support.paths import REPO
from tests.support.processes import child_pids

# The real-cluster tier (tests/cluster) brings its own fixtures.
pytest_plugins = ["tests.cluster.fixtures"] if (REPO / "tests/cluster/fixtures.py").exists() else []


@pytest.fixture(scope="session", autouse=True)
def _run_from_repo_root() -> Iterator[None]:
    """Workers import test modules (pickled by reference), so they start from the repo root."""
    old = os.getcwd()
    os.chdir(REPO)
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible server on 127.0.0.1 that accepts only FAKE_KEY."""
    with FakeOpenAI(api_key=FAKE_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def local_pool(fake_openai: FakeOpenAI) -> Iterator[LocalPool]:
    """Two workers of concurrency 4; the workers (only) hold the OpenAI key in their environment."""
    with LocalPool(workers=2, concurrency=4, env={"OPENAI_API_KEY": FAKE_KEY}) as pool:
        yield pool


@pytest.fixture(autouse=True)
def _no_leftover_connections() -> Iterator[None]:
    yield
    # Connections to pools that a test closed must not keep I/O threads alive.
    for (_, address, _), connection in list(Connection._registry.items()):
        if connection.closed:
            Connection._registry.pop((os.getpid(), address, connection.keys), None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    Connection.close_all()
    left = child_pids()
    if left:
        # Fail loudly: a test left processes behind.
        print(f"\nERROR: processes left behind by the tests: {sorted(left)}")
        session.exitstatus = 1
