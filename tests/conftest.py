"""Fixtures that start real brokers and workers on 127.0.0.1 and guarantee they are gone after.

``local_pool`` is shared by the tests of a module (starting one costs about a second);
tests that kill or scale workers make their own ``LocalPool`` in a ``with`` block.

The fast suite runs in parallel (pytest-xdist, pyproject's ``-n auto --dist loadfile``): a test
module runs whole in one worker process, so its module-scoped fixtures start once. Each worker
checks at its end that none of *its* children is left (the other worker's are not its business),
and the controller fails the run if one did.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from pool import LocalPool
from pool.client.connection import Connection
from tests.support.fake_openai import FAKE_KEY, FakeOpenAI
from tests.support.paths import REPO
from tests.support.processes import child_pids

# The real-cluster tier (tests/cluster) brings its own fixtures.
pytest_plugins = ["tests.cluster.fixtures"] if (REPO / "tests/cluster/fixtures.py").exists() else []

#: Worker processes for the fast suite under ``-n auto``. The tests mostly wait (for processes to
#: start, heartbeats, timeouts), so two workers on two cores roughly halve the run.
FAST_SUITE_WORKERS = 2


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many workers ``-n auto`` means: FAST_SUITE_WORKERS (PYTEST_XDIST_AUTO_NUM_WORKERS
    overrides), but none (one process, as before) when the run selects the real-cluster tier,
    which holds the machine's one cluster and its lock for a single session."""
    if "not cluster" not in (config.option.markexpr or ""):
        return 0
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    return int(env) if env else FAST_SUITE_WORKERS


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


# Processes left behind, by the process whose children they are ("" for this one; "gw0"... for
# the xdist workers, which report theirs to the controller when they finish).
_LEFT_BEHIND: dict[str, list[int]] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """(xdist controller) A worker finished: note what it left behind."""
    left = getattr(node, "workeroutput", {}).get("left_behind")
    if left:
        _LEFT_BEHIND[node.gateway.id] = left


@pytest.hookimpl(trylast=True)  # in the xdist controller, after the workers have been stopped
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    Connection.close_all()
    left = sorted(child_pids())
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports and fails the run
        workeroutput["left_behind"] = left
        return
    if left:
        _LEFT_BEHIND[""] = left
    if _LEFT_BEHIND:
        # Fail loudly: a test left processes behind.
        where = "; ".join(f"{pids} (children of {name or 'this process'})"
                          for name, pids in sorted(_LEFT_BEHIND.items()))
        print(f"\nERROR: processes left behind by the tests: {where}")
        session.exitstatus = 1
