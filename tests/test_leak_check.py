"""The check tests/conftest.py runs after every test: it finds what a test leaves behind (a shared
connection, a child process, an entry in the temp root), spares what a longer-lived fixture owns,
and cleans up what it reports. Each test here leaks on purpose and cleans up through the check."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pool.client.connection import Connection
from tests.support import leaks
from tests.support.ports import dead_address
from tests.support.processes import is_gone

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A temp root for the check to watch (the suite's own is shared by a whole test process)."""
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def test_the_fast_suite_runs_in_a_temp_root_of_its_own_and_every_run_with_strict_broker_rules(request):
    assert os.environ["RUNNABLE_K8S_STRICT_RULES"] == "1"
    if "not cluster" not in (request.config.option.markexpr or ""):
        pytest.skip("a run that may select the cluster tier keeps the system's temp root")
    assert Path(tempfile.gettempdir()).name.startswith("rk8s-t-") and os.environ["TMPDIR"] == tempfile.gettempdir()


def test_a_shared_connection_left_open_is_found_and_closed(root):
    before = leaks.Snapshot.take(root)
    address = dead_address()
    Connection.shared(address)
    found = leaks.find_leaks(before, root, leaks.Owned(), grace=0)
    assert found.connections == [address]
    leaks.clean_up(found, root)
    assert not leaks.find_leaks(before, root, leaks.Owned(), grace=0)


def test_a_connection_to_the_address_of_a_longer_lived_pool_is_that_pools(root):
    before = leaks.Snapshot.take(root)
    address = dead_address()
    Connection.shared(address)

    class Pool:  # what a module fixture's LocalPool looks like to the check
        def __init__(self) -> None:
            self.address = address

    try:
        assert not leaks.find_leaks(before, root, leaks.owned_by([Pool()]))
    finally:
        Connection.close_all(address)


def test_a_child_process_left_running_is_found_and_killed(root):
    before = leaks.Snapshot.take(root)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = leaks.find_leaks(before, root, leaks.Owned(), grace=0)
        assert len(found.children) == 1 and found.children[0].startswith(f"{child.pid} ")
        assert not leaks.find_leaks(before, root, leaks.owned_by([[child]]))  # a fixture's process
        leaks.clean_up(found, root)
        assert is_gone(child.pid)
    finally:
        child.kill()
        child.wait(10)


def test_a_folder_left_in_the_temp_root_is_found_and_removed(root):
    before = leaks.Snapshot.take(root)
    folder = Path(tempfile.mkdtemp(prefix="left-", dir=root))
    (folder / "broker.sock").write_text("")
    found = leaks.find_leaks(before, root, leaks.Owned(), grace=0)
    assert found.entries == [folder.name]
    # A fixture whose address is a socket in that folder owns it.
    assert not leaks.find_leaks(before, root, leaks.owned_by([f"ipc://{folder}/broker.sock"]))
    leaks.clean_up(found, root)
    assert not folder.exists()
    assert "temp root" in found.describe("the test")
