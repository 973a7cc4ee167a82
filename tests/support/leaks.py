"""What a test leaves behind: shared client connections, child processes, entries in the temp root.

tests/conftest.py takes a ``Snapshot`` before each test (and each module) and compares after it:
whatever is new and still there is a leak, unless a fixture that outlives the scope owns it (a
module's pool owns its processes, its socket folder and the shared connections to its address;
those are checked when that fixture's scope ends). Leaks are cleaned up after they are reported,
so the next test starts clean and is not blamed for them.

    before = Snapshot.take(temp_root)
    ... the test ...
    leaks = find_leaks(before, temp_root, owners=[pool_fixture_value])
    if leaks: pytest.fail(leaks.describe())

Only ``Connection._registry``, ``Connection.shared`` and ``Connection.close_all`` of the client's
connection class are used: the rest of it may change.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pool.client.connection import Connection
from tests.support.processes import child_pids, command_line, is_gone
from tests.support.waiting import wait_for

#: How long what a test stopped may take to finish going (a process exiting after SIGTERM, a
#: connection's I/O thread closing) before it counts as left behind.
GRACE = 5.0

#: Children that live for the whole session on purpose (multiprocessing's helpers).
_SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def open_connections() -> dict[int, tuple[str, Connection]]:
    """This process's shared connections that are not closed: id -> (address, connection)."""
    out = {}
    for (pid, address, _), connection in list(Connection._registry.items()):
        if pid == os.getpid() and not getattr(connection, "closed", False):
            out[id(connection)] = (address, connection)
    return out


def _children() -> set[int]:
    return {pid for pid in child_pids() if not any(h in command_line(pid) for h in _SESSION_HELPERS)}


def _entries(temp_root: Path | None) -> set[str]:
    if temp_root is None or not temp_root.is_dir():
        return set()
    return {entry.name for entry in temp_root.iterdir()}


@dataclass
class Snapshot:
    """What existed before a test (or a module) began."""

    connections: set[int]
    children: set[int]
    entries: set[str]

    @classmethod
    def take(cls, temp_root: Path | None) -> Snapshot:
        return cls(set(open_connections()), _children(), _entries(temp_root))


@dataclass
class Owned:
    """What the long-lived fixture values hold: addresses, process ids and paths."""

    addresses: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)

    def add(self, value: Any, depth: int = 0) -> None:
        """Collect what ``value`` holds: a string address or path, a process, or the attributes of
        an object (a LocalPool's address, broker, workers and folder), one level down."""
        if isinstance(value, str):
            if "://" in value:
                self.addresses.add(value)
                self.paths.add(value.split("://", 1)[1])
            elif value.startswith("/"):
                self.paths.add(value)
        elif isinstance(value, Path):
            self.paths.add(str(value))
        elif isinstance(value, subprocess.Popen):
            self.pids.add(value.pid)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in list(value)[:64]:
                self.add(item, depth)
        elif depth == 0 and not isinstance(value, (int, float, bytes, dict)) and value is not None:
            pids = getattr(value, "pids", None)  # LocalPool.pids: the broker, workers and draining ones
            if isinstance(pids, list):
                self.pids.update(p for p in pids if isinstance(p, int))
            for attribute in ("address", "endpoint"):
                self.add(getattr(value, attribute, None), depth + 1)
            for item in getattr(value, "__dict__", {}).values():
                self.add(item, depth + 1)

    def owns_entry(self, temp_root: Path, name: str) -> bool:
        entry = str(temp_root / name)
        return any(path == entry or path.startswith(entry + "/") for path in self.paths)


@dataclass
class Leaks:
    connections: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.connections or self.children or self.entries)

    def describe(self, where: str) -> str:
        parts = []
        if self.connections:
            parts.append(f"open shared connections to {self.connections} (close them: Connection.close_all(address), "
                         "or use a LocalPool, whose close does it)")
        if self.children:
            parts.append(f"child processes still running: {self.children} (stop and wait for each one it starts)")
        if self.entries:
            parts.append(f"files or folders in the temp root: {self.entries} (use tmp_path, or remove what it made)")
        return f"{where} left behind " + "; ".join(parts)


def find_leaks(before: Snapshot, temp_root: Path | None, owned: Owned, grace: float = GRACE) -> Leaks:
    """What is new since ``before`` and not owned, once what is finishing has had ``grace`` s to finish."""

    def new() -> Leaks:
        leaks = Leaks()
        for key, (address, _) in open_connections().items():
            if key not in before.connections and address not in owned.addresses:
                leaks.connections.append(address)
        for pid in sorted(_children() - before.children - owned.pids):
            leaks.children.append(f"{pid} ({command_line(pid)[:200]})")
        for name in sorted(_entries(temp_root) - before.entries):
            assert temp_root is not None
            if not owned.owns_entry(temp_root, name):
                leaks.entries.append(name)
        return leaks

    leaks = new()
    if (leaks.children or leaks.connections) and grace > 0:
        try:
            wait_for(lambda: not (found := new()).children and not found.connections, grace,
                     "what the test stopped to finish going")
        except AssertionError:
            pass
        leaks = new()
    return leaks


def clean_up(leaks: Leaks, temp_root: Path | None) -> None:
    """Close, kill and remove what leaked, so that the next test is not blamed for it."""
    for address in set(leaks.connections):
        Connection.close_all(address)
    for child in leaks.children:
        pid = int(child.split(" ", 1)[0])
        _kill(pid)
    if temp_root is not None:
        for name in leaks.entries:
            path = temp_root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _kill(pid: int) -> None:
    """SIGKILL a child of this process by its PID and reap it. A child in a session of its own
    (a daemon, such as the test cluster's) is only reported: it may serve more than this test."""
    try:
        if os.getsid(pid) == pid:
            return
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: is_gone(pid), GRACE, f"process {pid} to die")
        os.waitpid(pid, os.WNOHANG)
    except (AssertionError, ChildProcessError):
        pass  # reaped by its Popen object, or it is a zombie its Popen reaps later


def owned_by(values: Iterable[Any]) -> Owned:
    owned = Owned()
    for value in values:
        try:
            owned.add(value)
        except Exception:  # noqa: BLE001 - a fixture value we cannot read owns nothing we can see
            continue
    return owned
