"""Fixtures that start real brokers and workers on 127.0.0.1 and guarantee they are gone after.

``local_pool`` is shared by the tests of a module (starting one costs about a second);
tests that kill or scale workers make their own ``LocalPool`` in a ``with`` block.

The fast suite runs in parallel (pytest-xdist, pyproject's ``-n auto --dist loadfile``): a test
module runs whole in one worker process, so its module-scoped fixtures start once. Each worker
checks at its end that none of *its* children is left (the other worker's are not its business),
and the controller fails the run if one did.

Every test is checked for what it leaves behind (tests/support/leaks.py): an open shared client
connection it made, a child process it started, a file or folder in the temp root. Each test
process has a temp root of its own (TMPDIR, inherited by every process it starts), so what
appears there is this process's doing, not a parallel worker's. What a longer-lived fixture owns
(a module's pool: its processes, its socket folder, the connections to its address) is checked
when that fixture's scope ends instead. A leak fails the test (an error at its teardown) and is
cleaned up, so that the next test is not blamed.

Every broker the tests start runs with RUNNABLE_K8S_STRICT_RULES=1: a broker rule that raises
is then raised (and the test that reached it fails) instead of being logged and counted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pool import LocalPool
from pool.client.connection import Connection
from tests.support import leaks
from tests.support.fake_openai import FAKE_KEY, FakeOpenAI
from tests.support.paths import REPO
from tests.support.processes import child_pids

# The real-cluster tier (tests/cluster) brings its own fixtures.
pytest_plugins = ["tests.cluster.fixtures"] if (REPO / "tests/cluster/fixtures.py").exists() else []

#: Worker processes for the fast suite under ``-n auto``. The tests mostly wait (for processes to
#: start, heartbeats, timeouts), so two workers on two cores roughly halve the run.
FAST_SUITE_WORKERS = 2

#: Inherited by every broker process the tests start (pool.broker.core reads it).
STRICT_RULES_ENV = "RUNNABLE_K8S_STRICT_RULES"
os.environ[STRICT_RULES_ENV] = "1"


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


# ---------------------------------------------------------------------------- what tests leave behind

#: This test process's temp root (None until the session fixture made it).
_TEMP_ROOT: Path | None = None

#: Fixtures of a broader scope than the test that used them: what they own is checked when their
#: scope ends (a session fixture's at the end of each module it outlives, a module's there too).
_LONG_LIVED: dict[int, Any] = {}

#: This file's own session and module fixtures: the temp root is not "owned" by a test's fixture.
_CHECKERS = ("_private_temp_root", "_run_from_repo_root", "_module_leaves_nothing_behind")


@pytest.fixture(scope="session", autouse=True)
def _private_temp_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temp root of this process's own: TMPDIR for the processes the tests start, and
    ``tempfile``'s for this one. pytest's tmp_path stays where it was (computed first). Not when
    the run may select the real-cluster tier: the cluster's daemons, which it may start, outlive
    the session and must not inherit a TMPDIR that is removed at its end."""
    global _TEMP_ROOT
    if "not cluster" not in (request.config.option.markexpr or ""):
        yield
        return
    tmp_path_factory.getbasetemp()
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    # Short (an ipc:// socket path in it must fit in about 100 bytes: macOS's long TMPDIR gives
    # way to /tmp) and open like /tmp (sticky, world-writable): tests that act as another user see
    # what they would see there.
    base = tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="rk8s-t-", dir="/tmp" if len(base) > 40 and os.path.isdir("/tmp") else base))
    root.chmod(0o1777)
    os.environ["TMPDIR"] = str(root)
    tempfile.tempdir = str(root)
    _TEMP_ROOT = root
    yield
    _TEMP_ROOT = None
    tempfile.tempdir = old_tempdir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
    shutil.rmtree(root, ignore_errors=True)


def _broader_fixtures(request: pytest.FixtureRequest) -> list[Any]:
    """The fixture definitions this test uses whose scope is broader than a function's."""
    info = getattr(request.node, "_fixtureinfo", None)
    name2defs = info.name2fixturedefs if info is not None else {}
    found = []
    for name in request.fixturenames:
        defs = name2defs.get(name)
        if defs and defs[-1].scope != "function" and name not in _CHECKERS:
            found.append(defs[-1])
    return found


def _values(definitions: list[Any]) -> list[Any]:
    return [d.cached_result[0] for d in definitions if d.cached_result is not None and d.cached_result[2] is None]


def _fail_on(found: leaks.Leaks, where: str) -> None:
    if found:
        leaks.clean_up(found, _TEMP_ROOT)
        pytest.fail(found.describe(where), pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_nothing_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end of a module (its module fixtures closed): nothing its fixtures or tests made is left,
    except what a session fixture still owns."""
    before = leaks.Snapshot.take(_TEMP_ROOT)
    yield
    live = [d for d in _LONG_LIVED.values() if d.scope in ("session", "package")]
    _LONG_LIVED.clear()
    _LONG_LIVED.update({id(d): d for d in live})
    found = leaks.find_leaks(before, _TEMP_ROOT, leaks.owned_by(_values(live)))
    _fail_on(found, f"the module {request.node.name} (its module-scoped fixtures or tests)")


@pytest.fixture(autouse=True)
def _test_leaves_nothing_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test (its function fixtures closed): no new open connection, child process or
    temp-root entry, except what a module- or session-scoped fixture it uses owns."""
    before = leaks.Snapshot.take(_TEMP_ROOT)
    yield
    broader = _broader_fixtures(request)
    _LONG_LIVED.update({id(d): d for d in broader})
    # A pool's connections that the test closed must not keep I/O threads alive.
    for (pid, address, keys), connection in list(Connection._registry.items()):
        if pid == os.getpid() and getattr(connection, "closed", False):
            Connection._registry.pop((pid, address, keys), None)
    found = leaks.find_leaks(before, _TEMP_ROOT, leaks.owned_by(_values(broader)))
    _fail_on(found, "the test")


# ---------------------------------------------------------------------------- shared servers and pools


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible server on 127.0.0.1 that accepts only FAKE_KEY."""
    with FakeOpenAI(api_key=FAKE_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def local_pool(fake_openai: FakeOpenAI) -> Iterator[LocalPool]:
    """Two workers of concurrency 4; the workers (only) hold the OpenAI key in their environment."""
    with LocalPool(workers=2, slots=4, env={"OPENAI_API_KEY": FAKE_KEY}) as pool:
        yield pool


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
